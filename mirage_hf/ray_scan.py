"""The archive scan on Ray Data (`mirage-detect --engine ray`), for archives that outgrow one machine.

Ray Data streams the file list through two stages. Read tasks, on any node's CPUs, fetch each file (a local path, or
a URI such as s3://, gs:// or file:// through pyarrow's file systems), decode it (an image, a video's sampled
frames, its provenance) and preprocess it exactly as the local scan does. A pool of actors, each holding the
detector once (on a GPU with `num_gpus_per_actor`), scores the pixels and builds the rows with the local scan's
own code (`scan.batch_rows`), so the rows, columns and error rows are the local scan's. Ray retries a read task
whose worker dies and restarts a dead actor, retrying its batches (`actor_pool`). Open-source Ray keeps no job checkpoint: resuming
reads what the output already holds and skips those paths.

    import ray, mirage_hf.ray_scan as ray_scan
    rows = ray_scan.scan_dataset("you/detector", ray_scan.find_inputs(["s3://bucket/uploads/"]))  # lazy
    rows.write_parquet("s3://bucket/scores/")
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from .adapter_config import load_detector_config
from .provenance import Provenance
from .scan import (
    FLOAT_DECIMALS,
    PROVENANCE_FIELDS,
    SCAN_EXTENSIONS,
    DecodeBatch,
    Item,
    MediaOptions,
    OpenVideo,
    PathList,
    Row,
    ScanBatch,
    batch_rows,
    columns,
    file_items,
    find_images,
    say_unreadable,
)
from .stability import SCORES_PER_INPUT
from .transforms import ImageLoadError

RAY_EXTRA = 'pip install "mirage-hf[ray]"'
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def import_ray():
    """The `ray` module with Ray Data, or ImportError naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError(f"the Ray engine needs Ray Data, which is not installed: {RAY_EXTRA}") from err
    return ray


def is_uri(path: str) -> bool:
    return bool(URI.match(path))


def _filesystem(uri: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri)


# --------------------------------------------------------------------------- the file list


def expand_uri(uri: str) -> Iterator[str]:
    """A URI as files: a directory's image and video files (recursive, sorted by path), else the URI itself (a
    missing file then becomes an error row, as a missing local path does)."""
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    if filesystem.get_file_info(root).type != fs.FileType.Directory:
        yield uri
        return
    scheme = uri[: uri.index("://") + 3]
    listed = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    found = (info.path for info in listed if info.type == fs.FileType.File)
    yield from (scheme + path for path in sorted(found) if os.path.splitext(path)[1].lower() in SCAN_EXTENSIONS)


def find_inputs(inputs: Iterable[str], files_from: str | None = None, on_empty_folder=None) -> PathList:
    """The local scan's file list (`scan.find_images`: files, folders, globs, `files_from`, each file once) with
    URIs among the inputs too, a URI of a directory standing for its image and video files."""
    expanded = (path for item in inputs for path in (expand_uri(item) if is_uri(item) else (item,)))
    return find_images(expanded, files_from, on_empty_folder)


# --------------------------------------------------------------------------- read tasks: fetch and decode


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
    """`path` itself, or for a URI a temporary copy of its file (same extension: a video is known by it)."""
    if not is_uri(path):
        yield path
        return
    filesystem, inner = _filesystem(path)
    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(inner)[1]) as copy:
        try:
            with filesystem.open_input_stream(inner) as source:
                shutil.copyfileobj(source, copy)
        except FileNotFoundError:
            raise ImageLoadError(path, "file not found") from None
        except OSError as err:
            raise ImageLoadError(path, f"cannot read: {err}") from None
        copy.flush()
        yield copy.name


def decoded_schema():
    """What a read task hands the actors, typed (a block of only unreadable files keeps its column types)."""
    import pyarrow as pa

    fields = [("path", pa.string()), ("video", pa.bool_()), ("times", pa.list_(pa.float64())),
              ("frames_decoded", pa.int64()), ("pixels", pa.binary()), ("error", pa.string())]  # fmt: skip
    return pa.schema(fields + [(name, pa.string()) for name in PROVENANCE_FIELDS])


def decode_files(batch, preprocess, media: MediaOptions):
    """Read task: per file of the Arrow `batch`'s paths, its preprocessed pixels (frames x copies, as raw float32
    bytes), the frames decoded, the instants of a video's frames, why it could not be read, and its provenance."""
    import pyarrow as pa

    decode = DecodeBatch(preprocess, media=media)
    out = {"path": [], "video": [], "times": [], "frames_decoded": [], "pixels": [], "error": []}
    out.update({name: [] for name in PROVENANCE_FIELDS})
    for path in batch.column("path").to_pylist():
        try:
            with local_file(path) as local:
                item = next(file_items(local, sys.maxsize, media))  # one item: an image, or a whole video
                decoded = decode([item])
        except ImageLoadError as err:
            item, decoded = Item(path), None
            error = err.reason
        else:
            error = decoded.errors.get(0)
        provenance = decoded.provenance.get(0) if decoded else None
        out["path"].append(path)
        out["video"].append(item.times is not None)
        out["times"].append(list(item.times or ()))
        out["frames_decoded"].append(decoded.counts[0] if decoded else 0)
        pixels = decoded.pixel_values if decoded is not None and decoded.counts[0] else None
        out["pixels"].append(b"" if pixels is None else pixels.numpy().astype(np.float32).tobytes())
        out["error"].append(error)
        for name in PROVENANCE_FIELDS:
            out[name].append(getattr(provenance, name) if provenance is not None else None)
    return pa.Table.from_pydict(out, schema=decoded_schema())


# --------------------------------------------------------------------------- the actor pool: score


def arrow_schema(fields: Sequence[str]):
    """The Arrow types of the scan's columns (floats in full precision; csv and jsonl round them when written)."""
    import pyarrow as pa

    types = {"frames": pa.int64(), **{name: pa.float64() for name in FLOAT_DECIMALS}}
    return pa.schema([(name, types.get(name, pa.string())) for name in fields])


def rows_table(rows: Sequence[Row], fields: Sequence[str]):
    """`rows` as an Arrow table with `arrow_schema(fields)` (a block of only error rows keeps its float types)."""
    import pyarrow as pa

    schema = arrow_schema(fields)
    values = {field.name: [_plain(getattr(row, field.name)) for row in rows] for field in schema}
    return pa.table({name: pa.array(column, type=schema.field(name).type) for name, column in values.items()})


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def table_rows(table) -> Iterator[Row]:
    """The rows of an Arrow table of scan columns (the inverse of `rows_table`)."""
    for record in table.to_pylist():
        yield Row(**{name: value for name, value in record.items() if name in Row._fields})


class ScoreFiles:
    """Actor: loads the detector once, then scores the decoded files of each batch into the scan's rows."""

    def __init__(self, model: str, media: MediaOptions, provenance: bool, detector_options: dict):
        """`media` without its provenance reader: the read tasks read provenance, `provenance` says whether."""
        from .inference import Detector

        self.detector = Detector.from_pretrained(model, **detector_options)
        self.media, self.provenance = media, provenance
        self.fields = columns(media.stability, provenance)

    def __call__(self, batch):
        size = self.detector.preprocess.image_size
        per_input = SCORES_PER_INPUT if self.media.stability else 1
        items, counts, errors, provenance, pixels = [], [], {}, {}, []
        for index, file in enumerate(batch.to_pylist()):
            items.append(Item(file["path"], tuple(file["times"]) if file["video"] else None))
            counts.append(file["frames_decoded"])
            if file["error"] is not None:
                errors[index] = file["error"]
            if self.provenance and file[PROVENANCE_FIELDS[-1]] is not None:
                provenance[index] = Provenance(*(file[name] for name in PROVENANCE_FIELDS))
            if counts[-1]:
                pixels.append(np.frombuffer(file["pixels"], np.float32).reshape(-1, 3, size, size))
        stacked = torch.from_numpy(np.concatenate(pixels)) if pixels else torch.zeros(0, 3, size, size)
        assert len(stacked) == sum(counts) * per_input, "pixels and frame counts disagree"
        scan_batch = ScanBatch(items, stacked, counts, errors, None, provenance)
        rows, _ = batch_rows(self.detector, scan_batch, self.media, OpenVideo())
        return rows_table(rows, self.fields)


# --------------------------------------------------------------------------- the job


def scan_dataset(
    model: str,
    paths: Sequence[str],
    media: MediaOptions | None = None,
    batch_size: int = 32,
    concurrency: int | tuple[int, int] = 1,
    num_gpus_per_actor: float = 0.0,
    **detector_options,
):
    """The rows of scanning `paths` with the detector `model` (folder or Hub id, adapters too), as a lazy
    `ray.data.Dataset` with the local scan's columns (`scan.columns`). `concurrency`: scoring actors, or (min, max)
    for an autoscaling pool; `detector_options` go to `Detector.from_pretrained` in each actor (backend, device,
    dtype, preprocess, unsure_margin). Connects to Ray as `ray.init()` does when no session is open."""
    ray = import_ray()
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from .transforms import scoring_preprocessor

    media = media or MediaOptions()
    if not ray.is_initialized():
        ray.init()
    config = load_detector_config(model)
    preprocess = scoring_preprocessor(
        AutoImageProcessor.from_pretrained(model), config, detector_options.get("preprocess")
    )
    scoring_media = MediaOptions(media.fps, media.max_frames, media.frame_rows, media.stability)
    files = ray.data.from_items([{"path": path} for path in paths])
    decoded = files.map_batches(
        functools.partial(decode_files, preprocess=preprocess, media=media),
        batch_size=batch_size,
        batch_format="pyarrow",
    )
    return decoded.map_batches(
        ScoreFiles,
        fn_constructor_kwargs={
            "model": model, "media": scoring_media, "provenance": media.provenance is not None,
            "detector_options": detector_options,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=actor_pool(concurrency),
        num_gpus=num_gpus_per_actor or None,
    )  # fmt: skip


def actor_pool(concurrency: int | tuple[int, int]):
    """A fixed pool of `concurrency` scoring actors, or an autoscaling one for (min, max). Ray Data restarts an actor
    whose process dies and retries its batches; a read task whose worker dies is retried too."""
    from ray.data import ActorPoolStrategy

    if isinstance(concurrency, int):
        return ActorPoolStrategy(size=concurrency)
    return ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])


# --------------------------------------------------------------------------- the command line's side


def connect(address: str | None, quiet: bool = False) -> None:
    """Joins the Ray cluster at `address` (else `RAY_ADDRESS`, else a local one started here), unless a session
    is open. Worker output stays in Ray's logs: the rows say what the workers found."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the command's own bar counts files
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and timings; the command prints a summary
    if quiet:
        logging.getLogger("ray").setLevel(logging.ERROR)


def row_batches(dataset, progress=None) -> Iterator[list[Row]]:
    """The rows of a `scan_dataset` as they arrive at the driver (in no fixed order), each unreadable file said
    on stderr as the local scan says it."""
    for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        rows = list(table_rows(table))
        for row in rows:
            if row.label == "error":
                say_unreadable(row.path, row.error)
        yield rows
        if progress is not None:
            progress.update(sum(row.frame is None for row in rows))


def _output_filesystem(output: str):
    """(file system, path in it) of a Parquet output folder: a URI's, or the local one."""
    from pyarrow import fs

    return _filesystem(output) if is_uri(output) else (fs.LocalFileSystem(), os.path.abspath(output))


def output_exists(output: str) -> bool:
    from pyarrow import fs

    filesystem, path = _output_filesystem(output)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def remove_output(output: str) -> None:
    """Removes a Parquet output folder (or a file of that name) for --overwrite."""
    from pyarrow import fs

    filesystem, path = _output_filesystem(output)
    kind = filesystem.get_file_info(path).type
    if kind == fs.FileType.Directory:
        filesystem.delete_dir(path)
    elif kind == fs.FileType.File:
        filesystem.delete_file(path)


def parquet_rows(output: str, columns_read: Sequence[str] = ("path", "label", "frame")) -> Iterator[Row]:
    """The rows in the Parquet files of the output folder `output` (local or a URI; a job's parts, several runs'
    when resumed); a part an interruption cut is removed, so its files are scored again."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pyarrow import fs

    filesystem, root = _output_filesystem(output)
    if filesystem.get_file_info(root).type != fs.FileType.Directory:
        return
    listed = filesystem.get_file_info(fs.FileSelector(root))
    for part in sorted(info.path for info in listed if info.path.endswith(".parquet")):
        try:
            table = pq.read_table(part, columns=list(columns_read), filesystem=filesystem)
        except (OSError, pa.ArrowException) as err:  # no footer, a cut page
            print(f"mirage-detect: removing {part}, cut by an interruption ({err}); its files are scored again",
                  file=sys.stderr)  # fmt: skip
            filesystem.delete_file(part)
            continue
        for record in table.to_pylist():
            yield Row(**{"p_fake": None, "error": None, **record})
