"""The ablation ladder: train every rung (zero_shot ... mirage) on the same data and compare them.

    python -m mirage_hf.ladder --config genimage_sd14 [any train.py override]

Each rung trains into <output_dir>/<mode> with identical data, schedule and seed; the table at the end has
one column per rung (mean over generators in the last row) and is saved as <output_dir>/ladder_results.json.
"""

import json
import sys
from pathlib import Path

from .configuration_mirage import MIRAGE_MODES
from .metrics import format_comparison_table
from .train_config import parse_args
from .training import train


def run_ladder(argv: list[str]) -> dict:
    base = parse_args(argv)
    results = {}
    for mode in MIRAGE_MODES:
        cfg = parse_args([*argv, "--mode", mode, "--output_dir", str(Path(base.output_dir) / mode)])
        results[mode] = train(cfg)
    for metric in ("accuracy", "average_precision"):
        print(
            format_comparison_table(
                {m: r["clean"] for m, r in results.items()}, metric=metric, title=f"ablation ladder: {metric}"
            )
        )
    out = Path(base.output_dir) / "ladder_results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    run_ladder(sys.argv[1:])
