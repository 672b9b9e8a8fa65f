"""The wheel is what users get: built from the sources, installed outside the checkout, run from another directory.

Offline: the wheel is built without build isolation and installed without dependencies (this environment already
has them), into a target folder that holds the only `mirage_hf` on the path.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_EVAL_ARGS, TINY_TRAIN_ARGS
from huggingface_hub import SpaceCard

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv*", "outputs", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
)


def run(command, **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command[:3]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of the console scripts, environment whose only mirage_hf is the installed wheel)."""
    root = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, root / "source", ignore=NOT_SOURCES)  # a clean tree: no stale build/ leaks in
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(root / "dist"), str(root / "source")])
    (wheel,) = (root / "dist").glob("mirage_hf-*.whl")
    run([*pip, "install", "--no-deps", "--no-index", "--target", str(root / "site"), str(wheel)])
    env = {
        **os.environ,
        "PYTHONPATH": str(root / "site"),
        "HF_HOME": str(root / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    return root / "site", env


def test_the_wheel_ships_the_presets_and_finds_them_by_name_anywhere(installed, tmp_path):
    site, env = installed
    script = (
        "import json, mirage_hf; from mirage_hf.train_config import load_preset, preset_names; "
        "print(json.dumps([mirage_hf.__file__, preset_names(), load_preset('genimage_sd14')['train_subsets']]))"
    )
    location, names, subsets = json.loads(run([sys.executable, "-c", script], cwd=tmp_path, env=env))
    assert Path(location).is_relative_to(site)
    assert names == ["demo", "genimage_sd14", "ufd_progan"] and subsets == ["stable_diffusion_v_1_4"]
    (tmp_path / "mine.yaml").write_text("mode: coop\n")  # a user's own file still works, by path
    check = "from mirage_hf.train_config import load_preset; print(load_preset('mine.yaml'))"
    assert run([sys.executable, "-c", check], cwd=tmp_path, env=env).strip() == "{'mode': 'coop'}"


def test_the_wheel_ships_the_pretrained_tiny_clip_and_the_demo_finds_it(installed, tmp_path):
    site, env = installed
    script = (
        "import json; from mirage_hf.training import resolve_clip; from mirage_hf.train_config import parse_args; "
        "from mirage_hf.file_hashes import sha256_of_files; from pathlib import Path; p = Path(resolve_clip(parse_args([]))); "
        "print(json.dumps([str(p), sha256_of_files([p / 'model.safetensors'], with_names=False), json.loads((p / 'pretraining.json').read_text())['sha256']]))"
    )
    folder, actual, card = json.loads(run([sys.executable, "-c", script], cwd=tmp_path, env=env))
    assert Path(folder).is_relative_to(site) and actual == card


def test_mirage_train_mirage_eval_then_mirage_push_from_an_installed_wheel(installed, tmp_path):
    """A pip user's path: train the demo (tiny options) to an exported model, evaluate it, then stage its repo and
    Space."""
    site, env = installed
    run([str(site / "bin" / "mirage-train"), *TINY_TRAIN_ARGS, "--max_steps", "4"], cwd=tmp_path, env=env)
    model_dir = tmp_path / "outputs" / "demo" / "model"  # the demo preset's output_dir, relative to where it ran
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "eval_results.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    evaluate = [str(site / "bin" / "mirage-eval"), "--model", str(model_dir), "--output_dir", "eval", *TINY_EVAL_ARGS]
    assert run(evaluate, cwd=tmp_path, env=env).splitlines()[-1] == "results written to eval/eval_results.json"
    assert not (tmp_path / "eval" / "synthetic-data").exists()  # the training run's generated data, reused
    push = [str(site / "bin" / "mirage-push"), "--model_dir", str(model_dir), "--repo_id", "you/mirage-demo"]
    push += ["--space_repo_id", "you/mirage-demo-space", "--license", "apache-2.0", "--staging_dir", "staged"]
    printed = run([*push, "--dry_run"], cwd=tmp_path, env=env)
    assert "repo_type='space', space_sdk='gradio'" in printed
    space = tmp_path / "staged" / "space"
    assert SpaceCard.load(space / "README.md").data.models == ["you/mirage-demo"]
    assert {"app.py", "requirements.txt", "README.md", "examples", "mirage_hf"} == {p.name for p in space.iterdir()}
    assert (tmp_path / "staged" / "model" / "modeling_mirage.py").is_file()
    # the staged Space runs on its own copy of mirage_hf and scores one of its examples with the trained model
    detect = (
        "import app, mirage_hf; assert mirage_hf.__file__.startswith(app.__file__.rsplit('/', 1)[0]); "
        "probabilities, verdict, _ = app.DetectorApp().detect(str(app.EXAMPLES[0])); print(verdict)"
    )
    space_env = {**env, "PYTHONPATH": str(space), "MIRAGE_MODEL": str(tmp_path / "staged" / "model")}
    assert run([sys.executable, "-c", detect], cwd=space, env=space_env).startswith(("Likely", "Unsure"))


def test_the_wheel_ships_the_top_level_space_as_mirage_hf_space(installed, tmp_path):
    """One copy of the Space, `space/` in the checkout (as deployed); the wheel carries it as `mirage_hf.space`, and
    `python -m mirage_hf.space.app` finds it there from a directory far from the checkout."""
    site, env = installed
    assert not (ROOT / "mirage_hf" / "space").exists()

    def files_under(folder: Path) -> set[str]:
        return {
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
        }

    assert files_under(site / "mirage_hf" / "space") == files_under(ROOT / "space")
    script = "import runpy; app = runpy.run_module('mirage_hf.space.app'); print(app['__file__'], app['EXAMPLES'][0].is_file())"
    location, example_found = run([sys.executable, "-c", script], cwd=tmp_path, env=env).split()
    assert Path(location).is_relative_to(site / "mirage_hf" / "space") and example_found == "True"


def test_the_wheel_carries_the_licence_and_the_package_version(installed):
    site, _ = installed
    (dist_info,) = site.glob("mirage_hf-*.dist-info")
    import mirage_hf

    assert "Apache License" in (dist_info / "licenses" / "LICENSE").read_text()
    assert dist_info.name == f"mirage_hf-{mirage_hf.__version__}.dist-info"
