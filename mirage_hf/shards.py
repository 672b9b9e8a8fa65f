"""The shards of a multi-process scan (`accelerate launch ... -m mirage_hf.cli`): process `rank` of `world` scores
files rank, rank + world, ... into its own part next to the output and marks it done; the main process waits for
every part and merges them, in input order, into the output. A resumed run continues each part where it stopped.
"""

from __future__ import annotations

import glob
import itertools
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator

from .scan import (
    PathList,
    Row,
    RowWriter,
    count_labels,
    done_paths,
    read_rows,
    resume_columns,
    resumed_rows,
    write_output,
    write_rows,
)


def part_path(output: str, rank: int, world: int) -> str:
    """Where process `rank` of `world` writes its rows (jsonl) before the main process merges them."""
    return f"{output}.part-{rank:05d}-of-{world:05d}.jsonl"


def done_marker(part: str) -> str:
    """The empty file a process writes beside its part when the part is complete (what `wait_for_parts` awaits)."""
    return part + ".done"


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
    while pending := [part for part in pending if not os.path.exists(done_marker(part))]:
        if not announced:
            print(f"mirage-detect: waiting for {len(pending)} other shard(s) to finish", file=sys.stderr)
            announced = True
        time.sleep(poll_seconds)


def _file_groups(rows: Iterable[Row]) -> Iterator[list[Row]]:
    """Rows grouped per file: its frame rows, then its own row."""
    group = []
    for row in rows:
        group.append(row)
        if row.frame is None:
            yield group
            group = []


def merged_rows(parts: list[str], earlier: Iterable[Row] = ()) -> Iterator[Row]:
    """The `earlier` rows (a resumed output), then the parts' files interleaved one by one (each with its frame
    rows), which restores input order for the round-robin shards. Files already among the earlier rows are
    dropped: a merge killed after its rename but before the parts were deleted is redone without duplicates."""
    seen = set()
    for row in earlier:
        if row.frame is None:
            seen.add(row.path)
        yield row
    for groups in itertools.zip_longest(*(_file_groups(read_rows(part, "jsonl")) for part in parts)):
        for group in groups:
            if group is not None and group[-1].path not in seen:
                yield from group


def scan_shard(
    score, paths: PathList, state, output: str, fmt: str, fields: tuple[str, ...], resume: bool, progress_bar
) -> Counter | None:
    """One process of `accelerate launch`: files rank, rank + N, ... into its part; the main process then merges
    every part (after the rows of a resumed `output`) into `output`, written as `fmt` with `fields`. `score(paths,
    bar)` yields the rows of `paths` batch by batch; `progress_bar(total, done, desc, quiet)` shows the main
    process's shard. Returns the counts on the main process."""
    rank, world = state.process_index, state.num_processes
    part = part_path(output, rank, world)
    if os.path.exists(done_marker(part)):
        os.remove(done_marker(part))
    resume_output = resume and os.path.exists(output)
    output_fields = resume_columns(output, fmt, fields) if resume_output else fields
    if resume:
        resume_columns(part, "jsonl", fields)
    if state.is_main_process and resume_output:
        list(resumed_rows(output, fmt))  # repairs a cut last line once, before any process reads it
    state.wait_for_everyone()  # no process may see a marker or a cut line left by an earlier run
    done = set()
    if resume:
        if resume_output:
            done.update(done_paths(read_rows(output, fmt)))
        done.update(done_paths(resumed_rows(part, "jsonl")))
    mine = (path for index, path in enumerate(paths) if index % world == rank)
    todo = PathList(path for path in mine if path not in done)
    shard_size = len(range(rank, len(paths), world))
    del done
    writer = RowWriter("jsonl", part, append=resume, fields=fields)
    try:
        quiet = not state.is_main_process  # one bar on the terminal: the main process's shard
        with progress_bar(shard_size, shard_size - len(todo), f"shard {rank + 1}/{world}", quiet) as bar:
            for rows in score(todo, bar) if todo else ():
                writer.write(rows)
    finally:
        writer.close()
    open(done_marker(part), "w").close()
    if not state.is_main_process:
        return None
    wait_for_parts(output, world)
    parts = [part_path(output, index, world) for index in range(world)]
    counts = Counter()
    rows = merged_rows(parts, read_rows(output, fmt) if resume_output else ())
    width = max(map(len, paths)) if fmt == "table" else 0
    write_output(lambda handle: write_rows(count_labels(rows, counts), fmt, handle, width, output_fields), output)
    for part in parts:
        os.remove(part)
        os.remove(done_marker(part))
    return counts
