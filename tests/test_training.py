"""train.py end to end on tiny generated data: learning, exact resume, evaluation, calibration, export."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_ARGS as TINY
from transformers import pipeline

from mirage_hf import MiraGeForImageClassification
from mirage_hf.training import main

pytestmark = pytest.mark.slow


def run(tmp_path, *extra) -> dict:
    return main(["--config", "demo", "--output_dir", str(tmp_path), *TINY, *extra])


def trainable_state(output_dir):
    model = MiraGeForImageClassification.from_pretrained(output_dir / "model")
    return {k: v for k, v in model.state_dict().items() if k.startswith("prompt_learner.")}


def test_training_exports_a_pipeline_model_and_per_generator_results(tmp_path, capsys):
    results = run(tmp_path, "--max_steps", "4", "--train_subsets", "upsampler")
    assert set(results["clean"]) == {"upsampler", "diffusion", "mean", "all"}
    assert results["clean"]["upsampler"]["n"] == 16
    written = json.loads((tmp_path / "eval_results.json").read_text())
    assert written["clean"]["mean"]["accuracy"] == pytest.approx(results["clean"]["mean"]["accuracy"])
    assert written["synthetic"]["n_val_per_class"] == 8  # how to regenerate the test data (mirage-adapt)
    printed = capsys.readouterr().out
    assert "upsampler" in printed and "mean" in printed
    detector = pipeline("image-classification", model=str(tmp_path / "model"))
    from PIL import Image

    scores = detector(Image.new("RGB", (20, 20), "gray"))
    assert {row["label"] for row in scores} == {"real", "fake"}
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["decision_threshold"] == pytest.approx(results["threshold"])
    assert config["prompt_depth"] == 2 and config["memory_bank_size"] == 32  # model options reach from_clip
    assert (tmp_path / "model" / "eval_results.json").exists()


def test_rerunning_in_the_same_folder_gives_the_same_numbers(tmp_path):
    """The second run finds the tiny CLIP and the generated data already written, and still starts from the same
    seed: the same weights and the same results."""
    first = run(tmp_path, "--max_steps", "3")
    first_state = trainable_state(tmp_path)
    second = run(tmp_path, "--max_steps", "3")
    assert second == first
    for name, value in trainable_state(tmp_path).items():
        torch.testing.assert_close(value, first_state[name], rtol=0, atol=0, msg=name)


def test_the_test_split_never_influences_temperature_threshold_or_weights(tmp_path):
    """The oracle-threshold check: identical training data, evaluated three times on its test split, and the same
    again on that split with every label swapped. Anything chosen on the test split would flip; the exported
    checkpoint, temperature and threshold must be identical, because they come from held-out training images."""
    import shutil

    from mirage_hf.synthetic import make_synthetic_genimage

    root = make_synthetic_genimage(
        tmp_path / "data", generators=["upsampler"], n_train_per_class=120, n_val_per_class=8, image_size=16
    )
    swapped = tmp_path / "swapped"
    shutil.copytree(root / "upsampler" / "val" / "ai", swapped / "real")
    shutil.copytree(root / "upsampler" / "val" / "nature", swapped / "fake")
    args = ["--dataset", f"genimage:{root}", "--max_steps", "6", "--eval_every", "2", "--calibration_holdout", "0.2"]
    honest = run(tmp_path / "a", *args)
    swapped = run(tmp_path / "b", *args, "--eval_dataset", str(swapped), "--eval_split", "train")
    assert honest["clean"]["all"]["accuracy"] == pytest.approx(1 - swapped["clean"]["all"]["accuracy"])
    assert honest["calibration"]["fitted"] and honest["calibration"]["n_real"] == honest["calibration"]["n_fake"] == 24
    assert honest["calibration"] == swapped["calibration"]
    assert (honest["temperature"], honest["threshold"]) == (swapped["temperature"], swapped["threshold"])
    a, b = trainable_state(tmp_path / "a"), trainable_state(tmp_path / "b")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_interrupted_training_resumes_to_the_same_parameters(tmp_path, monkeypatch, caplog):
    import mirage_hf.training as training

    args = ["--max_steps", "6", "--save_every", "2", "--calibrate", "null"]
    straight = run(tmp_path / "straight", *args)

    real_save = training.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(accelerator, output_dir, progress, total_limit):
        real_save(accelerator, output_dir, progress, total_limit)
        if progress["global_step"] == 4:
            raise Killed

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        run(tmp_path / "resumed", *args)
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    resumed = run(tmp_path / "resumed", *args, "--resume_from_checkpoint", "latest")
    assert "resumed from step 4" in caplog.text

    a, b = trainable_state(tmp_path / "straight"), trainable_state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert resumed["clean"]["mean"] == straight["clean"]["mean"]


def test_loss_terms_are_logged_every_log_every_steps_as_window_means(tmp_path, monkeypatch):
    from accelerate import Accelerator

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **_: logged.append((step, values)))
    run(tmp_path, "--max_steps", "5", "--log_every", "2", "--eval_every", "5", "--calibrate", "null")
    train_logs = [(step, values) for step, values in logged if "train/loss" in values]
    assert [step for step, _ in train_logs] == [2, 4, 5]  # the last, shorter window is logged too
    for _, values in train_logs:
        assert {"train/loss", "train/loss_ce", "train/loss_supcon", "train/lr"} <= values.keys()
        assert all(math.isfinite(value) for value in values.values())


def test_loss_window_averages_each_term_over_its_steps_then_starts_over():
    from mirage_hf.training import LossWindow

    window = LossWindow()
    window.add({"loss": torch.tensor(1.0), "loss_ce": torch.tensor(0.5), "logits": torch.zeros(2, 2)})
    window.add({"loss": torch.tensor(3.0), "loss_ce": torch.tensor(1.5), "loss_sep": None})
    assert window.pop_means() == {"loss": 2.0, "loss_ce": 1.0}
    assert window.steps == 0 and window.sums == {}


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    args = ["--max_steps", "4", "--save_every", "2", "--checkpoints_total_limit", "3", "--calibrate", "null"]
    run(tmp_path, *args)
    checkpoints = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [p.name for p in checkpoints] == ["step_00000002", "step_00000004"]
    (checkpoints[-1] / "model.safetensors").write_bytes(b"truncated")
    run(tmp_path, *args, "--resume_from_checkpoint", "latest")
    assert "step_00000004 is unreadable" in caplog.text
    assert "resumed from step 2" in caplog.text


def test_eval_only_with_the_robustness_sweep(tmp_path):
    run(tmp_path / "train", "--max_steps", "2")
    results = main([
        "--eval_only", "--model", str(tmp_path / "train" / "model"), "--output_dir", str(tmp_path / "eval"),
        "--dataset", f"genimage:{tmp_path / 'train' / 'synthetic-data'}", "--robustness", "--num_workers", "0",
    ])  # fmt: skip
    assert {"clean", "jpeg95", "jpeg30", "blur3", "downscale0.25"} <= set(results)
    assert (tmp_path / "eval" / "eval_results.json").exists()


def test_the_preprocessing_a_model_was_calibrated_with_is_stored_and_scores_it_by_default(tmp_path):
    run(tmp_path / "train", "--max_steps", "2", "--eval_preprocess", "center_crop")
    model_dir = tmp_path / "train" / "model"
    assert json.loads((model_dir / "config.json").read_text())["preprocess"] == "center_crop"
    run(tmp_path / "resize", "--max_steps", "2", "--eval_preprocess", "resize")
    assert json.loads((tmp_path / "resize" / "model" / "config.json").read_text())["preprocess"] == "resize"
    evaluate = [
        "--eval_only", "--model", str(model_dir), "--dataset", f"genimage:{tmp_path / 'train' / 'synthetic-data'}",
        "--num_workers", "0", "--max_eval_samples", "8",
    ]  # fmt: skip
    # The README's command: no --config, no --eval_preprocess -> the model's own, not a preset's.
    assert main([*evaluate, "--output_dir", str(tmp_path / "e1")])["preprocess"] == "center_crop"
    overridden = main([*evaluate, "--output_dir", str(tmp_path / "e2"), "--eval_preprocess", "resize"])
    assert overridden["preprocess"] == "resize"


def test_without_the_hub_a_real_preset_says_in_one_line_which_clip_and_how_to_point_at_a_folder(tmp_path):
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    command = [sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"), "--config", "genimage_sd14"]
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'openai/clip-vit-large-patch14'" in lines[0]
    assert "--clip_model /path/to/clip-vit-large-patch14" in lines[0]


def test_checkpoints_hold_only_what_trains_and_refuse_another_clip(tmp_path):
    from safetensors.torch import load_file

    from mirage_hf.checkpoints import FrozenBaseMismatch
    from mirage_hf.tiny import save_tiny_clip

    args = ["--max_steps", "2", "--save_every", "2", "--calibrate", "null"]
    run(tmp_path, *args)
    checkpoint = tmp_path / "checkpoints" / "step_00000002"
    saved = load_file(checkpoint / "model.safetensors")
    exported = load_file(tmp_path / "model" / "model.safetensors")
    trained = {key for key in saved if "lora_" in key or "prompt_learner." in key}
    assert trained and {key for key in saved if "memory_bank." in key}  # what trains, and the bank
    assert set(saved) == trained | {key for key in saved if "memory_bank." in key}  # nothing else
    assert sum(t.numel() for t in saved.values()) < 0.2 * sum(t.numel() for t in exported.values())
    fingerprint = json.loads((checkpoint / "frozen_base.json").read_text())
    assert fingerprint["clip_model"] == str(tmp_path / "tiny-clip") and len(fingerprint["sha256"]) == 64

    import yaml

    tiny_options = yaml.safe_load(TINY[TINY.index("--tiny_clip") + 1])
    save_tiny_clip(tmp_path / "tiny-clip", seed=1, **tiny_options)  # another CLIP under the same name
    with pytest.raises(FrozenBaseMismatch, match="trained on the CLIP .* resume with --clip_model"):
        run(tmp_path, "--max_steps", "4", *args[2:], "--resume_from_checkpoint", "latest")


def test_the_demo_recipe_learns_its_training_generator(tmp_path):
    """The README's claim, on a smaller budget: the tiny CLIP + prompts + LoRA reaches >= 0.90 in-distribution."""
    results = main([
        "--config", "demo", "--output_dir", str(tmp_path), "--max_steps", "150", "--eval_every", "150",
        "--synthetic", "{generators: [upsampler, banding], n_train_per_class: 300, n_val_per_class: 50, image_size: 32}",
    ])  # fmt: skip
    assert results["clean"]["upsampler"]["accuracy"] >= 0.9
    assert (
        results["clean"]["upsampler"]["fake_accuracy"] >= 0.9 and results["clean"]["upsampler"]["real_accuracy"] >= 0.9
    )


def test_corrupt_images_are_reported_by_path_and_skipped(tmp_path, caplog):
    from mirage_hf.synthetic import make_synthetic_genimage

    root = make_synthetic_genimage(
        tmp_path / "data", generators=["upsampler"], n_train_per_class=20, n_val_per_class=6, image_size=16
    )
    (root / "upsampler" / "train" / "ai" / "broken.png").write_bytes(b"not an image at all")
    (root / "upsampler" / "val" / "nature" / "empty.png").write_bytes(b"")
    results = run(tmp_path / "out", "--dataset", f"genimage:{root}", "--max_steps", "6", "--calibrate", "null")
    assert results["bad_images"] == 1 and results["clean"]["all"]["n"] == 12
    assert "broken.png" in caplog.text


def test_two_process_training_through_accelerate_launch_scores_each_sample_once(tmp_path):
    """DDP on 2 CPU processes (gloo): training runs, and every evaluation image is counted exactly once."""
    import subprocess

    from mirage_hf.synthetic import make_synthetic_genimage

    root = make_synthetic_genimage(
        tmp_path / "data", generators=["upsampler"], n_train_per_class=16, n_val_per_class=5, image_size=16
    )
    extra = next((root / "upsampler" / "val" / "nature").glob("*.png"))
    (extra.parent / "extra.png").write_bytes(extra.read_bytes())  # 11 images: an odd count cannot split evenly
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "train.py", "--config", "demo",
        "--output_dir", str(tmp_path / "out"), "--dataset", f"genimage:{root}", *TINY, "--max_steps", "3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        command, cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    written = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert written["clean"]["all"]["n"] == 11
    assert written["clean"]["all"]["n_real"] == 6


def test_the_ablation_ladder_trains_every_rung_and_prints_one_table(tmp_path, capsys):
    from mirage_hf.ladder import run_ladder

    results = run_ladder(
        ["--config", "demo", "--output_dir", str(tmp_path), *TINY, "--max_steps", "2", "--calibrate", "null"]
    )
    assert list(results) == ["zero_shot", "linear_probe", "coop", "maple", "mirage"]
    printed = capsys.readouterr().out
    assert "ablation ladder: accuracy" in printed and all(mode in printed for mode in results)
    assert json.loads((tmp_path / "ladder_results.json").read_text())["mirage"]["clean"]["mean"]["n"] > 0


def test_ufd_layout_in_bf16(tmp_path):
    """The UFD protocol's code path (<set>/<class>/{0_real,1_fake}) with bf16 autocast on CPU."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, folder in enumerate(["0_real", "1_fake"]):
            directory = tmp_path / "ufd" / split / "progan" / "car" / folder
            directory.mkdir(parents=True)
            for i in range(12):
                pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) // (1 + label)
                Image.fromarray(pixels).save(directory / f"{i}.png")
    results = run(
        tmp_path / "out", "--dataset", f"ufd:{tmp_path / 'ufd'}", "--eval_split", "test", "--max_steps", "3",
        "--mixed_precision", "bf16", "--train_subsets", "null",
    )  # fmt: skip
    assert results["clean"]["progan"]["n"] == 24
