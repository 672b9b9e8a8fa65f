#!/usr/bin/env python
"""The k-shot curve of `mirage-adapt` on the demo's world, and the cost of one adaptation on a CPU.

    python train.py && python benchmarks/adapt_kshot.py                 # the k-shot grid on outputs/demo
    python benchmarks/adapt_kshot.py --shots 8 --seeds 0 --methods anchor    # a quick look
    python benchmarks/adapt_kshot.py --timing                            # one adaptation of a ViT-B/16-sized model
    python benchmarks/adapt_kshot.py --timing --timing_method prompts    # the same with the prompts retrained
    # the grid in three processes, one per new generator, then one report:
    python benchmarks/adapt_kshot.py --generators banding --output /tmp/banding.json   # (and the others)
    python benchmarks/adapt_kshot.py --merge /tmp/banding.json /tmp/diffusion.json /tmp/gridder.json

The grid: the demo detector (`python train.py`, trained on the demo preset's `train_subsets`) is adapted to each
generator it was evaluated on but not trained on, with k fakes of that generator and k real images (both drawn
from the generated training split, `outputs/demo/synthetic-data/<generator>/train`), for each k and seed, by each
method: `anchor` (mirage-adapt's default: a fake anchor added for the new generator, trained alone), `guarded`
(`--method prompts`: the prompts retrained with the L2 penalty toward the detector's weights and distillation of its
scores on the reals) and `plain` (prompts, the same steps, learning rate and batches, both terms off). Everything is
measured on the detector's own evaluation data (its eval_results.json subsets, regenerated): the new generator's
accuracy, fake accuracy and AP, and every other generator's change in accuracy. The generator names come from the
detector's eval_results.json and the demo preset, so the script runs unchanged on another demo world.

`--timing`: one `mirage-adapt` run in a fresh process, as a user runs it, on a ViT-B/16-sized detector with random
weights (speed and memory do not depend on their values) at 224 px: 64 fake and 64 real JPEGs (512 x 384), a
reference set of 32 + 32, `--timing_steps` training steps; wall time, the adaptation's own time and peak RSS
(VmHWM). `--timing_model tiny` checks the script in seconds.
"""

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from peak_rss import run_with_peak_rss
from transformers.utils import logging as hf_logging

from mirage_hf.adaptation import AdaptOptions, adapt, base_eval_results, eval_subsets, image_rows
from mirage_hf.atomic import atomic_write
from mirage_hf.data import FAKE, REAL
from mirage_hf.demo.tiny import tiny_clip_config
from mirage_hf.train_config import load_preset

METHODS = {
    "anchor": {},  # mirage-adapt's defaults
    "guarded": {"method": "prompts"},
    "plain": {"method": "prompts", "anchor_weight": 0.0, "distill_weight": 0.0},
}


def sample(folder: Path, k: int, seed: int) -> list[Path]:
    files = sorted(folder.glob("*.png"))
    if len(files) < k:
        raise SystemExit(f"{folder} holds {len(files)} images, fewer than k = {k}")
    return sorted(random.Random(seed).sample(files, k))


def one_run(detector, data, generator, k, seed, method, trained):
    fakes = image_rows(sample(data / generator / "train" / "ai", k, seed), FAKE, "")
    reals = image_rows(sample(data / generator / "train" / "nature", k, seed + 1000), REAL, "")
    options = AdaptOptions(generator=generator, holdout=0.0, seed=seed, **METHODS[method])
    started = time.perf_counter()
    results = adapt(detector, fakes, reals, options, quiet=True, force=True).results  # any k, even below the minimum
    before, after = results["before"]["reference"], results["after"]["reference"]
    change = results["forgetting"]["change"]  # per old generator, per class
    old = {name: min(classes.values()) for name, classes in change.items()}  # the worst class
    return {
        "generator": generator, "k": k, "seed": seed, "method": method, "steps": results["options"]["steps"],
        "seconds": time.perf_counter() - started,
        "new": {key: {"before": before[generator][key], "after": after[generator][key]}
                for key in ("accuracy", "fake_accuracy", "real_accuracy", "average_precision")},
        "old_change": old,
        "trained_change": {name: old[name] for name in trained if name in old},
        "max_old_drop": max([0.0, *(-change for change in old.values())]),
        **{f"max_old_{key}_drop": max([0.0, *(-classes[key] for classes in change.values())])
           for key in ("real_accuracy", "fake_accuracy")},
        "refused": bool(results["refused"]),
    }  # fmt: skip


def summarise(runs) -> list[dict]:
    """Mean and spread over seeds per (method, generator, k)."""
    groups = {}
    for run in runs:
        groups.setdefault((run["method"], run["generator"], run["k"]), []).append(run)
    rows = []
    for (method, generator, k), members in groups.items():

        def stats(values):
            values = list(values)
            return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "values": values}

        rows.append({
            "method": method, "generator": generator, "k": k, "seeds": len(members),
            "new_accuracy": stats(100 * r["new"]["accuracy"]["after"] for r in members),
            "new_fake_accuracy": stats(100 * r["new"]["fake_accuracy"]["after"] for r in members),
            "new_ap": stats(100 * r["new"]["average_precision"]["after"] for r in members),
            "new_accuracy_before": 100 * members[0]["new"]["accuracy"]["before"],
            "new_fake_accuracy_before": 100 * members[0]["new"]["fake_accuracy"]["before"],
            "new_ap_before": 100 * members[0]["new"]["average_precision"]["before"],
            "trained_change": stats(statistics.fmean(r["trained_change"].values()) for r in members),
            "max_old_drop": stats(r["max_old_drop"] for r in members),
            **{key: stats(r[key] for r in members) for key in ("max_old_real_accuracy_drop", "max_old_fake_accuracy_drop")
               if all(key in r for r in members)},
            "refused": sum(r["refused"] for r in members),
        })  # fmt: skip
    return rows


def markdown(rows) -> str:
    def pm(stat):
        return f"{stat['mean']:.1f} ± {stat['std']:.1f}"

    lines = [
        "| method | new generator | k | acc before → after | fake acc before → after | AP before → after "
        "| trained generator, worst class change | largest real-acc drop, old | largest fake-acc drop, old | refused |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = tuple(METHODS)
    for row in sorted(rows, key=lambda r: (order.index(r["method"]), r["generator"], r["k"])):
        lines.append(
            f"| {row['method']} | {row['generator']} | {row['k']} | {row['new_accuracy_before']:.1f} → "
            f"{pm(row['new_accuracy'])} | {row['new_fake_accuracy_before']:.1f} → {pm(row['new_fake_accuracy'])} | "
            f"{row['new_ap_before']:.1f} → {pm(row['new_ap'])} | {row['trained_change']['mean']:+.1f} | "
            f"{row['max_old_real_accuracy_drop']['mean']:.1f} | {row['max_old_fake_accuracy_drop']['mean']:.1f} | "
            f"{row['refused']}/{row['seeds']} |"
        )
    return "\n".join(lines)


def machine() -> dict:
    return {
        "date": date.today().isoformat(), "platform": platform.platform(), "processor": platform.processor(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }  # fmt: skip


def kshot(args, output: Path) -> dict:
    detector = str(Path(args.run) / "model")
    data = Path(args.run) / "synthetic-data"
    eval_results = base_eval_results(detector)
    if eval_results is None or not data.is_dir():
        raise SystemExit(f"no demo run in {args.run}: run `python train.py` first")
    trained = args.trained or load_preset(args.preset)["train_subsets"]
    generators = [name for name in eval_subsets(eval_results) if name not in trained]
    if args.generators:  # one part of the grid (several processes share a machine's cores); --merge joins them
        generators = [name for name in generators if name in args.generators]
    report = {"command": " ".join(sys.argv), "machine": machine(), "trained": trained, "generators": generators,
              "rows": [], "runs": []}  # fmt: skip
    for generator in generators:
        for k in args.shots:
            for seed in args.seeds:
                for method in args.methods:  # paired: a cut-short run still compares the methods on the same draws
                    run = one_run(detector, data, generator, k, seed, method, trained)
                    report["runs"].append(run)
                    report["rows"] = summarise(report["runs"])
                    write_report(report, output)
                    print(
                        f"{method:8s} {generator:10s} k={k:4d} seed={seed}: fake acc "
                        f"{100 * run['new']['fake_accuracy']['before']:.1f} -> "
                        f"{100 * run['new']['fake_accuracy']['after']:.1f}, largest old drop "
                        f"{run['max_old_drop']:.1f}, {run['seconds']:.0f} s",
                        file=sys.stderr,
                    )
    print(markdown(report["rows"]))
    return report


def timing(args) -> dict:
    """One mirage-adapt run of a ViT-B/16-sized random detector, in a fresh process with `args.threads` threads."""
    sys.path.insert(0, str(Path(__file__).parent))
    from scan import VIT_B16, save_detector, write_jpegs

    clip_config, depth, model_name = {
        "vit-b16": (VIT_B16, 9, "ViT-B/16-sized MiraGe, random weights, 224 px, prompt depth 9"),
        "tiny": (tiny_clip_config(image_size=224, patch_size=32), 2, "tiny MiraGe (checks the script)"),
    }[args.timing_model]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        detector = save_detector(clip_config, scratch / "detector", prompt_depth=depth)
        for name, count, size in (
            ("fakes", 64, (512, 384)),
            ("reals", 64, (384, 512)),
            ("reference/0_real", 32, (384, 512)),
            ("reference/1_fake", 32, (512, 384)),
        ):
            write_jpegs(scratch / name, count, size, distinct=count)  # one seed: fakes and reals differ by shape
        log = scratch / "adapt.log"
        adapt_args = [detector, "--fakes", scratch / "fakes", "--reals", scratch / "reals", "--reference",
                      scratch / "reference", "--steps", args.timing_steps, "--output", scratch / "adapter", "--force",
                      "--method", args.timing_method]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        with open(log, "w") as handle:
            code, peak_mib = run_with_peak_rss(
                "mirage_hf.adaptation", adapt_args, env=env, stdout=handle, stderr=subprocess.STDOUT
            )
        if code != 0:
            raise SystemExit(f"mirage-adapt exited with {code}:\n{log.read_text()[-3000:]}")
        wall = time.perf_counter() - started
        results = json.loads((scratch / "adapter" / "adapt_results.json").read_text())
        adapter_mib = (scratch / "adapter" / "mirage_adapter.safetensors").stat().st_size / 2**20
    steps = results["options"]["steps"]
    row = {
        "model": model_name, "threads": args.threads, "method": args.timing_method,
        "images": "64 fakes (512 x 384 JPEG) + 64 reals (384 x 512), reference 32 + 32", "steps": steps,
        "batch_size": results["options"]["batch_size"], "wall_seconds": wall,
        "adapt_seconds": results["seconds"], "peak_rss_mib": peak_mib, "adapter_mib": adapter_mib,
        "adapter_fraction": results["adapter_fraction"],
        "default_steps_for_64_fakes": AdaptOptions().resolved_steps(int(64 * (1 - AdaptOptions().holdout))),
    }  # fmt: skip
    print(json.dumps(row, indent=2))
    return {"command": " ".join(sys.argv), "machine": machine(), "timing": row}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="outputs/demo", help="the demo's output folder (default outputs/demo)")
    parser.add_argument("--preset", default="demo", help="the preset that trained it (its train_subsets)")
    parser.add_argument("--trained", nargs="+", help="the generators it was trained on (default: the preset's)")
    parser.add_argument("--shots", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--generators", nargs="+", help="only these new generators (one part of the grid)")
    parser.add_argument("--merge", nargs="+", metavar="REPORT", help="join the reports of parts of the grid")
    parser.add_argument("--timing", action="store_true", help="time one ViT-B/16-sized adaptation instead")
    parser.add_argument("--timing_steps", type=int, default=10, help="training steps of the timed run")
    parser.add_argument("--timing_model", choices=("vit-b16", "tiny"), default="vit-b16")
    parser.add_argument("--timing_method", choices=AdaptOptions.METHODS, default=AdaptOptions().method,
                        help="--method of the timed run (default: mirage-adapt's)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the timed run (default 2)")
    parser.add_argument("--output", help="JSON report (default benchmarks/results_adapt_kshot.json, or "
                        "benchmarks/results_adapt_timing.json with --timing)")  # fmt: skip
    return parser.parse_args(argv)


def merge(parts: list[str]) -> dict:
    """One report from the reports of parts of the grid (`--generators`), its rows recomputed from their runs."""
    reports = [json.loads(Path(part).read_text()) for part in parts]
    runs = [run for report in reports for run in report["runs"]]
    merged = {**reports[0], "command": [report["command"] for report in reports], "runs": runs}
    merged["generators"] = list(dict.fromkeys(g for report in reports for g in report["generators"]))
    merged["machine"] = [report["machine"] for report in reports]
    merged["rows"] = summarise(runs)
    print(markdown(merged["rows"]))
    return merged


def write_report(report: dict, output: Path) -> None:
    with atomic_write(output) as staging:
        staging.write_text(json.dumps(report, indent=2) + "\n")


def main(argv=None):
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    default = "results_adapt_timing.json" if args.timing else "results_adapt_kshot.json"
    output = Path(args.output or Path(__file__).parent / default)
    if args.merge:
        report = merge(args.merge)
    else:
        report = timing(args) if args.timing else kshot(args, output)
    write_report(report, output)
    print(f"written to {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
