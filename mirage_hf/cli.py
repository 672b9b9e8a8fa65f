"""`mirage-detect`: score image and video files, folders and glob patterns with a MiraGe detector.

    mirage-detect photos/ "shots/**/*.jpg" one.png --model my-detector --format csv --output scores.csv
    mirage-detect uploads/ --max_frames 16 --frames --stability --provenance --format jsonl --output scores.jsonl
    find /archive -name '*.jpg' | mirage-detect --files_from - --format jsonl --output scores.jsonl --resume
    accelerate launch --num_processes 8 -m mirage_hf.cli /archive --format jsonl --output scores.jsonl

DataLoader workers decode while the model scores; csv and jsonl rows are written and flushed batch by batch, so
`--resume` continues a killed scan where it stopped. Under `accelerate launch` each process scores every N-th
file into a part next to `--output` and the main process merges the parts (see mirage_hf/scan.py). A file that
cannot be read becomes an "error" row with its reason (also printed to stderr) and the run goes on. Videos
(mirage_hf/video.py) get one row each, after their frame rows with --frames; --stability (mirage_hf/stability.py)
and --provenance (mirage_hf/provenance.py) add their columns.

Exit codes: 0 every file was scored; 2 some files could not be read, or no image was found; 1 usage error,
no loadable model or an output that cannot be resumed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import torch
from tqdm import tqdm

from . import ray_scan
from .building import offline_if_hub_unreachable
from .commands import UsageParser, add_quiet, non_negative_float, non_negative_int, positive_float, positive_int
from .inference import DEFAULT_UNSURE_MARGIN, Detector, check_unsure_margin
from .progress import hide_library_bars, progress_bar
from .provenance import C2paReader, read_provenance
from .scan import (
    FORMATS,
    GENERATED_BY_METADATA,
    ROW_FORMATS,
    MediaOptions,
    PathList,
    RowWriter,
    ScanOutputError,
    count_labels,
    default_num_workers,
    done_paths,
    find_images,
    resume_columns,
    resumed_rows,
    score_batches,
    write_output,
    write_rows,
)
from .scan import columns as output_fields
from .scoring import BACKENDS, ModelNotFound, check_backend_options, check_model_name
from .shards import foreign_parts, scan_shard
from .stability import STABILITY_COPIES
from .transforms import IMAGE_EXTENSIONS, PREPROCESS_MODES
from .video import DEFAULT_MAX_FRAMES, VIDEO_EXTENSIONS

PROG = "mirage-detect"
DEFAULT_MODEL = os.path.join("outputs", "demo", "model")  # where `python train.py` exports the demo detector
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _actors(text: str) -> int | tuple[int, int]:
    """--concurrency: N actors, or MIN,MAX for an autoscaling pool."""
    try:
        bounds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {text!r}") from None
    if len(bounds) > 2 or min(bounds) < 1 or bounds != sorted(bounds):
        raise argparse.ArgumentTypeError(f"expected N >= 1 or 1 <= MIN <= MAX, got {text!r}")
    return bounds[0] if len(bounds) == 1 else (bounds[0], bounds[1])


def _margin(text: str) -> float:
    try:
        return check_unsure_margin(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=PROG,
        description="Detect AI-generated images and videos with a MiraGe detector (calibrated p(fake) per file).",
        epilog="Exit codes: 0 all scored, 2 some files unreadable or no image found, 1 usage error or no model.",
    )
    _add_inputs(parser)
    _add_model_options(parser)
    _add_media_options(parser)
    _add_output_options(parser)
    _add_ray_options(parser)
    return parser


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    """What to scan."""
    group = parser.add_argument_group("inputs")
    group.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="image or video files (a video by its extension; any other file is read as an image), folders "
        f"(searched recursively for {', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS))}; an "
        "animated gif is a video) or glob patterns such as 'shots/**/*.jpg'",
    )
    group.add_argument(
        "--files_from",
        metavar="LIST",
        help="also score the files listed in LIST, one path per line, taken literally ('-': read stdin)",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The detector and how it runs."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        help=f"detector folder or Hub id (default: {DEFAULT_MODEL}, the folder `python train.py` exports)",
    )
    group.add_argument("--batch_size", type=positive_int, default=32, help="images per forward pass (default 32)")
    group.add_argument(
        "--num_workers",
        type=non_negative_int,
        help="DataLoader processes decoding images while the model scores; 0 decodes in the main process "
        f"(default: the usable CPUs less one, at most 8; here {default_num_workers()})",
    )
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="torch (default), or ONNX Runtime on the graphs `mirage-export-onnx` writes: onnx (fp32) or "
        "onnx-int8 (quantized, fastest on CPU)",
    )
    group.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    group.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="model dtype (default float32)")
    group.add_argument(
        "--compile", action="store_true", help="torch.compile the image encoder (pays off on large folders)"
    )
    group.add_argument(
        "--preprocess",
        choices=PREPROCESS_MODES,
        help="resize: CLIP's resize and centre crop; center_crop: crop without resizing (keeps pixel traces); "
        "default: the one the model was calibrated with (its config's `preprocess`)",
    )
    group.add_argument(
        "--unsure_margin",
        type=_margin,
        default=DEFAULT_UNSURE_MARGIN,
        help="label 'unsure' when p(fake) is within this distance of 0.5, where the verdict flips "
        f"(default {DEFAULT_UNSURE_MARGIN})",
    )


def _add_media_options(parser: argparse.ArgumentParser) -> None:
    """Videos, stability copies and provenance: what is read besides an image's pixels."""
    group = parser.add_argument_group("videos, stability and provenance")
    sampling = group.add_mutually_exclusive_group()
    sampling.add_argument(
        "--max_frames",
        type=positive_int,
        default=DEFAULT_MAX_FRAMES,
        help=f"frames scored per video, uniform over its duration (default {DEFAULT_MAX_FRAMES}; fewer when the "
        "video has fewer); its row holds their mean p(fake), judged like an image's",
    )
    sampling.add_argument(
        "--fps", type=positive_float, help="instead of --max_frames: frames scored per second of video"
    )
    group.add_argument("--frames", action="store_true", help="also write a row per scored video frame")
    group.add_argument(
        "--stability",
        action="store_true",
        help="also score degraded copies of each input ("
        + ", ".join(f"{kind} {value:g}" for kind, value in STABILITY_COPIES)
        + ") and call the verdict 'unsure' when they fall on both sides of the threshold; adds the column spread "
        f"(costs {len(STABILITY_COPIES) + 1}x the forward passes)",
    )
    group.add_argument(
        "--provenance",
        action="store_true",
        help="also read C2PA manifests and the XMP DigitalSourceType (needs mirage-hf[provenance]); adds the "
        "columns source_type, c2pa_generator, c2pa_signer, c2pa_validation; never changes p(fake)",
    )
    group.add_argument(
        "--c2pa_trust_anchors",
        metavar="PEM",
        help="with --provenance: CA certificates whose signers count as trusted (else a valid manifest is 'valid')",
    )


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """Where and how the rows are written."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "--format",
        choices=(*FORMATS, "parquet"),
        help="output format (default table; parquet, with --engine ray, when --output ends in .parquet: a folder of "
        "Parquet files written by the workers)",
    )
    group.add_argument(
        "--output",
        help="write the results to this file instead of stdout: csv and jsonl row by row as batches are scored, "
        "table and json atomically at the end",
    )
    existing = group.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted scan: skip every path already in --output (csv or jsonl) and append the rest",
    )
    existing.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    group.add_argument(
        "--explain",
        metavar="DIR",
        help="also write per image an overlay PNG (red: pulls towards fake, blue: towards real) into DIR; costs "
        "about 32 forward and backward passes per batch (integrated gradients, see mirage_hf.explain)",
    )
    add_quiet(parser, "progress bar and no summary line")


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    """The scan on a Ray cluster."""
    ray = parser.add_argument_group('Ray Data, for more than one machine (pip install "mirage-hf[ray]")')
    ray.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local (default): this process and its DataLoader workers; ray: read tasks decode and an actor pool "
        "scores on a Ray cluster, inputs may be URIs (s3://, gs://, file://)",
    )
    ray.add_argument(
        "--ray_address", help="the Ray cluster to join (default: RAY_ADDRESS, else a local one started here)"
    )
    ray.add_argument(
        "--concurrency",
        type=_actors,
        default=1,
        metavar="N or MIN,MAX",
        help="scoring actors, or the bounds of an autoscaling pool (default 1)",
    )
    ray.add_argument(
        "--num_gpus_per_actor", type=non_negative_float, default=0.0, help="GPUs each scoring actor holds (default 0)"
    )


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, world: int) -> None:
    """Usage errors that argparse cannot see, reported before any model is loaded."""
    parquet_output = args.output is not None and args.output.endswith(".parquet")
    args.format = args.format or ("parquet" if parquet_output and args.engine == "ray" else "table")
    if args.engine == "local":
        ray_only = {"--format parquet": args.format == "parquet", "--ray_address": args.ray_address is not None,
                    "--concurrency": args.concurrency != 1, "--num_gpus_per_actor": args.num_gpus_per_actor != 0}  # fmt: skip
        if given := [option for option, used in ray_only.items() if used]:
            parser.error(f"{', '.join(given)}: only with --engine ray")
    else:
        if world > 1:
            parser.error("--engine ray spreads the scan over a Ray cluster; run it once, not under accelerate launch")
        if args.explain is not None:
            parser.error("--explain runs with --engine local")
        if args.format == "parquet" and args.output is None:
            parser.error("--format parquet writes a folder: give it as --output")
    if not args.inputs and args.files_from is None:
        parser.error("give INPUT files, folders or patterns, or --files_from LIST")
    if args.files_from not in (None, "-") and (not os.path.exists(args.files_from) or os.path.isdir(args.files_from)):
        parser.error(f"--files_from: no file {args.files_from!r}")
    if args.output is not None and ray_scan.is_uri(args.output):
        if args.format != "parquet":
            parser.error("--output: a URI takes --engine ray --format parquet (the workers write the files there)")
        if ray_scan.output_exists(args.output) and not (args.resume or args.overwrite):
            parser.error(f"--output: {args.output!r} exists; pass --resume to continue it or --overwrite to replace it")
    elif args.output is not None:
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
            parser.error(f"--output: the folder of {args.output!r} does not exist")
        if os.path.exists(args.output) and not (args.resume or args.overwrite):
            parser.error(f"--output: {args.output!r} exists; pass --resume to continue it or --overwrite to replace it")
    if args.resume and (args.output is None or args.format not in (*ROW_FORMATS, "parquet")):
        parser.error("--resume continues an --output written with --format csv, jsonl or (--engine ray) parquet")
    if world > 1 and args.output is None:
        parser.error("a scan under accelerate launch needs --output: each process writes a part next to it")
    if world > 1 and args.files_from == "-":
        parser.error("--files_from -: under accelerate launch every process reads the list; pass it as a file")
    if world > 1 and args.explain is not None:
        parser.error("--explain runs in one process, not under accelerate launch")
    if args.c2pa_trust_anchors is not None and not (args.provenance and os.path.isfile(args.c2pa_trust_anchors)):
        parser.error(f"--c2pa_trust_anchors: needs --provenance and a PEM file, got {args.c2pa_trust_anchors!r}")
    if args.explain is not None and os.path.exists(args.explain) and not os.path.isdir(args.explain):
        parser.error(f"--explain: {args.explain!r} exists and is not a folder")
    try:
        check_backend_options(args.backend, args.dtype, compile=args.compile, explain=args.explain is not None)
    except ValueError as err:
        parser.error(f"--backend {args.backend}: {err}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            parser.error(f"--device: {err}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device: CUDA is not available on this machine")


def _progress_bar(args, total: int, done: int, desc: str | None = None, quiet: bool = False) -> tqdm:
    """Images per second and ETA on stderr; none for --quiet, `quiet` or a single batch."""
    show = not (args.quiet or quiet) and total - done > args.batch_size
    return progress_bar(
        total=total, initial=done, unit="img", desc=desc, file=sys.stderr, disable=not show, smoothing=0.1
    )


def _num_workers(args, todo: int, processes_per_machine: int = 1) -> int:
    """--num_workers, or the default; none for a single batch, where starting workers costs more than it saves."""
    if args.num_workers is not None:
        return args.num_workers
    return default_num_workers(processes_per_machine) if todo > args.batch_size else 0


def _fields(args) -> tuple[str, ...]:
    return output_fields(args.stability, args.provenance)


def _scan(args, paths: PathList, score) -> Counter:
    """One process: rows streamed to --output or stdout (csv, jsonl), or written whole at the end (table, json).
    `score(paths, progress_bar)` yields the rows of `paths` batch by batch (this process's, or a Ray job's)."""
    counts = Counter()
    if args.format not in ROW_FORMATS:
        with _progress_bar(args, len(paths), 0) as bar:
            rows = count_labels(itertools.chain.from_iterable(score(paths, bar)), counts)
            width = max(map(len, paths))
            _write_whole(lambda handle: write_rows(rows, args.format, handle, width, _fields(args)), args.output)
        return counts
    fields = resume_columns(args.output, args.format, _fields(args)) if args.resume else _fields(args)
    done = done_paths(count_labels(resumed_rows(args.output, args.format), counts)) if args.resume else ()
    todo = PathList(path for path in paths if path not in done) if done else paths
    writer = RowWriter(args.format, args.output, append=args.resume, fields=fields)
    try:
        with _progress_bar(args, len(paths), len(paths) - len(todo)) as bar:
            for rows in score(todo, bar) if todo else ():
                writer.write(list(count_labels(rows, counts)))
    finally:
        writer.close()
    return counts


def _local_scorer(args, detector: Detector, media: MediaOptions, processes_per_machine: int = 1):
    """This process's scorer (`_scan`, `scan_shard`): DataLoader workers decode, the detector scores here."""

    def score(paths: PathList, bar):
        workers = _num_workers(args, len(paths), processes_per_machine)
        return score_batches(detector, paths, args.batch_size, workers, args.explain, bar, media)

    return score


def _ray_scorer(args, model: str, media: MediaOptions):
    """A Ray job's `_scan` scorer: read tasks decode and an actor pool scores on the cluster (`ray_scan`)."""

    def score(paths: PathList, bar):
        return ray_scan.row_batches(_ray_dataset(args, model, paths, media), bar)

    return score


def _ray_dataset(args, model: str, paths, media: MediaOptions):
    detector_options = {"device": args.device, "dtype": DTYPES[args.dtype], "backend": args.backend,
                        "preprocess": args.preprocess, "unsure_margin": args.unsure_margin, "compile": args.compile}  # fmt: skip
    return ray_scan.scan_dataset(
        model, paths, media, args.batch_size, args.concurrency, args.num_gpus_per_actor, **detector_options
    )


def _scan_parquet(args, model: str, paths: PathList, media: MediaOptions) -> Counter:
    """--engine ray --format parquet: the workers write the rows as Parquet files into the --output folder; resuming
    adds files for the paths not yet in it. Returns the labels of every file the folder holds."""
    if args.overwrite:
        ray_scan.remove_output(args.output)
    done = done_paths(ray_scan.parquet_rows(args.output)) if args.resume else set()
    todo = PathList(path for path in paths if path not in done)
    if todo:
        _ray_dataset(args, model, todo, media).write_parquet(args.output)
    rows = ray_scan.parquet_rows(args.output, ("path", "label", "frame"))
    return Counter(row.label for row in rows if row.frame is None)


def _write_whole(write, output: str | None) -> None:
    """Table and json: atomically into `output`, or through a temporary file copied to stdout at the end, so that
    the rows never interleave with the progress bar."""
    if output is not None:
        write_output(write, output)
        return
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="") as handle:
        write(handle)
        handle.seek(0)
        shutil.copyfileobj(handle, sys.stdout)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except SystemExit as exit_:  # --help (0), a usage error (1) or a stop already reported, as a return code
        return exit_.code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch (and torchrun) for every process
    args = parser.parse_args(argv)
    _check_args(parser, args, world)

    model = args.model or (DEFAULT_MODEL if os.path.isdir(DEFAULT_MODEL) else None)
    if model is None:
        print(
            f"{PROG}: no model given and no {DEFAULT_MODEL} folder here. Run `python train.py` to train the offline "
            "demo detector there, or pass --model <folder or Hub id>.",
            file=sys.stderr,
        )
        return 1

    media = _media_options(args)
    started = time.perf_counter()
    paths = _inputs(args)
    state = _process_group(args, world) if world > 1 else None

    hide_library_bars()  # the weight-loading bar is noise in a command-line tool
    offline = not os.path.isdir(model) and offline_if_hub_unreachable()
    if args.engine == "ray":
        return _main_ray(args, model, paths, media, started)
    detector = _load_detector(args, model, state, offline)

    if args.explain:
        os.makedirs(args.explain, exist_ok=True)
    try:
        if state is None:
            counts = _scan(args, paths, _local_scorer(args, detector, media))
        else:
            score = _local_scorer(args, detector, media, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            progress = functools.partial(_progress_bar, args)
            counts = scan_shard(score, paths, state, args.output, args.format, _fields(args), args.resume, progress)
    except ScanOutputError as err:
        return _stopped(err)
    if counts is None:  # a process of a sharded scan other than the main one: the main process reports
        return 0
    return _report(args, counts, started, sharded=state is not None)


def _media_options(args) -> MediaOptions:
    """What to read besides pixels (video frames, stability copies, provenance); exit code 1 if provenance cannot
    be read."""
    provenance = None
    if args.provenance:
        try:
            provenance = functools.partial(read_provenance, c2pa=C2paReader(args.c2pa_trust_anchors))
        except (ImportError, ValueError) as err:
            print(f"{PROG}: --provenance: {err}", file=sys.stderr)
            raise SystemExit(1) from err
    return MediaOptions(args.fps, args.max_frames, args.frames, args.stability, provenance)


def _inputs(args) -> PathList:
    """The files to scan (each once); exit code 2 when there are none. Empty folders are named."""
    empty_folders = []
    find = ray_scan.find_inputs if args.engine == "ray" else find_images  # URIs (s3://, gs://) for Ray's readers
    paths = find(args.inputs, args.files_from, on_empty_folder=empty_folders.append)
    if not paths:
        print(f"{PROG}: no image or video files found in {' '.join(args.inputs) or args.files_from}", file=sys.stderr)
        raise SystemExit(2)
    for folder in empty_folders:  # the scan goes on with the other inputs, but says what it found nothing in
        print(f"{PROG}: no image or video files in {folder}", file=sys.stderr)
    return paths


def _process_group(args, world: int):
    """This process's place in a scan under `accelerate launch` (gloo between CPUs); exit code 1 when the parts to
    resume were written by another number of processes."""
    from accelerate import PartialState

    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    if args.resume and (stale := foreign_parts(args.output, world)):
        print(f"{PROG}: parts of a run with another number of processes exist ({stale[0]}, ...); resume "
              "with that number of processes", file=sys.stderr)  # fmt: skip
        raise SystemExit(1)
    return state


def _load_detector(args, model: str, state, offline: bool) -> Detector:
    """The detector on this process's device; exit code 1 with what went wrong and where it was looked for."""
    try:
        return Detector.from_pretrained(
            model,
            device=args.device or (state.device if state is not None else None),
            dtype=DTYPES[args.dtype],
            backend=args.backend,
            preprocess=args.preprocess,
            unsure_margin=args.unsure_margin,
            compile=args.compile,
        )
    except ModelNotFound as err:
        raise SystemExit(_stopped(err)) from err
    except (ImportError, OSError, ValueError, RuntimeError) as err:
        where = "" if os.path.isdir(model) else " (no such local folder, so it was tried as a Hub id)"
        where += ", and the Hub cannot be reached" if offline else ""
        print(f"{PROG}: cannot load the model {model!r}{where}: {err}", file=sys.stderr)
        raise SystemExit(1) from err


def _main_ray(args, model: str, paths: PathList, media: MediaOptions, started: float) -> int:
    """The scan on a Ray cluster: the detector is loaded by each scoring actor, not here."""
    try:
        ray_scan.connect(args.ray_address, args.quiet)
        check_model_name(model)
        if args.format == "parquet":
            counts = _scan_parquet(args, model, paths, media)
        else:
            counts = _scan(args, paths, _ray_scorer(args, model, media))
    except (ImportError, ModelNotFound, ScanOutputError) as err:
        return _stopped(err)
    return _report(args, counts, started, sharded=False)


STOPPED = {ModelNotFound: "", ScanOutputError: "cannot resume: ", ImportError: "--engine ray: "}
"""What stops a scan with exit code 1, and the words before its message (ImportError: Ray is not installed)."""


def _stopped(err: Exception) -> int:
    """The one line on stderr and the exit code of a scan that `err` stopped (see STOPPED)."""
    prefix = next(words for kind, words in STOPPED.items() if isinstance(err, kind))
    print(f"{PROG}: {prefix}{err}", file=sys.stderr)
    return 1


def _report(args, counts: Counter, started: float, sharded: bool) -> int:
    """The summary line and the exit code."""
    failed, generated = counts.pop("error", 0), counts.pop(GENERATED_BY_METADATA, 0)
    if not args.quiet:
        labels = ", ".join(f"{counts[label]} {label}" for label in ("fake", "real", "unsure"))
        metadata = f", {generated} whose metadata says AI-generated" if args.provenance else ""
        elapsed = time.perf_counter() - started
        print(
            f"{PROG}: {sum(counts.values())} scored ({labels}), {failed} unreadable{metadata}; {elapsed:.1f} s",
            file=sys.stderr,
        )
    # Under a launcher a non-zero exit is reported as a crashed process, so a completed sharded scan exits 0 and
    # unreadable files are told by the summary line and the error rows.
    return 2 if failed and not sharded else 0


if __name__ == "__main__":
    sys.exit(main())
