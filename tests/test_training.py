"""train.py end to end on tiny generated data: learning, exact resume, evaluation, calibration, export."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_EVAL_ARGS, killed_after_checkpoint
from conftest import TINY_TRAIN_ARGS as TINY
from transformers import pipeline

from mirage_hf import MiraGeForImageClassification, evaluate_model
from mirage_hf.train_config import parse_args
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

    from mirage_hf.demo.synthetic import make_synthetic_genimage

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
    args = ["--max_steps", "6", "--save_every", "2", "--calibrate", "null"]
    straight = run(tmp_path / "straight", *args)
    with killed_after_checkpoint(monkeypatch, step=4):
        run(tmp_path / "resumed", *args)
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
    from mirage_hf.engine import LossWindow

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


def test_mirage_eval_with_the_robustness_sweep_on_the_generated_data_the_model_was_trained_with(tmp_path):
    run(tmp_path / "train", "--max_steps", "2")
    results = evaluate_model.main([
        "--config", "demo", "--output_dir", str(tmp_path / "eval"), *TINY_EVAL_ARGS,
        "--model", str(tmp_path / "train" / "model"), "--robustness",
    ])  # fmt: skip  # the README's form: the demo preset, another output folder
    assert {"clean", "jpeg95", "jpeg30", "blur3", "downscale0.25"} <= set(results)
    assert results["clean"]["all"]["n"] == 32 and (tmp_path / "eval" / "eval_results.json").exists()
    assert not (tmp_path / "eval" / "synthetic-data").exists()  # the training run's copy, not a new one


def test_the_preprocessing_a_model_was_calibrated_with_is_stored_and_scores_it_by_default(tmp_path):
    run(tmp_path / "train", "--max_steps", "2", "--eval_preprocess", "center_crop")
    model_dir = tmp_path / "train" / "model"
    assert json.loads((model_dir / "config.json").read_text())["preprocess"] == "center_crop"
    run(tmp_path / "resize", "--max_steps", "2", "--eval_preprocess", "resize")
    assert json.loads((tmp_path / "resize" / "model" / "config.json").read_text())["preprocess"] == "resize"
    evaluate = [
        "--model", str(model_dir), "--dataset", f"genimage:{tmp_path / 'train' / 'synthetic-data'}",
        "--num_workers", "0", "--max_eval_samples", "8",
    ]  # fmt: skip
    # The README's command: no --config, no --eval_preprocess -> the model's own, not a preset's.
    assert evaluate_model.main([*evaluate, "--output_dir", str(tmp_path / "e1")])["preprocess"] == "center_crop"
    overridden = evaluate_model.main([*evaluate, "--output_dir", str(tmp_path / "e2"), "--eval_preprocess", "resize"])
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
    from mirage_hf.demo.tiny import save_tiny_clip

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


def test_prompt_only_training_on_the_shipped_clip_meets_the_in_distribution_bar(tmp_path):
    """The demo recipe on a smaller budget (pretrained tiny CLIP frozen, prompts only, no LoRA) calls at least 95% of
    its training generator's held-out reals and fakes right, and ranks an unseen generator of another family
    (`banding`) at ROC AUC >= 0.95. The backbone already knows most of this zero-shot (ladder, README): training the
    prompts must keep it, not lose it."""
    assert parse_args(["--config", "demo"]).lora_r == 0
    results = main([
        "--config", "demo", "--output_dir", str(tmp_path), "--max_steps", "150", "--eval_every", "150",
        "--synthetic", "{generators: [upsampler, banding], n_train_per_class: 300, n_val_per_class: 50, image_size: 32}",
    ])  # fmt: skip
    upsampler, banding = results["clean"]["upsampler"], results["clean"]["banding"]
    assert min(upsampler["fake_accuracy"], upsampler["real_accuracy"]) >= 0.95
    assert banding["roc_auc"] >= 0.95


def test_corrupt_images_are_reported_by_path_and_skipped(tmp_path, caplog):
    from mirage_hf.demo.synthetic import make_synthetic_genimage

    root = make_synthetic_genimage(
        tmp_path / "data", generators=["upsampler"], n_train_per_class=20, n_val_per_class=6, image_size=16
    )
    (root / "upsampler" / "train" / "ai" / "broken.png").write_bytes(b"not an image at all")
    (root / "upsampler" / "val" / "nature" / "empty.png").write_bytes(b"")
    results = run(tmp_path / "out", "--dataset", f"genimage:{root}", "--max_steps", "6", "--calibrate", "null")
    assert results["bad_images"] == 1 and results["clean"]["all"]["n"] == 12
    assert "broken.png" in caplog.text


# train.py under `accelerate launch`, recording per rank the world size and the files it trained on and scored.
RECORDING_TRAIN_PY = """
import json, sys
from accelerate import PartialState
from mirage_hf import evaluate_model, evaluation, training

seen = {"train": [], "eval": []}
train_collate, shard = training.SeededCollator.__call__, evaluation._shard

def record_train(self, rows):
    seen["train"] += [row["image"]["path"] for row in rows]
    return train_collate(self, rows)

def record_eval(dataset, accelerator):
    part = shard(dataset, accelerator)
    seen["eval"].append([image["path"] for image in part["image"]])
    return part

training.SeededCollator.__call__, evaluation._shard = record_train, record_eval
{"train": training.main, "eval": evaluate_model.main}[sys.argv[2]](sys.argv[3:])
state = PartialState()  # the state the run set up
with open(f"{sys.argv[1]}.rank{state.process_index}.json", "w") as record:
    json.dump({"world_size": state.num_processes, **seen}, record)
"""


def launch_two_processes(tmp_path, record: Path, command: str, *args) -> list[dict]:
    """`accelerate launch --multi_gpu` with 2 processes of mirage-train or mirage-eval (`command`: train or eval;
    torchrun underneath, gloo on CPU, as the scan test does); returns what each rank recorded."""
    import subprocess

    script = tmp_path / "recording_train.py"
    script.write_text(RECORDING_TRAIN_PY)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", str(script), str(record), command, *map(str, args),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        command, cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(Path(f"{record}.rank{rank}.json").read_text()) for rank in range(2)]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_training_and_mirage_eval_each_rank_on_its_own_shard(tmp_path):
    """DDP on 2 CPU processes (gloo): each rank trains on its own batches and scores its own part of the test set,
    and every evaluation image is counted exactly once; the same for mirage-eval."""
    from mirage_hf.demo.synthetic import make_synthetic_genimage

    root = make_synthetic_genimage(
        tmp_path / "data", generators=["upsampler"], n_train_per_class=40, n_val_per_class=5, image_size=16
    )
    extra = next((root / "upsampler" / "val" / "nature").glob("*.png"))
    (extra.parent / "extra.png").write_bytes(extra.read_bytes())  # 11 images: an odd count cannot split evenly
    val_files = sorted(str(path) for path in (root / "upsampler" / "val").rglob("*.png"))
    data = ["--dataset", f"genimage:{root}", *TINY]

    # one epoch of 72 training images (80 less 8 held out for calibration): 4 steps of 2 x 8 images
    ranks = launch_two_processes(
        tmp_path, tmp_path / "train", "train", "--config", "demo", "--output_dir", tmp_path / "out", *data,
        "--max_steps", "None", "--num_epochs", "1", "--eval_every", "2",
    )  # fmt: skip
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    trained = [rank["train"] for rank in ranks]
    assert [len(files) for files in trained] == [4 * 8, 4 * 8]
    assert len(set(trained[0]) | set(trained[1])) == 64  # no image on both ranks
    # every pass over the test set (steps 2 and 4, final) or the held-out images: each rank scores its own part
    passes = [first + second for first, second in zip(ranks[0]["eval"], ranks[1]["eval"], strict=True)]
    assert all(len(set(both)) == len(both) for both in passes)
    assert [sorted(both) == val_files for both in passes].count(True) == 3
    written = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert written["clean"]["all"]["n"] == 11 and written["clean"]["all"]["n_real"] == 6

    args = ["--model", tmp_path / "out" / "model", "--output_dir", tmp_path / "eval", "--dataset", f"genimage:{root}"]
    ranks = launch_two_processes(tmp_path, tmp_path / "eval_only", "eval", *args, *TINY_EVAL_ARGS)
    assert [rank["world_size"] for rank in ranks] == [2, 2] and not ranks[0]["train"] and not ranks[1]["train"]
    (first,), (second,) = ranks[0]["eval"], ranks[1]["eval"]
    assert sorted(first + second) == val_files and {len(first), len(second)} == {5, 6}
    written = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert written["clean"]["all"]["n"] == 11


def test_the_ablation_ladder_trains_every_rung_on_each_seed_and_prints_mean_and_spread(tmp_path, capsys):
    """One table of five rungs with mean ± sd over seeds, each exported model trained as its mode says: no prompts
    (zero_shot), a linear head (linear_probe), the shallow context only (coop), deep prompts (maple, mirage), and
    mirage's loss moving its prompts elsewhere than maple's cross-entropy from the same start."""
    from mirage_hf.ladder import run_ladder

    results = run_ladder([
        "--config", "demo", "--output_dir", str(tmp_path), *TINY, "--max_steps", "2", "--calibrate", "null",
        "--seeds", "0", "1",
    ])  # fmt: skip
    assert list(results) == ["zero_shot", "linear_probe", "coop", "maple", "mirage"]
    printed = capsys.readouterr().out
    assert "ablation ladder: accuracy (mean ± sd over seeds [0, 1])" in printed
    assert all(mode in printed for mode in results) and " ± " in printed.splitlines()[-1]
    runs = results["mirage"]["seeds"]
    accuracies = [runs[seed]["clean"]["mean"]["accuracy"] for seed in (0, 1)]
    assert results["mirage"]["clean"]["mean"]["accuracy"] == pytest.approx(
        [np.mean(accuracies), np.std(accuracies, ddof=1)]
    )
    assert (tmp_path / "seed1" / "synthetic-data").is_dir() and not (
        tmp_path / "seed1" / "mirage" / "synthetic-data"
    ).exists()
    assert json.loads((tmp_path / "ladder_results.json").read_text())["mirage"]["seeds"]["1"]["clean"]["mean"]["n"] > 0

    models = {
        mode: MiraGeForImageClassification.from_pretrained(tmp_path / "seed0" / mode / "model") for mode in results
    }
    assert [model.config.mode for model in models.values()] == list(results)
    assert [len(model.prompt_learner.text_prompts) for model in models.values()] == [0, 0, 1, 2, 2]
    assert [model.classifier is not None for model in models.values()] == [False, True, False, False, False]
    for mode in ("coop", "maple", "mirage"):
        learner = models[mode].prompt_learner
        words = learner.token_ids[0, 1 : 1 + models[mode].config.n_ctx]  # the context starts as these words
        start = models[mode].clip.text_model.embeddings.token_embedding(words)
        assert not torch.allclose(learner.text_prompts[0], start), f"{mode} did not train its context"
    maple, mirage = (models[mode].prompt_learner.state_dict() for mode in ("maple", "mirage"))
    assert all(not torch.equal(maple[key], mirage[key]) for key in maple), "mirage trained like maple"


def test_ufd_layout_in_bf16(tmp_path, monkeypatch):
    """The UFD protocol's code path (<set>/<class>/{0_real,1_fake}) with bf16 autocast on CPU: every training
    forward computes the encoder layers in bfloat16."""
    from PIL import Image

    import mirage_hf.training as training
    from mirage_hf.parameters import mirage_core

    dtypes = []
    build_model = training.build_model

    def build_and_watch(cfg, clip_path):
        model = build_model(cfg, clip_path)
        core = mirage_core(model)
        core.clip.vision_model.encoder.layers[0].mlp.register_forward_hook(
            lambda module, args, output: dtypes.append(output.dtype) if core.training else None
        )
        return model

    monkeypatch.setattr(training, "build_model", build_and_watch)
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
    assert dtypes == [torch.bfloat16] * 3  # one training forward per step
