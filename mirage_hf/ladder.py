"""The ablation ladder: train every rung (zero_shot ... mirage) on the same data and compare them.

    python -m mirage_hf.ladder --config genimage_sd14 [--seeds 0 1 2] [any train.py override]

Each rung trains into <output_dir>/<mode> (with several seeds: <output_dir>/seed<s>/<mode>) with identical data,
schedule and seed; the generated demo data is made once per seed and shared by the rungs. The tables at the end
have one column per rung (mean over generators in the last rows; with several seeds, mean ± standard deviation
over seeds in each cell) and are saved as <output_dir>/ladder_results.json.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .configuration_mirage import MIRAGE_MODES
from .data_sources import resolve_dataset
from .metrics import format_comparison_table
from .train_config import parse_args
from .training import train

METRICS = ("accuracy", "average_precision", "roc_auc")


def summarise_seeds(runs: list[dict]) -> dict:
    """Per subset and metric, [mean, standard deviation] over the seeds' per-subset results."""
    return {
        subset: {
            metric: [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]
            for metric in runs[0][subset]
            for values in [[run[subset][metric] for run in runs]]
            if all(isinstance(value, float) for value in values)
        }
        for subset in runs[0]
    }


def ladder_tables(results: dict) -> str:
    """One table per metric, a column per rung, from `run_ladder`'s results (its ladder_results.json)."""
    seeds = [int(s) for s in next(iter(results.values())).get("seeds", {})]
    tables = []
    for metric in METRICS:
        title = f"ablation ladder: {metric}" + (f" (mean ± sd over seeds {seeds})" if seeds else "")
        tables.append(format_comparison_table({m: r["clean"] for m, r in results.items()}, metric=metric, title=title))
    return "\n".join(tables)


def run_ladder(argv: list[str]) -> dict:
    seeds_option = argparse.ArgumentParser(add_help=False)
    seeds_option.add_argument("--seeds", type=int, nargs="+", help="train every rung once per seed")
    known, argv = seeds_option.parse_known_args(argv)
    base = parse_args(argv)
    seeds = known.seeds or [base.seed]
    folders = {seed: Path(base.output_dir) / (f"seed{seed}" if known.seeds else "") for seed in seeds}
    data = {seed: resolve_dataset(parse_args([*argv, "--seed", str(seed), "--output_dir", str(folder)]), base.dataset)
            for seed, folder in folders.items()}  # fmt: skip
    results = {}
    for mode in MIRAGE_MODES:
        runs = [
            train(
                parse_args(
                    [
                        *argv,
                        "--mode",
                        mode,
                        "--seed",
                        str(seed),
                        "--output_dir",
                        str(folders[seed] / mode),
                        "--dataset",
                        data[seed],
                    ]
                )
            )  # fmt: skip
            for seed in seeds
        ]
        results[mode] = runs[0] if not known.seeds else {"seeds": dict(zip(seeds, runs)), "clean": summarise_seeds(
            [run["clean"] for run in runs])}  # fmt: skip
    print(ladder_tables(results))
    out = Path(base.output_dir) / "ladder_results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    run_ladder(sys.argv[1:])
