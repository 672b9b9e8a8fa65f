"""Publish a trained detector: stage a model repo (weights, remote code, model card) and a Gradio Space, then
upload both.

Staging and uploading are separate so that what would be pushed can be inspected (`--dry_run`) and tested
without a network. The cards themselves are written by mirage_hf/cards.py.
The token is never taken on the command line, printed or written: `HfApi` reads `HF_TOKEN` or the login cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path

from huggingface_hub import HfApi
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17

from .adapter_config import MiraGeAdapterConfig
from .adapter_files import ADAPT_RESULTS_NAME, ADAPTER_WEIGHTS_NAME, is_detector_adapter
from .cards import SPACE_TEMPLATE, adapter_card, choose_license, is_hub_id, is_repo_id, model_card, space_card
from .commands import one_line_errors
from .configuration_mirage import MiraGeConfig
from .model_folder import EVAL_RESULTS_FILE
from .onnx_runtime import INFO_FILE, ONNX_DIR
from .transforms import preprocessing_mismatch

PACKAGE = files("mirage_hf")
SPACE_FILES = ("app.py", "requirements.txt", "examples")
NOT_IN_SPACE_COPY = ("__pycache__", "*.pyc", "space", "configs")  # the Space's own copy of mirage_hf needs neither
MODEL_FILES = (
    "config.json",
    "preprocessor_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "*.py",
    EVAL_RESULTS_FILE,
)
REQUIRED_MODEL_FILES = ("config.json", "preprocessor_config.json", "configuration_mirage.py", "modeling_mirage.py")


def _repo_id(text: str) -> str:
    if not is_repo_id(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Hub repo id of the form owner/name")
    return text


ADAPTER_FILES = (ADAPTER_WEIGHTS_NAME, ADAPT_RESULTS_NAME, "config.json", "preprocessor_config.json")


def _stage_adapter(adapter_dir: Path, target: Path, repo_id: str, license, base_model) -> None:
    """The adapter's files and card; its base must be a Hub repo (`base_model` renames a local base that was
    published; loading still checks the weights' sha256)."""
    adapter = MiraGeAdapterConfig.from_pretrained(adapter_dir)
    base = base_model or adapter.base_model_name_or_path
    if not is_hub_id(base):
        raise ValueError(
            f"the adapter's base detector {base!r} is a local folder, which the Hub cannot load: publish it first "
            "(mirage-push --model_dir <it>) and pass --base_model <its repo id>"
        )
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{adapter_dir} is not a complete adapter folder (missing {missing})")
    target.mkdir(parents=True)
    for name in ADAPTER_FILES:
        shutil.copy2(adapter_dir / name, target / name)
    if base_model:
        revision = None if base_model != adapter.base_model_name_or_path else adapter.base_model_revision
        adapter.base_model_name_or_path, adapter.base_model_revision = base_model, revision
        adapter.to_json_file(target / "config.json")
    results = json.loads((adapter_dir / ADAPT_RESULTS_NAME).read_text())
    license = choose_license(results.get("reference") or "", license)
    adapter_card(target, repo_id, license).save(target / "README.md")


def _copy_model_files(model_dir: Path, target: Path) -> None:
    missing = [name for name in REQUIRED_MODEL_FILES if not (model_dir / name).is_file()]
    if missing or not list(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{model_dir} is not an exported MiraGe folder (missing {missing or 'safetensors weights'}); "
            "export it with mirage_hf.model_folder.export_model"
        )
    if "auto_map" not in json.loads((model_dir / "config.json").read_text()):
        raise ValueError(f"{model_dir}/config.json has no auto_map: it would not load with trust_remote_code")
    processor, config = AutoImageProcessor.from_pretrained(model_dir), MiraGeConfig.from_pretrained(model_dir)
    if problem := preprocessing_mismatch(processor, config, model_dir):
        raise ValueError(problem)
    target.mkdir(parents=True)
    for pattern in MODEL_FILES:
        for path in model_dir.glob(pattern):
            shutil.copy2(path, target / path.name)
    if (model_dir / ONNX_DIR / INFO_FILE).is_file():  # written by mirage-export-onnx
        shutil.copytree(model_dir / ONNX_DIR, target / ONNX_DIR)


def _copy_resource(source, target: Path, ignore=()) -> None:
    """Copies a package resource (file or folder, read through importlib.resources) to `target`."""
    if source.is_dir():
        target.mkdir(parents=True)
        for entry in source.iterdir():
            if not any(fnmatch(entry.name, pattern) for pattern in ignore):
                _copy_resource(entry, target / entry.name, ignore)
    else:
        target.write_bytes(source.read_bytes())


def _stage_space(target: Path, repo_id: str) -> None:
    """The Space: app, requirements, examples, README naming the model, and a copy of this package (the Space
    installs only requirements.txt, and mirage-hf is not on PyPI)."""
    target.mkdir(parents=True)
    for name in SPACE_FILES:
        _copy_resource(SPACE_TEMPLATE / name, target / name)
    space_card(repo_id).save(target / "README.md")
    _copy_resource(PACKAGE, target / "mirage_hf", ignore=NOT_IN_SPACE_COPY)


def stage_model_repo(
    model_dir, out_dir, repo_id: str, space_repo_id=None, license=None, base_model=None, datasets=None
) -> Path:
    """Writes `out_dir/model` (the model files and README.md model card) and `out_dir/space` (the Gradio Space
    for `repo_id`); returns `out_dir`. `out_dir` must be new or empty, so that nothing stale is pushed."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"no model folder {str(model_dir)!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"staging folder {out_dir} is not empty; choose a new one")
    if is_detector_adapter(model_dir):
        _stage_adapter(model_dir, out_dir / "model", repo_id, license, base_model)
    else:
        card = model_card(model_dir, repo_id, license, base_model, datasets, space_repo_id)
        _copy_model_files(model_dir, out_dir / "model")
        card.save(out_dir / "model" / "README.md")
    _stage_space(out_dir / "space", repo_id)
    return out_dir


def planned_calls(staged_dir, repo_id: str, space_repo_id=None, private: bool = False) -> list[tuple[str, dict]]:
    """The `HfApi` method calls that publish a staged folder, as (method name, keyword arguments)."""
    staged_dir = Path(staged_dir)
    calls = [
        ("create_repo", {"repo_id": repo_id, "repo_type": "model", "private": private, "exist_ok": True}),
        (
            "upload_folder",
            {
                "repo_id": repo_id,
                "repo_type": "model",
                "folder_path": str(staged_dir / "model"),
                "commit_message": "Upload MiraGe detector",
            },
        ),
    ]
    if space_repo_id:
        calls += [
            (
                "create_repo",
                {
                    "repo_id": space_repo_id,
                    "repo_type": "space",
                    "space_sdk": "gradio",
                    "private": private,
                    "exist_ok": True,
                },
            ),
            (
                "upload_folder",
                {
                    "repo_id": space_repo_id,
                    "repo_type": "space",
                    "folder_path": str(staged_dir / "space"),
                    "commit_message": f"Space for {repo_id}",
                },
            ),
        ]
    return calls


def upload(staged_dir, repo_id: str, space_repo_id=None, token=None, private: bool = False) -> list:
    """Creates the repos (if needed) and uploads the staged folders; returns what each `HfApi` call returned.
    With `token=None`, huggingface_hub uses `HF_TOKEN` or the login cache."""
    api = HfApi(token=token)
    calls = planned_calls(staged_dir, repo_id, space_repo_id, private)
    return [getattr(api, name)(**kwargs) for name, kwargs in calls]


def format_calls(calls: list[tuple[str, dict]]) -> str:
    """The calls as Python, the token shown only as where it comes from."""
    lines = ["api = HfApi(token=<redacted: HF_TOKEN or the login cache>)"]
    lines += [f"api.{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})" for name, kwargs in calls]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Publish a trained MiraGe detector (model repo and Gradio Space).")
    parser.add_argument(
        "--model_dir", required=True, help="Exported model folder (e.g. outputs/demo/model) or mirage-adapt's adapter."
    )
    parser.add_argument("--repo_id", required=True, type=_repo_id, help="Model repo, user/name.")
    parser.add_argument("--space_repo_id", type=_repo_id, help="Also publish a Gradio Space, user/name.")
    parser.add_argument("--license", help="Licence of the weights; defaults to cc-by-nc-sa-4.0 for GenImage data.")
    parser.add_argument(
        "--base_model",
        help="Hub id of the base CLIP (default: the config's clip_name_or_path); for an adapter folder (mirage-adapt), "
        "the Hub id its base detector was published under",
    )
    parser.add_argument("--datasets", nargs="+", help="Hub ids of the training data sets, for the card.")
    parser.add_argument("--private", action="store_true", help="Create private repos.")
    parser.add_argument("--staging_dir", help="New or empty folder to stage into (default: a new temporary one).")
    parser.add_argument("--dry_run", action="store_true", help="Stage and print the Hub calls without making them.")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # no such folder, a licence to choose, a used staging folder: one line
    with one_line_errors(parser.prog, OSError, ValueError):
        staged = stage_model_repo(
            args.model_dir,
            args.staging_dir or tempfile.mkdtemp(prefix="mirage-push-"),
            args.repo_id,
            space_repo_id=args.space_repo_id,
            license=args.license,
            base_model=args.base_model,
            datasets=args.datasets,
        )
    print(f"staged in {staged}")
    if args.dry_run:
        calls = planned_calls(staged, args.repo_id, args.space_repo_id, args.private)
        print("dry run, would call:\n" + format_calls(calls))
        return
    upload(staged, args.repo_id, args.space_repo_id, private=args.private)
    print(f"model: https://huggingface.co/{args.repo_id}")
    if args.space_repo_id:
        print(f"space: https://huggingface.co/spaces/{args.space_repo_id}")
        if args.private:
            print("the model is private: give the Space an HF_TOKEN secret that can read it")
