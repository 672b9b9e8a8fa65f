"""Scanning an archive: the file list, decoding in DataLoader workers, rows written as they are scored, resume
from an existing output, and the shards of an `accelerate launch` run merged into one output.

Memory stays flat in the number of files: the paths live in one packed buffer (no Python object per path, so
forked DataLoader workers share it instead of copying it page by page as reference counts are touched), each
batch's rows go to the output as soon as it is scored, and resuming or merging reads outputs line by line.
"""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import os
import sys
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

from torch.utils.data import DataLoader
from tqdm import tqdm

from .atomic import atomic_write
from .explain import explain_images
from .inference import Detector
from .transforms import IMAGE_EXTENSIONS, ImageLoadError, open_image

FIELDS = ("path", "label", "p_fake", "error")
ROW_FORMATS = ("csv", "jsonl")  # written row by row as batches are scored, so a scan resumes from them
FORMATS = ("table", "csv", "json", "jsonl")


class Row(NamedTuple):
    path: str
    label: str  # real / fake / unsure, or "error"
    p_fake: float | None
    error: str | None


class ScanOutputError(ValueError):
    """An existing output (or shard part) that cannot be resumed from: the file and line say where."""


# --------------------------------------------------------------------------- the file list


class PathList(Sequence):
    """Paths packed into one bytes buffer with end offsets: about len(path) + 8 bytes each, no object per path."""

    def __init__(self, paths: Iterable[str]):
        data, self._ends = bytearray(), array("q")
        for path in paths:
            data += os.fsencode(path)
            self._ends.append(len(data))
        self._data = bytes(data)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return os.fsdecode(self._data[self._ends[index - 1] if index else 0 : self._ends[index]])

    def __iter__(self) -> Iterator[str]:
        start = 0
        for end in self._ends:
            yield os.fsdecode(self._data[start:end])
            start = end


def _expand(item: str) -> Iterator[str]:
    """An INPUT argument as files: a folder's image files (recursive, sorted), a glob's matches, else itself."""
    is_pattern = not os.path.lexists(item) and any(char in item for char in "*?[")
    for match in (sorted(glob.glob(item, recursive=True)) or [item]) if is_pattern else [item]:
        if not os.path.isdir(match):
            yield match
            continue
        for root, dirs, files in os.walk(match):
            dirs.sort()
            yield from (
                os.path.join(root, name)
                for name in sorted(files)
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            )


def _listed(files_from: str) -> Iterator[str]:
    """The non-blank lines of a file list (`-`: stdin), each a path taken literally: no glob, no folder walk."""
    if files_from == "-":
        lines = sys.stdin
    else:
        lines = open(files_from, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115 - closed below
    try:
        for line in lines:
            if line.strip():
                yield line.rstrip("\r\n")
    finally:
        if lines is not sys.stdin:
            lines.close()


def find_images(inputs: Iterable[str], files_from: str | None = None) -> PathList:
    """The files to score, in input order, each once: the INPUT arguments, then the `files_from` list.

    A folder contributes its image files (by extension, recursively, sorted); a pattern with no literal file of
    that name is expanded as a glob (`**` recursive); anything else is taken as a file and attempted, so a
    missing or non-image file becomes an error row rather than vanishing. The list is the same in every process
    of a sharded scan.
    """
    seen = set()

    def unique(paths):
        for path in paths:
            key = os.path.normcase(os.path.abspath(path))
            if key not in seen:
                seen.add(key)
                yield path

    candidates = itertools.chain.from_iterable(map(_expand, inputs))
    if files_from is not None:
        candidates = itertools.chain(candidates, _listed(files_from))
    return PathList(unique(candidates))


def default_num_workers(processes_per_machine: int = 1) -> int:
    """Decoding workers per scanning process: the CPUs this process may use, less one for the model, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, max(0, cpus // max(1, processes_per_machine) - 1))


# --------------------------------------------------------------------------- scoring


class ScanBatch(NamedTuple):
    paths: list[str]
    pixel_values: object  # (n_decoded, 3, S, S) tensor, in the order of the decodable paths
    errors: dict[str, str]  # path -> why it could not be read
    images: list | None  # the decoded images, for explanation maps only


class DecodeBatch:
    """DataLoader collate function: decodes and preprocesses a batch of paths (inside the worker process)."""

    def __init__(self, preprocess, keep_images: bool = False):
        self.preprocess, self.keep_images = preprocess, keep_images

    def __call__(self, paths: list[str]) -> ScanBatch:
        images, errors = [], {}
        for path in paths:
            try:
                images.append(open_image(path))
            except ImageLoadError as err:
                errors[path] = err.reason
        return ScanBatch(paths, self.preprocess(images), errors, images if self.keep_images else None)


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


def score_batches(
    detector: Detector,
    paths: Sequence[str],
    batch_size: int,
    num_workers: int = 0,
    explain_dir: str | None = None,
    progress: tqdm | None = None,
) -> Iterator[list[Row]]:
    """Yields the rows of each batch of `paths`, in order; decoding runs in `num_workers` DataLoader workers.

    Unreadable files give "error" rows and a line on stderr. With `explain_dir`, each scored image's overlay is
    written there as `<input stem>.png` (`-1`, `-2`, ... for repeated stems).
    """
    overlay_path = _explain_namer(explain_dir) if explain_dir else None
    loader = DataLoader(
        paths,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=DecodeBatch(detector.preprocess, keep_images=overlay_path is not None),
    )
    for batch in loader:
        scores = iter(detector.p_fake_from_pixels(batch.pixel_values) if len(batch.pixel_values) else ())
        rows = []
        for path in batch.paths:
            if path in batch.errors:
                rows.append(Row(path, "error", None, batch.errors[path]))
                tqdm.write(f"mirage-detect: cannot read {path}: {batch.errors[path]}", file=sys.stderr)
            else:
                verdict = detector.verdict(next(scores))
                rows.append(Row(path, verdict.label, verdict.p_fake, None))
        if overlay_path and batch.images:
            scored = [row.path for row in rows if row.error is None]
            for path, (_, drawn) in zip(scored, explain_images(detector, batch.images), strict=True):
                drawn.save(overlay_path(path))
        yield rows
        if progress is not None:
            progress.update(len(rows))


# --------------------------------------------------------------------------- writing and reading rows


def _record(row: Row) -> dict:
    return {**row._asdict(), "p_fake": None if row.p_fake is None else round(row.p_fake, 4)}


def _cells(row: Row) -> list[str]:
    return [row.path, row.label, "" if row.p_fake is None else f"{row.p_fake:.4f}", row.error or ""]


def _csv_text(records: Iterable[Sequence[str]]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(records)
    return text.getvalue()


def _lines(rows: Iterable[Row], fmt: str) -> str:
    """csv or jsonl text of `rows`, every line ending in a newline."""
    if fmt == "jsonl":
        return "".join(json.dumps(_record(row)) + "\n" for row in rows)
    return _csv_text(map(_cells, rows))


def _header(fmt: str) -> str:
    return _csv_text([FIELDS]) if fmt == "csv" else ""


def write_rows(rows: Iterable[Row], fmt: str, handle: TextIO, path_width: int = 0) -> None:
    """Streams `rows` to `handle` as table, csv (with header), json (a list of objects) or jsonl.

    The table's path column is `path_width` wide (known before scoring, so the table needs no second pass).
    """
    if fmt in ROW_FORMATS:
        handle.write(_header(fmt))
        handle.writelines(_lines([row], fmt) for row in rows)
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


def write_output(write, output: str) -> None:
    """Runs `write(handle)` into `output` atomically (a staging file renamed into place)."""
    with atomic_write(output) as staging, open(staging, "w", encoding="utf-8", newline="") as handle:
        write(handle)


def repair_tail(path: str) -> bool:
    """Cuts a last line that lacks its newline (a write interrupted by a kill); True when something was cut."""
    with open(path, "rb+") as handle:
        end = position = handle.seek(0, os.SEEK_END)
        while position > 0:
            step = min(position, 1 << 16)
            position -= step
            handle.seek(position)
            newline = handle.read(step).rfind(b"\n")
            if newline >= 0:
                position += newline + 1
                break
        if position == end:
            return False
        handle.truncate(position)
        return True


def read_rows(path: str, fmt: str) -> Iterator[Row]:
    """The rows of a csv or jsonl scan output, read line by line; a line that is not a row raises ScanOutputError."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        if fmt == "csv":
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is not None and tuple(header) != FIELDS:
                raise ScanOutputError(f"{path}: header {header} is not a mirage-detect csv header {list(FIELDS)}")
            for cells in reader:
                if len(cells) != len(FIELDS):
                    raise ScanOutputError(f"{path}:{reader.line_num}: expected {len(FIELDS)} fields, got {cells}")
                name, label, p_fake, error = cells
                yield Row(name, label, float(p_fake) if p_fake else None, error or None)
            return
        for number, line in enumerate(handle, 1):
            try:
                record = json.loads(line)
                yield Row(*(record[field] for field in FIELDS))
            except (ValueError, KeyError, TypeError) as err:
                raise ScanOutputError(f"{path}:{number}: not a mirage-detect row ({err}): {line[:200]!r}") from err


def resumed_rows(path: str, fmt: str) -> Iterator[Row]:
    """The rows an interrupted scan left in `path` (none when it does not exist), its cut last line removed."""
    if not os.path.exists(path):
        return
    if repair_tail(path):
        print(f"mirage-detect: {path}: removed an incomplete last line (interrupted write)", file=sys.stderr)
    yield from read_rows(path, fmt)


class RowWriter:
    """Appends csv or jsonl rows to a file or stdout, flushed after every batch: a kill loses at most one batch."""

    def __init__(self, fmt: str, output: str | None, append: bool = False):
        self.fmt = fmt
        self.handle = (
            sys.stdout
            if output is None
            else open(output, "a" if append else "w", encoding="utf-8", errors="surrogateescape")
        )
        if output is None or self.handle.tell() == 0:
            self.handle.write(_header(fmt))

    def write(self, rows: list[Row]) -> None:
        text = _lines(rows, self.fmt)
        if self.handle is sys.stdout:
            with tqdm.external_write_mode(file=sys.stdout):  # rows and the progress bar share a terminal
                self.handle.write(text)
        else:
            self.handle.write(text)
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not sys.stdout:
            self.handle.close()


# --------------------------------------------------------------------------- shards of a multi-process scan


def part_path(output: str, rank: int, world: int) -> str:
    """Where process `rank` of `world` writes its rows (jsonl) before the main process merges them."""
    return f"{output}.part-{rank:05d}-of-{world:05d}.jsonl"


def foreign_parts(output: str, world: int) -> list[str]:
    """Part files of `output` left by a run with another number of processes."""
    return sorted(
        p for p in glob.glob(glob.escape(output) + ".part-*-of-*.jsonl") if not p.endswith(f"{world:05d}.jsonl")
    )


def wait_for_parts(output: str, world: int, poll_seconds: float = 0.5) -> None:
    """Blocks until every process marked its part done. Files, not a collective: shards may finish hours apart,
    past any process-group timeout, and a dead process ends the whole launch anyway."""
    pending = [part_path(output, rank, world) for rank in range(world)]
    announced = False
    while pending := [part for part in pending if not os.path.exists(part + ".done")]:
        if not announced:
            print(f"mirage-detect: waiting for {len(pending)} other shard(s) to finish", file=sys.stderr)
            announced = True
        time.sleep(poll_seconds)


def merged_rows(parts: list[str], earlier: Iterable[Row] = ()) -> Iterator[Row]:
    """The `earlier` rows (a resumed output), then the parts' rows interleaved one by one, which restores input
    order for the round-robin shards. Part rows already among the earlier ones are dropped: a merge killed after
    its rename but before the parts were deleted is redone without duplicates."""
    seen = set()
    for row in earlier:
        seen.add(row.path)
        yield row
    for group in itertools.zip_longest(*(read_rows(part, "jsonl") for part in parts)):
        yield from (row for row in group if row is not None and row.path not in seen)


def count_labels(rows: Iterable[Row], counts: Counter) -> Iterator[Row]:
    """Passes `rows` through, counting their labels into `counts`."""
    for row in rows:
        counts[row.label] += 1
        yield row
