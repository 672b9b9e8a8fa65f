"""Publishing: the staged model repo and Space are what the Hub needs, and the upload makes the right calls.

No network: HF_HUB_OFFLINE=1 (conftest) makes any real Hub call fail, and `HfApi` is monkeypatched.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from huggingface_hub import HfApi, ModelCard, SpaceCard, constants
from PIL import Image
from transformers import pipeline
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from mirage_hf import MiraGeForImageClassification
from mirage_hf.hub import main, stage_model_repo, upload
from mirage_hf.model_folder import export_model

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789"
REPO, SPACE = "someone/mirage-test", "someone/mirage-test-demo"
SUBSETS = {"ADM": 0.81, "BigGAN": 0.62, "mean": 0.715, "all": 0.7}


def metrics(accuracy):
    return {
        "accuracy": accuracy,
        "real_accuracy": 0.9,
        "fake_accuracy": accuracy - 0.1,
        "average_precision": accuracy + 0.05,
        "roc_auc": accuracy + 0.04,
        "tpr_at_5_fpr": None,
        "ece": 0.1,
        "n": 200,
        "n_real": 100,
        "n_fake": 100,
    }


EVAL_RESULTS = {
    "model": "outputs/run/model",
    "eval_dataset": "genimage:/data/GenImage",
    "eval_split": "val",
    "preprocess": "center_crop",
    "threshold": 0.3,
    "temperature": 0.5,
    "calibration": {
        "rule": "temperature: cross-entropy against Platt's targets; threshold: balanced accuracy",
        "n_real": 120,
        "n_fake": 110,
        "warnings": ["calibration: the 230 held-out images are perfectly separated"],
    },
    "bad_images": 1,
    "clean": {name: metrics(acc) for name, acc in SUBSETS.items()},
    "jpeg75": {name: metrics(acc - 0.1) for name, acc in SUBSETS.items()},
}


@pytest.fixture(scope="module")
def model_dir(detector_dir, tmp_path_factory):
    """The test detector, exported with evaluation results as a training run would."""
    model = MiraGeForImageClassification.from_pretrained(detector_dir)
    processor = AutoImageProcessor.from_pretrained(detector_dir)
    return export_model(model, processor, tmp_path_factory.mktemp("run") / "model", EVAL_RESULTS)


@pytest.fixture(scope="module")
def staged(model_dir, tmp_path_factory):
    return stage_model_repo(model_dir, tmp_path_factory.mktemp("staged"), REPO, space_repo_id=SPACE)


def test_model_card_carries_the_numbers_the_licence_and_the_usage(staged):
    card = ModelCard.load(staged / "model" / "README.md")
    assert card.data.license == "cc-by-nc-sa-4.0" and card.data.pipeline_tag == "image-classification"
    assert card.data.library_name == "transformers" and card.data.base_model is None  # the tiny CLIP is local
    found = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    expected = {
        (subset, metric): round(values[metric], 4)  # 0.81 + 0.05 is 0.8600000000000001: the card says 0.86
        for subset, values in EVAL_RESULTS["clean"].items()
        for metric in ("accuracy", "average_precision", "roc_auc")
    }
    assert expected.items() <= found.items()
    assert all(value == round(value, 4) for value in found.values())
    assert ("ADM", "tpr_at_5_fpr") not in found  # null metrics are left out, not written as 0
    assert {r.dataset_type for r in card.data.eval_results} == {"GenImage"}  # no local path in the card
    text = card.text
    assert "non-commercial use only" in text and "CC BY-NC-SA 4.0" in text and "/data/GenImage" not in text
    assert f'pipeline("image-classification", model="{REPO}", trust_remote_code=True)' in text
    assert "import mirage_hf" in text and "t = 0.3" in text and "jpeg75" in text and "Limitations" in text
    # how T and t were chosen, and that the ranking metrics do not depend on them
    assert "120 real and 110 fake held-out training images" in text and "Platt's targets" in text
    assert "> calibration: the 230 held-out images are perfectly separated" in text
    assert "rank images by\nthe uncalibrated logit difference" in text
    assert "calibration " not in text.split("Robustness")[-1]  # the record is not a robustness condition


def test_staged_folders_hold_the_model_files_and_the_space(staged, model_dir):
    assert {p.name for p in model_dir.iterdir()} | {"README.md"} == {p.name for p in (staged / "model").iterdir()}
    space = SpaceCard.load(staged / "space" / "README.md").data
    assert space.sdk == "gradio" and space.app_file == "app.py" and space.models == [REPO] and space.title
    assert (staged / "space" / "app.py").is_file() and (staged / "space" / "mirage_hf" / "inference.py").is_file()
    assert {p.name for p in (staged / "space" / "examples").iterdir()} == {"synthetic-real.png", "synthetic-fake.png"}
    assert not list((staged / "space").rglob("__pycache__"))
    # the package copy beside app.py carries code only, not a second Space template or the training presets
    assert not (staged / "space" / "mirage_hf" / "space").exists()
    assert not (staged / "space" / "mirage_hf" / "configs").exists()


def test_licence_must_follow_the_training_data(model_dir, tmp_path):
    with pytest.raises(ValueError, match="non-commercial|cannot be licensed"):
        stage_model_repo(model_dir, tmp_path / "a", REPO, license="apache-2.0")
    results = dict(EVAL_RESULTS, eval_dataset="someone/photos")
    model = MiraGeForImageClassification.from_pretrained(model_dir)
    other = export_model(model, AutoImageProcessor.from_pretrained(model_dir), tmp_path / "m", results)
    with pytest.raises(ValueError, match="--license"):
        stage_model_repo(other, tmp_path / "b", REPO)
    card = ModelCard.load(stage_model_repo(other, tmp_path / "c", REPO, license="mit") / "model" / "README.md")
    assert card.data.license == "mit" and {r.dataset_type for r in card.data.eval_results} == {"someone/photos"}
    with pytest.raises(FileExistsError):
        stage_model_repo(other, tmp_path / "c", REPO, license="mit")


def test_staged_model_loads_as_remote_code_without_mirage_hf(staged, model_dir, tmp_path):
    paths = [str(tmp_path / f"{i}.png") for i in range(2)]
    for i, path in enumerate(paths):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(path)
    script = textwrap.dedent(
        f"""
        import json, sys
        from transformers import pipeline
        detector = pipeline("image-classification", model={str(staged / "model")!r}, trust_remote_code=True)
        assert "mirage_hf" not in sys.modules, "mirage_hf was imported"
        print(json.dumps(detector({paths!r})))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    local = pipeline("image-classification", model=str(model_dir))(paths)

    def scores(rows):
        return [{r["label"]: r["score"] for r in image} for image in rows]

    for got, want in zip(scores(remote), scores(local), strict=True):
        assert got == pytest.approx(want, abs=1e-5)


def test_staged_space_runs_on_its_own_copy_of_mirage_hf(staged, tmp_path):
    """The Space installs only requirements.txt: app.py must find the package copied beside it."""
    space_dir = str(staged / "space")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {space_dir!r})  # what `python app.py` does
        import app, mirage_hf
        assert mirage_hf.__file__.startswith({space_dir!r}), mirage_hf.__file__
        probabilities, verdict, _ = app.DetectorApp().detect(str(app.EXAMPLES[1]))
        assert sum(probabilities.values()) == 1.0, probabilities
        print(verdict)
        """
    )
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "MIRAGE_MODEL": str(staged / "model"),
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(("Likely", "Unsure"))


@pytest.fixture
def hub_calls(monkeypatch):
    """Records HfApi.create_repo / upload_folder; anything else would hit HF_HUB_OFFLINE and fail."""
    assert constants.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    calls = []
    for name in ("create_repo", "upload_folder"):
        monkeypatch.setattr(HfApi, name, lambda self, _name=name, **kwargs: calls.append((_name, kwargs)))
    return calls


def test_upload_creates_and_fills_the_model_repo_and_the_space(staged, hub_calls):
    upload(staged, REPO, SPACE, private=True)
    assert [(name, kw["repo_id"], kw["repo_type"]) for name, kw in hub_calls] == [
        ("create_repo", REPO, "model"),
        ("upload_folder", REPO, "model"),
        ("create_repo", SPACE, "space"),
        ("upload_folder", SPACE, "space"),
    ]
    assert hub_calls[2][1]["space_sdk"] == "gradio" and all(kw["private"] for _, kw in hub_calls[::2])
    assert hub_calls[1][1]["folder_path"] == str(staged / "model")
    assert hub_calls[3][1]["folder_path"] == str(staged / "space")


@pytest.mark.parametrize("dry_run", [True, False])
def test_cli_never_shows_or_writes_the_token(model_dir, tmp_path, hub_calls, capsys, dry_run):
    staging = tmp_path / "s"
    argv = ["--model_dir", str(model_dir), "--repo_id", REPO, "--space_repo_id", SPACE, "--staging_dir", str(staging)]
    main(argv + ["--dry_run"] * dry_run)
    out, err = capsys.readouterr()
    if dry_run:
        assert not hub_calls
        assert f"api.create_repo(repo_id='{SPACE}', repo_type='space', space_sdk='gradio'" in out
        assert f"api.upload_folder(repo_id='{REPO}', repo_type='model', folder_path='{staging / 'model'}'" in out
    else:
        assert len(hub_calls) == 4 and f"https://huggingface.co/spaces/{SPACE}" in out
    assert FAKE_TOKEN not in out + err
    assert not [p for p in staging.rglob("*") if p.is_file() and FAKE_TOKEN.encode() in p.read_bytes()]


@pytest.mark.parametrize("bad", ["no-owner", "you/a--b", "you/name/extra"])
def test_a_malformed_repo_id_is_a_usage_error_before_any_staging(model_dir, tmp_path, capsys, bad):
    with pytest.raises(SystemExit):
        main(["--model_dir", str(model_dir), "--repo_id", bad, "--staging_dir", str(tmp_path / "s"), "--dry_run"])
    assert f"{bad!r} is not a Hub repo id" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def onnx_staged(model_dir, tmp_path_factory):
    """The test detector exported to ONNX, with the int8 graph's results on the same data, staged."""
    import shutil

    from mirage_hf.onnx_export import export_onnx

    exported = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(model_dir, exported)
    export_onnx(exported)
    int8 = dict(EVAL_RESULTS, backend="onnx-int8", clean={name: metrics(acc - 0.01) for name, acc in SUBSETS.items()})
    (exported / "onnx" / "eval_results_onnx-int8.json").write_text(json.dumps(int8))
    return exported, stage_model_repo(exported, tmp_path_factory.mktemp("staged-onnx"), REPO)


def test_onnx_folder_is_uploaded_and_the_card_states_the_int8_cost(onnx_staged):
    exported, staged = onnx_staged
    assert sorted(p.name for p in (staged / "model" / "onnx").iterdir()) == sorted(
        p.name for p in (exported / "onnx").iterdir()
    )
    text = ModelCard.load(staged / "model" / "README.md").text
    assert "## ONNX Runtime" in text and f"--model {REPO} --backend onnx-int8" in text
    assert "| mean | 71.5 | 70.5 | -1.0 |" in text and "| ADM | 81.0 | 80.0 | -1.0 |" in text


def test_card_onnx_snippet_runs_without_torch_transformers_or_mirage_hf(onnx_staged, tmp_path):
    """The card's snippet, run as written (the Hub download answered from the staged folder) in a process where
    torch, transformers and mirage_hf cannot be imported, gives the int8 backend's p(fake)."""
    from mirage_hf.inference import Detector

    exported, staged = onnx_staged
    text = ModelCard.load(staged / "model" / "README.md").text
    snippet = text.split("## ONNX Runtime", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (45, 61, 3), dtype=np.uint8))
    image.save(tmp_path / "photo.jpg", quality=95)
    prelude = textwrap.dedent(
        f"""
        import sys
        for name in ("torch", "transformers", "mirage_hf"):
            sys.modules[name] = None  # any import of them fails
        import huggingface_hub
        huggingface_hub.snapshot_download = lambda *args, **kwargs: {str(staged / "model")!r}
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + snippet], check=False, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    label, p_fake = result.stdout.split()
    detector = Detector.from_pretrained(exported, backend="onnx-int8")
    expected = detector.p_fake([Image.open(tmp_path / "photo.jpg")])[0]
    assert float(p_fake) == pytest.approx(expected, abs=1e-4) and label == detector.verdict(expected).label
