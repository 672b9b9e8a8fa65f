"""`mirage-detect`: score image files, folders and glob patterns with a MiraGe detector.

    mirage-detect photos/ "shots/**/*.jpg" one.png --model my-detector --format csv --output scores.csv

Images are decoded batch by batch, so memory holds one batch whatever the number of files. A file that cannot be
read becomes an "error" row with its reason (also printed to stderr) and the run goes on.

Exit codes: 0 every file was scored; 2 some files could not be read, or no image was found; 1 usage error or
no loadable model.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, TextIO

import torch
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from .atomic import atomic_write
from .explain import explain_images
from .inference import BACKENDS, Detector
from .transforms import PREPROCESS_MODES, ImageLoadError, open_image

PROG = "mirage-detect"
DEFAULT_MODEL = os.path.join("outputs", "demo", "model")  # where `python train.py` exports the demo detector
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("table", "csv", "json", "jsonl")
FIELDS = ("path", "label", "p_fake", "error")


class Row(NamedTuple):
    path: str
    label: str  # real / fake / unsure, or "error"
    p_fake: float | None
    error: str | None


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Usage errors exit with 1: exit code 2 is taken by "some images could not be read"."""
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _margin(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"must lie in [0, 0.5), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Detect AI-generated images with a MiraGe detector (calibrated p(fake) per image).",
        epilog="Exit codes: 0 all scored, 2 some files unreadable or no image found, 1 usage error or no model.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files (any extension), folders (searched recursively for "
        f"{', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) or glob patterns such as 'shots/**/*.jpg'",
    )
    parser.add_argument(
        "--model",
        help=f"detector folder or Hub id (default: {DEFAULT_MODEL}, the folder `python train.py` exports)",
    )
    parser.add_argument("--batch_size", type=_positive_int, default=32, help="images per forward pass (default 32)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="torch (default), or ONNX Runtime on the graphs `mirage-export-onnx` writes: onnx (fp32) or "
        "onnx-int8 (quantized, fastest on CPU)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the image encoder (pays off on large folders)"
    )
    parser.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        help="resize: CLIP's resize and centre crop; center_crop: crop without resizing (keeps pixel traces); "
        "default: the one the model was calibrated with (its config's `preprocess`)",
    )
    parser.add_argument(
        "--unsure_margin",
        type=_margin,
        default=0.05,
        help="label 'unsure' when p(fake) is within this distance of the calibrated threshold (default 0.05)",
    )
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    parser.add_argument("--output", help="write the results to this file (atomically) instead of stdout")
    parser.add_argument(
        "--explain",
        metavar="DIR",
        help="also write per image an overlay PNG (red: pulls towards fake, blue: towards real) into DIR; costs "
        "about 32 forward and backward passes per batch (integrated gradients, see mirage_hf.explain)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    return parser


def find_images(inputs: Iterable[str]) -> list[str]:
    """The files to score, in input order, each once.

    A folder contributes its image files (by extension, recursively, sorted); a pattern with no literal file of
    that name is expanded as a glob (`**` recursive); anything else is taken as a file and attempted, so a
    missing or non-image file becomes an error row rather than vanishing.
    """
    found, seen = [], set()

    def add(path: str):
        key = os.path.normcase(os.path.abspath(path))
        if key not in seen:
            seen.add(key)
            found.append(path)

    for item in inputs:
        is_pattern = not os.path.lexists(item) and any(char in item for char in "*?[")
        for match in (sorted(glob.glob(item, recursive=True)) or [item]) if is_pattern else [item]:
            if os.path.isdir(match):
                for root, dirs, files in os.walk(match):
                    dirs.sort()
                    for name in sorted(files):
                        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                            add(os.path.join(root, name))
            else:
                add(match)
    return found


def _explain_namer(directory: str):
    """Overlay file names after the input's stem; a repeated stem gets -1, -2, ... (case-insensitively)."""
    used, last_number = set(), {}

    def name(path: str) -> str:
        stem = Path(path).stem or "image"
        candidate, number = f"{stem}.png", last_number.get(stem.lower(), 0)
        while candidate.lower() in used:
            number += 1
            candidate = f"{stem}-{number}.png"
        used.add(candidate.lower())
        last_number[stem.lower()] = number
        return os.path.join(directory, candidate)

    return name


def score_files(
    detector: Detector,
    paths: list[str],
    batch_size: int,
    explain_dir: str | None = None,
    progress: bool = True,
) -> Iterator[Row]:
    """Yields one Row per path, in order, decoding and scoring one batch at a time.

    Unreadable files give "error" rows and a line on stderr. With `explain_dir`, each scored image's overlay is
    written there as `<input stem>.png` (`-1`, `-2`, ... for repeated stems).
    """
    overlay_path = _explain_namer(explain_dir) if explain_dir else None
    with tqdm(total=len(paths), unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            rows, decoded = {}, []
            for path in batch:
                try:
                    decoded.append((path, open_image(path)))
                except ImageLoadError as err:
                    rows[path] = Row(path, "error", None, err.reason)
                    tqdm.write(f"{PROG}: cannot read {path}: {err.reason}", file=sys.stderr)
            if decoded:
                images = [image for _, image in decoded]
                for (path, _), p_fake in zip(decoded, detector.p_fake(images)):
                    verdict = detector.verdict(p_fake)
                    rows[path] = Row(path, verdict.label, verdict.p_fake, None)
                if overlay_path:
                    for (path, _), (_, drawn) in zip(decoded, explain_images(detector, images)):
                        drawn.save(overlay_path(path))
            yield from (rows[path] for path in batch)
            bar.update(len(batch))


def _record(row: Row) -> dict:
    return {**row._asdict(), "p_fake": None if row.p_fake is None else round(row.p_fake, 4)}


def _cells(row: Row) -> list[str]:
    return [row.path, row.label, "" if row.p_fake is None else f"{row.p_fake:.4f}", row.error or ""]


def write_rows(rows: Iterable[Row], fmt: str, handle: TextIO, path_width: int = 0) -> None:
    """Streams `rows` to `handle` as table, csv (with header), json (a list of objects) or jsonl.

    The table's path column is `path_width` wide (known before scoring, so the table needs no second pass).
    """
    if fmt == "csv":
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(FIELDS)
        writer.writerows(_cells(row) for row in rows)
    elif fmt == "jsonl":
        handle.writelines(json.dumps(_record(row)) + "\n" for row in rows)
    elif fmt == "json":
        handle.write("[")
        handle.writelines(("," if index else "") + "\n  " + json.dumps(_record(row)) for index, row in enumerate(rows))
        handle.write("\n]\n")
    else:
        widths = (max(path_width, len("path")), len("unsure"), len("p_fake"))

        def line(path, label, p_fake, error):
            return f"{path:<{widths[0]}}  {label:<{widths[1]}}  {p_fake:>{widths[2]}}  {error}".rstrip() + "\n"

        handle.write(line(*FIELDS))
        handle.write(line(*("-" * width for width in widths), "-----"))
        handle.writelines(line(*_cells(row)) for row in rows)


def _write_output(write, output: str | None) -> None:
    """Runs `write(handle)` into `output` atomically (temp file, then rename), or into a temporary file copied to
    stdout at the end, so that the rows never interleave with the progress bar."""
    if output is not None:
        with atomic_write(output) as staging, open(staging, "w", encoding="utf-8", newline="") as handle:
            write(handle)
        return
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="") as handle:
        write(handle)
        handle.seek(0)
        shutil.copyfileobj(handle, sys.stdout)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.output is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            parser.error(f"--output: the folder of {args.output!r} does not exist")
        if args.explain is not None and os.path.exists(args.explain) and not os.path.isdir(args.explain):
            parser.error(f"--explain: {args.explain!r} exists and is not a folder")
        if args.backend != "torch":
            for flag, given in (("--explain", args.explain), ("--compile", args.compile)):
                if given:
                    parser.error(f"{flag} needs the PyTorch model (gradients, torch.compile): use --backend torch")
            if args.dtype != "float32":
                parser.error(f"--dtype: the {args.backend} backend runs the exported graph's own precision")
        if args.device is not None:
            try:
                device = torch.device(args.device)
            except RuntimeError as err:
                parser.error(f"--device: {err}")
            if device.type == "cuda" and not torch.cuda.is_available():
                parser.error("--device: CUDA is not available on this machine")
    except SystemExit as exit_:  # --help (0) or a usage error (1), as a return code
        return exit_.code

    model = args.model or (DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else None)
    if model is None:
        print(
            f"{PROG}: no model given and no {DEFAULT_MODEL} folder here. Run `python train.py` to train the offline "
            "demo detector there, or pass --model <folder or Hub id>.",
            file=sys.stderr,
        )
        return 1

    paths = find_images(args.inputs)
    if not paths:
        print(f"{PROG}: no image files found in {' '.join(args.inputs)}", file=sys.stderr)
        return 2

    hf_logging.disable_progress_bar()  # the weight-loading bar is noise in a command-line tool
    try:
        detector = Detector.from_pretrained(
            model,
            device=args.device,
            dtype=DTYPES[args.dtype],
            backend=args.backend,
            preprocess=args.preprocess,
            unsure_margin=args.unsure_margin,
            compile=args.compile,
        )
    except (ImportError, OSError, ValueError, RuntimeError) as err:
        where = "" if os.path.isdir(model) else " (no such local folder, so it was tried as a Hub id)"
        print(f"{PROG}: cannot load the model {model!r}{where}: {err}", file=sys.stderr)
        return 1

    if args.explain:
        os.makedirs(args.explain, exist_ok=True)
    counts = Counter()

    def counted(rows):
        for row in rows:
            counts[row.label] += 1
            yield row

    progress = not args.quiet and len(paths) > args.batch_size  # no bar for a single batch
    rows = counted(score_files(detector, paths, args.batch_size, explain_dir=args.explain, progress=progress))
    _write_output(lambda handle: write_rows(rows, args.format, handle, max(map(len, paths))), args.output)

    failed = counts.pop("error", 0)
    if not args.quiet:
        labels = ", ".join(f"{counts[label]} {label}" for label in ("fake", "real", "unsure"))
        print(f"{PROG}: {sum(counts.values())} scored ({labels}), {failed} unreadable", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
