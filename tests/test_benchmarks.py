"""benchmarks/run.py on a tiny CLIP: every comparison the speed targets are stated in comes out of one run
(the ONNX Runtime rows included, at batch 1 and the profile's batch).

A GPU run gets one try on a lent machine, so its code paths (bf16 rows, the compiled path, the ratios, the JSON
report) are checked here on the CPU; only the CUDA-only sync check and GPU memory rows are left to that run.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TARGET_RATIOS = {
    "MiraGe / bare tower (fp32 SDPA)",
    "MiraGe / peer-style fp32 eager",
    "MiraGe bf16 / bare tower bf16",
    "MiraGe bf16 / peer-style fp32 eager",
    "compiled MiraGe / bare tower (same dtype)",
    "compiled MiraGe / peer-style fp32 eager",
    "data pipeline (most workers) / training step",
    "Space latency speed-up, onnx over torch",
    "Space latency speed-up, onnx-int8 over torch",
}
ONNX_RATIOS = [
    f"ONNX {graph} / {baseline}, batch {{batch}}"
    for graph in ("fp32", "int8")
    for baseline in ("PyTorch fp32 eager", "bare tower fp32")
]


@pytest.mark.slow
def test_benchmark_reports_every_target_ratio_from_one_run(tmp_path):
    output = tmp_path / "results.json"
    command = [sys.executable, "benchmarks/run.py", "--tiny", "--bf16", "--compile", "--output", str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads(output.read_text())
    batches = (1, report["batch"])
    assert set(report["ratios"]) == TARGET_RATIOS | {name.format(batch=b) for name in ONNX_RATIOS for b in batches}
    assert all(value > 0 for value in report["ratios"].values())
    assert report["skipped"] == {}, "the data rows ran here, where `datasets` works"
    steps = {"training step, prompts only, bf16", "training step, prompts only, bf16, activation checkpointing"}
    assert steps <= set(report["rows"])
    assert any(name.startswith("evaluation of") for name in report["rows"])
    latency = {f"single-image latency, tiny on CPU, backend {b} (ms)" for b in ("torch", "onnx", "onnx-int8")}
    assert latency <= set(report["rows"]) and report["onnxruntime"]


@pytest.mark.slow
def test_scan_benchmark_reports_rates_ratios_and_peak_rss(tmp_path):
    output = tmp_path / "scan.json"
    command = [sys.executable, "benchmarks/scan.py", "--images", "24", "--batch", "8", "--workers", "1",
               "--rss_files", "40", "80", "--ray", "1", "--output", str(output)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(output.read_text())["rows"]
    assert {"tiny detector, 0 workers, images/s", "tiny detector, 1 workers / 0 workers"} <= set(rows)
    assert {"Ray: starting a local cluster, s", "Ray 1 actors / best local scan"} <= set(rows)
    assert rows["peak RSS, 40 files, MiB"] > 50 and rows["peak RSS, 80 files, MiB"] > 50
    assert all(value > 0 for name, value in rows.items() if "growth" not in name)


@pytest.mark.slow
def test_adaptation_benchmark_reports_the_kshot_grid_and_one_timed_adaptation(tmp_path):
    from conftest import TINY_TRAIN_ARGS

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "run"
    train = [sys.executable, "train.py", *TINY_TRAIN_ARGS, "--max_steps", "4", "--train_subsets", "upsampler",
             "--output_dir", str(run)]  # fmt: skip
    subprocess.run(train, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    command = [sys.executable, "benchmarks/adapt_kshot.py", "--run", str(run), "--trained", "upsampler", "--shots",
               "4", "--seeds", "0", "--output", str(tmp_path / "kshot.json")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "kshot.json").read_text())
    assert report["generators"] == ["diffusion"]  # read from the detector's evaluation data, not typed
    assert {(row["method"], row["k"]) for row in report["rows"]} == {("anchor", 4), ("guarded", 4), ("plain", 4)}
    assert "| anchor | diffusion | 4 |" in result.stdout and "| guarded | diffusion | 4 |" in result.stdout

    command = [sys.executable, "benchmarks/adapt_kshot.py", "--timing", "--timing_model", "tiny", "--timing_steps",
               "2", "--threads", "1", "--output", str(tmp_path / "timing.json")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    timing = json.loads((tmp_path / "timing.json").read_text())["timing"]
    assert timing["steps"] == 2 and timing["peak_rss_mib"] > 50 and timing["adapt_seconds"] > 0
