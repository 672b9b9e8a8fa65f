"""Scanning an archive: the file list, decoding in DataLoader workers, rows written as they are scored, resume
from an existing output (the shards of an `accelerate launch` run: mirage_hf/shards.py).

A video is sampled in the main process (its header read, `mirage_hf.video`) and cut into chunks of at most one
batch of frames that the workers decode like images; its row follows its last chunk, after its frame rows
(`--frames`). Memory holds one batch of frames whatever a video's length.

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
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .atomic import atomic_write
from .explain import explain_images
from .inference import Detector
from .provenance import GENERATED_SOURCE_TYPES, Provenance
from .stability import SCORES_PER_INPUT, with_copies
from .transforms import IMAGE_EXTENSIONS, ImageLoadError, open_image
from .video import (
    DEFAULT_MAX_FRAMES,
    VIDEO_EXTENSIONS,
    VideoLoadError,
    VideoScores,
    maybe_video,
    sample_times,
    video_frames,
)

FIELDS = ("path", "label", "p_fake", "error")  # every output's first columns, in this order since the first release
VIDEO_FIELDS = ("frame", "frames", "p_fake_max", "fake_fraction")
STABILITY_FIELDS = ("spread",)
PROVENANCE_FIELDS = Provenance._fields
OPTION_FIELDS = {"--stability": STABILITY_FIELDS, "--provenance": PROVENANCE_FIELDS}  # options that add columns
ROW_FORMATS = ("csv", "jsonl")  # written row by row as batches are scored, so a scan resumes from them
FORMATS = ("table", "csv", "json", "jsonl")
SCAN_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
GENERATED_BY_METADATA = "generated (metadata)"  # count_labels' key for files whose metadata says generated


class Row(NamedTuple):
    path: str
    label: str  # real / fake / unsure, or "error"
    p_fake: float | None  # a video's: the mean over its frames
    error: str | None
    frame: float | None = None  # a frame row (--frames): its instant in seconds; None in a file's own row
    frames: int | None = None  # a video's row: the frames scored
    p_fake_max: float | None = None  # a video's row: the highest frame p(fake)
    fake_fraction: float | None = None  # a video's row: the share of frames whose verdict is "fake"
    spread: float | None = None  # --stability: max - min of p(fake) over the input and its degraded copies
    source_type: str | None = None  # --provenance: see mirage_hf.provenance.Provenance
    c2pa_generator: str | None = None
    c2pa_signer: str | None = None
    c2pa_validation: str | None = None


FLOAT_DECIMALS = {"p_fake": 4, "p_fake_max": 4, "fake_fraction": 4, "spread": 4, "frame": 3}  # decimals written


def columns(stability: bool = False, provenance: bool = False) -> tuple[str, ...]:
    """The columns a scan writes: the base, the video columns, then those of the options given."""
    return FIELDS + VIDEO_FIELDS + (STABILITY_FIELDS if stability else ()) + (PROVENANCE_FIELDS if provenance else ())


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


def _expand(item: str, on_empty_folder: Callable[[str], None] | None = None) -> Iterator[str]:
    """An INPUT argument as files: a folder's image and video files (recursive, sorted), a glob's matches, else
    itself. A folder named as the argument that holds none is passed to `on_empty_folder`."""
    is_pattern = not os.path.lexists(item) and any(char in item for char in "*?[")
    for match in (sorted(glob.glob(item, recursive=True)) or [item]) if is_pattern else [item]:
        if not os.path.isdir(match):
            yield match
            continue
        found = False
        for root, dirs, files in os.walk(match):
            dirs.sort()
            for name in sorted(files):
                if os.path.splitext(name)[1].lower() in SCAN_EXTENSIONS:
                    found = True
                    yield os.path.join(root, name)
        if not found and not is_pattern and on_empty_folder is not None:
            on_empty_folder(match)


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


def find_images(
    inputs: Iterable[str], files_from: str | None = None, on_empty_folder: Callable[[str], None] | None = None
) -> PathList:
    """The files to score, in input order, each once: the INPUT arguments, then the `files_from` list.

    A folder contributes its image and video files (by extension, recursively, sorted); a pattern with no literal file of
    that name is expanded as a glob (`**` recursive); anything else is taken as a file and attempted, so a
    missing or non-image file becomes an error row rather than vanishing, and a folder named as an argument that
    holds no image or video files is passed to `on_empty_folder`. The list is the same in every process of a
    sharded scan.
    """
    seen = set()

    def unique(paths):
        for path in paths:
            key = os.path.normcase(os.path.abspath(path))
            if key not in seen:
                seen.add(key)
                yield path

    candidates = itertools.chain.from_iterable(_expand(item, on_empty_folder) for item in inputs)
    if files_from is not None:
        candidates = itertools.chain(candidates, _listed(files_from))
    return PathList(unique(candidates))


def default_num_workers(processes_per_machine: int = 1) -> int:
    """Decoding workers per scanning process: the CPUs this process may use, less one for the model, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(8, max(0, cpus // max(1, processes_per_machine) - 1))


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class MediaOptions:
    """What a scan scores beyond one p(fake) per image: video sampling (`fps` per second, else `max_frames` per
    video), a row per frame, the stability copies, and the provenance metadata (`provenance`: a reader such as
    `functools.partial(read_provenance, c2pa=C2paReader())`, None to read none)."""

    fps: float | None = None
    max_frames: int = DEFAULT_MAX_FRAMES
    frame_rows: bool = False
    stability: bool = False
    provenance: Callable[[str], Provenance] | None = None


class Item(NamedTuple):
    """What one DataLoader worker decodes: an image, or the frames of a video at `times` (one chunk of it)."""

    path: str
    times: tuple[float, ...] | None = None  # None: an image
    first: bool = True  # the video's first chunk: its provenance is read with it
    last: bool = True  # its last chunk: its row follows
    error: str | None = None  # why the video cannot be read, found while sampling it


def plan_batches(paths: Iterable[str], batch_size: int, media: MediaOptions) -> Iterator[list[Item]]:
    """The items of `paths` in batches of at most `batch_size` frames (an image is one), in input order.

    Runs in the main process, as the DataLoader's batch sampler: a video's header is read here to sample it."""
    batch, size = [], 0
    for path in paths:
        for item in file_items(path, batch_size, media):
            cost = len(item.times) if item.times else 1
            if batch and size + cost > batch_size:
                yield batch
                batch, size = [], 0
            batch.append(item)
            size += cost
    if batch:
        yield batch


def file_items(path: str, chunk: int, media: MediaOptions) -> Iterator[Item]:
    """The items of one file: an image, a video cut in chunks of at most `chunk` frames, or its error."""
    if not maybe_video(path):
        yield Item(path)
        return
    try:
        times = sample_times(path, media.fps, media.max_frames)
    except VideoLoadError as err:
        yield Item(path, error=err.reason)
        return
    if times is None:  # a GIF of one frame
        yield Item(path)
        return
    for start in range(0, len(times), chunk):
        yield Item(path, tuple(times[start : start + chunk]), start == 0, start + chunk >= len(times))


class _Items(torch.utils.data.Dataset):
    """The DataLoader's dataset: the batch sampler yields the items themselves."""

    def __getitem__(self, item: Item) -> Item:
        return item


class ScanBatch(NamedTuple):
    items: list[Item]
    pixel_values: object  # (frames decoded [x copies], 3, S, S) tensor, in item order, each input then its copies
    counts: list[int]  # frames decoded per item (0: unreadable)
    errors: dict[int, str]  # item index -> why it could not be read
    images: list | None  # the decoded still images, for explanation maps only
    provenance: dict[int, Provenance]  # item index -> its file's provenance (images and first chunks)


class DecodeBatch:
    """DataLoader collate function: decodes and preprocesses a batch of items (inside the worker process)."""

    def __init__(self, preprocess, keep_images: bool = False, media: MediaOptions = MediaOptions()):
        self.preprocess, self.keep_images, self.media = preprocess, keep_images, media

    def __call__(self, items: list[Item]) -> ScanBatch:
        inputs, counts, errors, images, provenance = [], [], {}, [], {}
        for index, item in enumerate(items):
            try:
                if item.error is not None:
                    raise VideoLoadError(item.path, item.error)
                decoded = [open_image(item.path)] if item.times is None else video_frames(item.path, item.times)
            except ImageLoadError as err:
                errors[index] = err.reason
                counts.append(0)
                continue
            if item.times is None and self.keep_images:
                images.append(decoded[0])
            if self.media.provenance is not None and item.first:
                provenance[index] = self.media.provenance(item.path)
            inputs += decoded
            counts.append(len(decoded))
        if self.media.stability:
            inputs = with_copies(inputs)
        return ScanBatch(
            items, self.preprocess(inputs), counts, errors, images if self.keep_images else None, provenance
        )


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
    media: MediaOptions = MediaOptions(),
) -> Iterator[list[Row]]:
    """Yields the rows of each batch of `paths`, in order; decoding runs in `num_workers` DataLoader workers.

    A file's row comes after the rows of its frames (`media.frame_rows`). Unreadable files give "error" rows and
    a line on stderr. With `explain_dir`, each scored still image's overlay is written there as
    `<input stem>.png` (`-1`, `-2`, ... for repeated stems).
    """
    overlay_path = _explain_namer(explain_dir) if explain_dir else None
    loader = DataLoader(
        _Items(),
        batch_sampler=plan_batches(paths, batch_size, media),
        num_workers=num_workers,
        collate_fn=DecodeBatch(detector.preprocess, overlay_path is not None, media),
    )
    video = OpenVideo()
    for batch in loader:
        rows, explained = batch_rows(detector, batch, media, video)
        if overlay_path and batch.images:
            for path, (_, drawn) in zip(explained, explain_images(detector, batch.images), strict=True):
                drawn.save(overlay_path(path))
        yield rows
        if progress is not None:
            progress.update(sum(row.frame is None for row in rows))


@dataclass
class OpenVideo:
    """The video being scored, whose chunks may span batches: its frames' scores so far, error and provenance."""

    scores: VideoScores | None = None
    error: str | None = None
    provenance: Provenance | None = None


def batch_rows(detector: Detector, batch: ScanBatch, media: MediaOptions, video: OpenVideo) -> tuple[list, list]:
    """(rows, paths of the still images scored) of one decoded batch: a file's frame rows (`media.frame_rows`)
    come before its own row; `video` carries a video cut across batches from one call to the next."""
    pixels = batch.pixel_values
    per_input = SCORES_PER_INPUT if media.stability else 1
    scores = detector.p_fake_from_pixels(pixels).reshape(-1, per_input) if len(pixels) else None
    rows, explained, offset = [], [], 0
    for index, item in enumerate(batch.items):
        item_scores = scores[offset : offset + batch.counts[index]] if batch.counts[index] else None
        offset += batch.counts[index]
        error, provenance = batch.errors.get(index), batch.provenance.get(index)
        if item.times is None:
            if error is None:
                verdict = detector.verdicts(item_scores)[0]
                rows.append(Row(path=item.path, label=verdict.label, p_fake=verdict.p_fake, error=None,
                                spread=verdict.spread, **_fields_of(provenance)))  # fmt: skip
                explained.append(item.path)
            else:
                rows.append(_error_row(item.path, error))
            continue
        if item.first:
            video.scores, video.error, video.provenance = VideoScores(), None, provenance
        video.error = video.error or error
        if video.error is None:
            verdicts = detector.verdicts(item_scores)
            video.scores.add(item_scores, [verdict.label for verdict in verdicts])
            if media.frame_rows:
                rows += [Row(item.path, v.label, v.p_fake, None, frame=t, spread=v.spread)
                         for t, v in zip(item.times, verdicts)]  # fmt: skip
        if item.last:
            rows.append(
                _error_row(item.path, video.error)
                if video.error
                else _video_row(item.path, video.scores, detector, video.provenance)
            )
    return rows, explained


def _fields_of(provenance: Provenance | None) -> dict:
    return {} if provenance is None else provenance._asdict()


def say_unreadable(path: str, reason: str) -> None:
    tqdm.write(f"mirage-detect: cannot read {path}: {reason}", file=sys.stderr)


def _error_row(path: str, reason: str) -> Row:
    say_unreadable(path, reason)
    return Row(path, "error", None, reason)


def _video_row(path: str, video: VideoScores, detector: Detector, provenance) -> Row:
    verdict = video.verdict(detector)
    return Row(path, verdict.label, verdict.p_fake, None, frames=video.count, p_fake_max=video.p_fake_max,
               fake_fraction=video.fake_fraction, spread=verdict.spread, **_fields_of(provenance))  # fmt: skip


# --------------------------------------------------------------------------- writing and reading rows


def _value(name: str, value):
    """A cell's value as json writes it: probabilities rounded to 4 decimals, instants to 3 (ms)."""
    return round(value, FLOAT_DECIMALS[name]) if value is not None and name in FLOAT_DECIMALS else value


def _record(row: Row, fields: Sequence[str]) -> dict:
    return {name: _value(name, getattr(row, name)) for name in fields}


def _cell(name: str, value) -> str:
    if value is None:
        return ""
    return f"{value:.{FLOAT_DECIMALS[name]}f}" if name in FLOAT_DECIMALS else str(value)


def _cells(row: Row, fields: Sequence[str]) -> list[str]:
    return [_cell(name, getattr(row, name)) for name in fields]


def _parsed(name: str, text: str):
    """A csv cell back to its value (the inverse of `_cell`)."""
    if not text:
        return None
    return float(text) if name in FLOAT_DECIMALS else int(text) if name == "frames" else text


def _csv_text(records: Iterable[Sequence[str]]) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(records)
    return text.getvalue()


def _lines(rows: Iterable[Row], fmt: str, fields: Sequence[str]) -> str:
    """csv or jsonl text of `rows`, every line ending in a newline."""
    if fmt == "jsonl":
        return "".join(json.dumps(_record(row, fields)) + "\n" for row in rows)
    return _csv_text(_cells(row, fields) for row in rows)


def _header(fmt: str, fields: Sequence[str]) -> str:
    return _csv_text([fields]) if fmt == "csv" else ""


def write_rows(
    rows: Iterable[Row], fmt: str, handle: TextIO, path_width: int = 0, fields: Sequence[str] = columns()
) -> None:
    """Streams `rows` to `handle` as table, csv (with header), json (a list of objects) or jsonl.

    The table's path column is `path_width` wide (known before scoring, so the table needs no second pass); its
    error column comes last, and text columns are as wide as their names.
    """
    if fmt in ROW_FORMATS:
        handle.write(_header(fmt, fields))
        handle.writelines(_lines([row], fmt, fields) for row in rows)
    elif fmt == "json":
        handle.write("[")
        handle.writelines(
            ("," if index else "") + "\n  " + json.dumps(_record(row, fields)) for index, row in enumerate(rows)
        )
        handle.write("\n]\n")
    else:
        shown = [name for name in fields if name != "error"]
        widths = [max(path_width, len("path")), len("unsure"), *(max(len(name), 6) for name in shown[2:])]

        def line(cells, error):  # an error row's score cells are blank, padded to keep its error in its column
            return "  ".join([*(f"{cell:<{width}}" for cell, width in zip(cells, widths)), error]).rstrip() + "\n"

        handle.write(line(shown, "error"))
        handle.write(line(["-" * width for width in widths], "-----"))
        handle.writelines(line(_cells(row, shown), row.error or "") for row in rows)


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


def _rows_and_ends(path: str, fmt: str) -> Iterator[tuple[Row | None, int]]:
    """(row, byte offset of its end) for each row of a csv or jsonl scan output, read line by line; first
    (None, end of the header) for a csv. A line that is not a row raises ScanOutputError."""
    with open(path, "rb") as handle:
        end = 0

        def lines():
            nonlocal end
            for line in handle:
                end += len(line)
                yield line.decode("utf-8", "surrogateescape")

        if fmt == "csv":
            reader = csv.reader(lines())
            header = next(reader, None)
            if header is not None and not _known_columns(header):
                raise ScanOutputError(f"{path}: header {header} is not a mirage-detect csv header {list(columns())}")
            yield None, end
            for cells in reader:
                if len(cells) != len(header):
                    raise ScanOutputError(f"{path}:{reader.line_num}: expected {len(header)} fields, got {cells}")
                yield Row(**{name: _parsed(name, cell) for name, cell in zip(header, cells)}), end
            return
        for number, line in enumerate(lines(), 1):
            try:
                record = json.loads(line)
                yield Row(*(record[field] for field in FIELDS), **{k: record.get(k) for k in Row._fields[4:]}), end
            except (ValueError, KeyError, TypeError) as err:
                raise ScanOutputError(f"{path}:{number}: not a mirage-detect row ({err}): {line[:200]!r}") from err


def _known_columns(names: Sequence[str]) -> bool:
    return tuple(names[: len(FIELDS)]) == FIELDS and set(names) <= set(Row._fields)


def read_rows(path: str, fmt: str) -> Iterator[Row]:
    """The rows of a csv or jsonl scan output, read line by line; a line that is not a row raises ScanOutputError."""
    return (row for row, _ in _rows_and_ends(path, fmt) if row is not None)


def output_columns(path: str, fmt: str) -> tuple[str, ...] | None:
    """The columns of an existing csv or jsonl output (its header, its first row's keys); None when it has none."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        first = handle.readline()
    if not first.strip():
        return None
    try:
        names = tuple(next(csv.reader([first]))) if fmt == "csv" else tuple(json.loads(first))
    except (ValueError, TypeError) as err:
        raise ScanOutputError(f"{path}:1: not a mirage-detect row ({err}): {first[:200]!r}") from err
    if not _known_columns(names):
        raise ScanOutputError(f"{path}:1: columns {list(names)} are not mirage-detect's {list(columns())}")
    return names


def resume_columns(path: str, fmt: str, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The columns to append to the output being resumed: `wanted`, or the four of an output written before
    videos; any other difference means other options (--stability, --provenance) and raises ScanOutputError."""
    existing = output_columns(path, fmt)
    if existing is None or existing == wanted:
        return wanted
    if existing == FIELDS:
        return FIELDS
    raise ScanOutputError(
        f"{path} has the columns {list(existing)} but this scan writes {list(wanted)}: it was started "
        f"{_options_of(existing)}: resume with the same options"
    )


def _options_of(names: Sequence[str]) -> str:
    """The options that add columns an output with the columns `names` was started with ("with --stability and
    without --provenance")."""
    on = [option for option, fields in OPTION_FIELDS.items() if set(fields) <= set(names)]
    off = [option for option in OPTION_FIELDS if option not in on]
    return " and ".join(([f"with {' and '.join(on)}"] if on else []) + ([f"without {' or '.join(off)}"] if off else []))


def resumed_rows(path: str, fmt: str) -> Iterator[Row]:
    """The rows an interrupted scan left in `path` (none when it does not exist), its cut last line removed and
    the frame rows at its end removed too when the row of their video was never written."""
    if not os.path.exists(path):
        return
    if repair_tail(path):
        print(f"mirage-detect: {path}: removed an incomplete last line (interrupted write)", file=sys.stderr)
    kept, orphans = 0, 0
    for row, end in _rows_and_ends(path, fmt):
        if row is None or row.frame is None:
            kept, orphans = end, 0
        else:
            orphans += 1
        if row is not None:
            yield row
    if orphans:
        os.truncate(path, kept)
        print(f"mirage-detect: {path}: removed {orphans} frame row(s) of a video whose own row was not written; it "
              "is scored again", file=sys.stderr)  # fmt: skip


class RowWriter:
    """Appends csv or jsonl rows to a file or stdout, flushed after every batch: a kill loses at most one batch."""

    def __init__(self, fmt: str, output: str | None, append: bool = False, fields: Sequence[str] = columns()):
        self.fmt, self.fields = fmt, fields
        self.handle = (
            sys.stdout
            if output is None
            else open(output, "a" if append else "w", encoding="utf-8", errors="surrogateescape")
        )
        if output is None or self.handle.tell() == 0:
            self.handle.write(_header(fmt, fields))

    def write(self, rows: list[Row]) -> None:
        text = _lines(rows, self.fmt, self.fields)
        if self.handle is sys.stdout:
            with tqdm.external_write_mode(file=sys.stdout):  # rows and the progress bar share a terminal
                self.handle.write(text)
        else:
            self.handle.write(text)
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not sys.stdout:
            self.handle.close()


def done_paths(rows: Iterable[Row]) -> set[str]:
    """The files that have their own row among `rows` (a video's frame rows alone do not make it done)."""
    return {row.path for row in rows if row.frame is None}


def count_labels(rows: Iterable[Row], counts: Counter) -> Iterator[Row]:
    """Passes `rows` through, counting the labels of the files' own rows into `counts` (frame rows are not
    counted), and under "generated (metadata)" the files whose provenance says generated."""
    for row in rows:
        if row.frame is None:
            counts[row.label] += 1
            if row.source_type in GENERATED_SOURCE_TYPES:
                counts[GENERATED_BY_METADATA] += 1
        yield row
