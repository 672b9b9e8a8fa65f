"""Measures the shape of the package: modules and lines per subpackage, the longest functions, repeated code.

    python tools/house.py [--rev REV] [--json OUT]

With `--rev`, measures the package as it was at that commit (read with `git archive`, nothing checked out). Repeated
code is counted with the workplace's `duplicates` command where it is on the PATH (pairs of places sharing 6 or more
lines), else left out. The README's layout section is written from two such JSON files by `tools/doc_tables.py`.
"""

import argparse
import ast
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mirage_hf"
LONGEST = 8  # functions listed


def python_modules(tree: Path) -> dict[str, str]:
    """Module path (relative to the tree) -> source, for every .py file of the package."""
    return {str(p.relative_to(tree)): p.read_text() for p in sorted((tree / PACKAGE).rglob("*.py"))}


def functions(path: str, source: str) -> list[dict]:
    """Every function and method of a module with its length in lines (decorators included)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            found.append({"function": f"{path}:{node.name}", "lines": node.end_lineno - start + 1})
    return found


def repeated_code(tree: Path) -> int | None:
    """Pairs of places in the package sharing 6 or more lines, by `duplicates`; None where it is not installed."""
    if shutil.which("duplicates") is None:
        return None
    out = subprocess.run(
        ["duplicates", "--repo", str(tree / PACKAGE), "--most", "1"], capture_output=True, text=True, check=True
    ).stdout
    first = out.splitlines()[0]
    return 0 if first.startswith("no duplicates") else int(first.split()[0])


def measure(tree: Path, rev: str) -> dict:
    modules = python_modules(tree)
    rooms: dict[str, dict] = {}
    for path, source in modules.items():
        room = str(Path(path).parent)
        entry = rooms.setdefault(room, {"modules": 0, "lines": 0})
        entry["modules"] += 1
        entry["lines"] += len(source.splitlines())
    every = sorted((f for p, s in modules.items() for f in functions(p, s)), key=lambda f: -f["lines"])
    return {
        "rev": rev,
        "modules": len(modules),
        "lines": sum(r["lines"] for r in rooms.values()),
        "rooms": rooms,
        "functions": len(every),
        "functions_over_50_lines": sum(f["lines"] > 50 for f in every),
        "longest": every[:LONGEST],
        "repeated_code_pairs": repeated_code(tree),
        "optimizer_step_sites": sum(s.count("optimizer.step(") for s in modules.values()),
    }


def comparison(before: dict, after: dict, longest: int = 5) -> str:
    """The README's before/after table of two measurements (markdown)."""

    def room(m: dict, name: str) -> str:
        entry = m["rooms"].get(name)
        return f"{entry['modules']} ({entry['lines']:,} lines)" if entry else "-"

    rows = [
        ("modules (lines), whole package", *(f"{m['modules']} ({m['lines']:,} lines)" for m in (before, after))),
        *(
            (f"`{name}/`", room(before, name), room(after, name))
            for name in sorted(set(before["rooms"]) | set(after["rooms"]))
        ),
        ("functions (over 50 lines)", *(f"{m['functions']} ({m['functions_over_50_lines']})" for m in (before, after))),
        ("places that step an optimizer", before["optimizer_step_sites"], after["optimizer_step_sites"]),
        ("repeated code (pairs of 6+ shared lines)", before["repeated_code_pairs"], after["repeated_code_pairs"]),
        *(
            (
                f"longest function {i + 1}",
                *(f"`{m['longest'][i]['function']}` ({m['longest'][i]['lines']})" for m in (before, after)),
            )
            for i in range(longest)
        ),
    ]
    lines = [f"| | before (`{before['rev']}`) | after (`{after['rev']}`) |", "|---|---|---|"]
    return "\n".join([*lines, *(f"| {a} | {b} | {c} |" for a, b, c in rows)])


def tree_at(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, PACKAGE], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="a git revision to measure instead of the working tree")
    parser.add_argument("--json", type=Path, help="write the measurements here as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        tree = tree_at(args.rev, Path(scratch)) if args.rev else ROOT
        rev = (
            args.rev
            or subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        result = measure(tree, rev)
    text = json.dumps(result, indent=2) + "\n"
    if args.json:
        args.json.write_text(text)
    sys.stdout.write(text)
    return result


if __name__ == "__main__":
    main()
