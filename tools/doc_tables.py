#!/usr/bin/env python
"""Regenerates the results tables quoted in the docs from the results files of the commands that made them.

    python tools/doc_tables.py                                      # rewrite every block from docs/results/
    python tools/doc_tables.py --demo outputs/demo/eval_results.json   # take a fresh demo run's results first
    python tools/doc_tables.py --check [--demo F]                   # exit 1 where a block differs (CI)

A generated block in a markdown file sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; NAME says
which results file and renderer make it (TABLES). The results files are kept in the repository (docs/results/,
the benchmarks' JSON) so that the tables can be regenerated without rerunning anything; `--demo`, `--ladder`, ...
copy a fresh run's file there first (with `--check`, they are compared instead, and nothing is written).
"""

import argparse
import difflib
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DOCS = ("README.md", "docs/synthetic-data.md", "docs/adaptation.md")


def demo_table(results: dict) -> str:
    from mirage_hf.evaluation import results_table

    return results_table(results)


def ladder_table(results: dict) -> str:
    from mirage_hf.ladder import ladder_tables

    return ladder_tables(results)


def adaptation_table(results: dict) -> str:
    """benchmarks/adapt_kshot.py's markdown table of its report (a script, not a module of the package)."""
    spec = importlib.util.spec_from_file_location("adapt_kshot", ROOT / "benchmarks" / "adapt_kshot.py")
    script = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its own helper module (peak_rss)
    try:
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return script.markdown(results["rows"])


def house_table(after: dict) -> str:
    """tools/house.py's before/after table: before is the measurement of the commit the redesign started from."""
    spec = importlib.util.spec_from_file_location("house", ROOT / "tools" / "house.py")
    house = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(house)
    return house.comparison(json.loads((RESULTS / "house_before.json").read_text()), after)


TABLES = {  # name: (results file, renderer, the command that writes the file, fenced as code)
    "demo": (RESULTS / "demo_eval_results.json", demo_table, "python train.py", True),
    "ladder": (
        RESULTS / "ladder_results.json", ladder_table, "python -m mirage_hf.ladder --config demo --seeds 0 1 2", True,
    ),
    "kshot": (
        ROOT / "benchmarks" / "results_adapt_kshot.json", adaptation_table,
        "python train.py && python benchmarks/adapt_kshot.py", False,
    ),
    "anchor": (
        ROOT / "benchmarks" / "results_adapt_anchor.json", adaptation_table,
        "python benchmarks/adapt_kshot.py --shots 64 --generators gridder banding --methods guarded anchor --output "
        "benchmarks/results_adapt_anchor.json", False,
    ),
    "house": (
        RESULTS / "house_after.json", house_table,
        "python tools/house.py --json docs/results/house_after.json", False,
    ),
}  # fmt: skip
BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table:\2 -->)", re.S)


def render(name: str, source: Path) -> str:
    _, renderer, _, fenced = TABLES[name]
    table = renderer(json.loads(source.read_text()))
    return f"```\n{table}\n```\n" if fenced else f"{table}\n"


def regenerate(text: str, sources: dict[str, Path]) -> str:
    """`text` with every generated block replaced by the rendering of its results file."""

    def block(match: re.Match) -> str:
        if match[2] not in TABLES:
            raise SystemExit(f"unknown table {match[2]!r} (known: {', '.join(TABLES)})")
        return match[1] + render(match[2], sources[match[2]]) + match[4]

    return BLOCK.sub(block, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, write nothing; exit 1 on a difference")
    for name, (_, _, command, _) in TABLES.items():
        parser.add_argument(f"--{name}", type=Path, help=f"results file of a fresh `{command}`")
    args = parser.parse_args(argv)
    sources = {name: file for name, (file, _, _, _) in TABLES.items()}
    for name in TABLES:
        given = getattr(args, name)
        if given and not args.check:
            shutil.copyfile(given, sources[name])
        elif given:
            sources[name] = given
    differ = False
    for doc in DOCS:
        path = ROOT / doc
        text = path.read_text()
        new = regenerate(text, sources)
        if new == text:
            continue
        if args.check:
            differ = True
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), doc, "regenerated"))
        else:
            path.write_text(new)
            print(f"{doc}: tables regenerated")
    if differ:
        print("the tables above differ from what their commands produced: python tools/doc_tables.py", file=sys.stderr)
    return int(differ)


if __name__ == "__main__":
    sys.exit(main())
