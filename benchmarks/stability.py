#!/usr/bin/env python
"""What `--stability` changes on the robustness sweep: wrong confident verdicts, right verdicts turned unsure, time.

    python train.py && python benchmarks/stability.py       # the demo detector on the demo's test split

Each test image of the preset's evaluation split is degraded by each condition of the robustness sweep (clean,
JPEG 95/75/50/30, blur 1/2/3, downscale 0.5/0.25), and the degraded image is the input, as a re-posted file is.
It gets its plain verdict (the model's threshold and `mirage-detect`'s default unsure band, 0.05) and its
verdict with stability (`mirage_hf.stability`: the same, plus "unsure" when its re-saved, resized and cropped
copies fall on both sides of the threshold). Per condition, and pooled over all of them:
- wrong confident: the share of all images whose verdict is "real" or "fake" and wrong, plain and with stability;
- right made unsure: the share of the images with a right plain verdict that stability calls "unsure";
- unsure: the share called "unsure", plain and with stability;
- time ratio: wall time of scoring with stability over plain scoring of the same images, in the same run
  (preprocessing, the copies and the forward passes; images decoded beforehand), on `--threads` torch threads
  (default 1: on a shared machine, waits at multi-thread barriers would swamp the per-image cost).
"""

import argparse
import json
import os
import platform
import sys
import time
from datetime import date

import numpy as np
import torch

from mirage_hf.atomic import atomic_write
from mirage_hf.data_sources import load_split, resolve_dataset
from mirage_hf.evaluation import condition_name
from mirage_hf.inference import Detector
from mirage_hf.train_config import parse_args
from mirage_hf.transforms import ROBUSTNESS_SWEEP, degrade, open_image

UNSURE_MARGIN = 0.05  # mirage-detect's default


def timed_verdicts(detector, images, stability, batch_size):
    started = time.perf_counter()
    scores = np.concatenate(
        [detector.scores(images[i : i + batch_size], stability) for i in range(0, len(images), batch_size)]
    )
    return detector.verdicts(scores), time.perf_counter() - started


def shares(labels, plain, stable) -> dict:
    truth = np.where(labels == 1, "fake", "real")
    plain = np.array([v.label for v in plain])
    stable = np.array([v.label for v in stable])
    right = plain == truth
    return {
        "n": len(labels),
        "wrong_confident_plain": float(np.mean((plain != "unsure") & ~right)),
        "wrong_confident_stability": float(np.mean((stable != "unsure") & (stable != truth))),
        "right_made_unsure": float(np.sum(right & (stable == "unsure")) / max(1, right.sum())),
        "unsure_plain": float(np.mean(plain == "unsure")),
        "unsure_stability": float(np.mean(stable == "unsure")),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=os.path.join("outputs", "demo", "model"))
    parser.add_argument("--config", default="demo", help="the preset whose evaluation split is the test data")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results_stability.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not os.path.isdir(args.model):
        sys.exit(f"no detector at {args.model}: run `python train.py` first (or pass --model)")

    cfg = parse_args(["--config", args.config])
    data = load_split(cfg, resolve_dataset(cfg, cfg.eval_dataset or cfg.dataset), cfg.eval_split, cfg.eval_subsets,
                      cfg.max_eval_samples)  # fmt: skip
    images = [open_image(row["image"]) for row in data]
    labels = np.array(data["label"])
    detector = Detector.from_pretrained(args.model, device="cpu", unsure_margin=UNSURE_MARGIN)

    conditions = [("clean", None, None)] + [
        (condition_name(kind, value), kind, value) for kind, values in ROBUSTNESS_SWEEP.items() for value in values
    ]
    results, plain_all, stable_all, seconds = {}, [], [], {"plain": 0.0, "stability": 0.0}
    for name, kind, value in conditions:
        inputs = images if kind is None else [degrade(image, kind, value) for image in images]
        plain, plain_time = timed_verdicts(detector, inputs, False, args.batch_size)
        stable, stable_time = timed_verdicts(detector, inputs, True, args.batch_size)
        results[name] = {**shares(labels, plain, stable), "time_ratio": stable_time / plain_time}
        plain_all += plain
        stable_all += stable
        seconds["plain"] += plain_time
        seconds["stability"] += stable_time
    results["all"] = {
        **shares(np.tile(labels, len(conditions)), plain_all, stable_all),
        "time_ratio": seconds["stability"] / seconds["plain"],
    }

    print(f"{'condition':<12} {'n':>5}  wrong confident plain -> stability  right made unsure  unsure plain -> "
          "stability  time ratio")  # fmt: skip
    for name, row in results.items():
        print(
            f"{name:<12} {row['n']:>5}  {100 * row['wrong_confident_plain']:>14.1f}% -> {100 * row['wrong_confident_stability']:5.1f}%"
            f"  {100 * row['right_made_unsure']:>16.1f}%  {100 * row['unsure_plain']:>9.1f}% -> {100 * row['unsure_stability']:5.1f}%"
            f"  {row['time_ratio']:>9.2f}x"
        )
    report = {
        "command": "python benchmarks/stability.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
        f"thread(s), load average {os.getloadavg()[0]:.1f} at the end",
        "model": args.model,
        "threshold": detector.threshold,
        "unsure_margin": UNSURE_MARGIN,
        "seconds": seconds,
        "results": results,
    }
    with atomic_write(args.output) as staging, open(staging, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
