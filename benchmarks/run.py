#!/usr/bin/env python
"""Speed and memory of MiraGe against the bare CLIP vision tower, side by side in one run.

    python benchmarks/run.py            # CPU: ViT-B/16-sized random CLIP, a couple of minutes on 2 cores
    python benchmarks/run.py --gpu      # GPU: ViT-L/14-sized random CLIP, bf16 rows, host-device sync check
    python benchmarks/run.py --tiny     # a tiny CLIP in seconds: checks the script itself (the tests run it)

Every number is a ratio against a baseline measured in the same process on the same batch; the table is
printed and written as JSON (--output). Weights are random: speed does not depend on their values.
The data-pipeline and evaluation-memory rows need `datasets`, the ONNX Runtime rows the `[onnx]` extra; where
they are not installed (as on the lent GPU machines) those rows are skipped and the report says why.
"""

import argparse
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import date

import torch
from transformers import CLIPConfig

from mirage_hf import MiraGeConfig, MiraGeForImageClassification
from mirage_hf.atomic import atomic_write
from mirage_hf.inference import Detector
from mirage_hf.onnx_export import export_graph, quantize_graph
from mirage_hf.onnx_runtime import ONNX_FILES, OnnxModel, require_onnx, session
from mirage_hf.scoring import compile_image_path


@dataclass(frozen=True)
class Profile:
    """Model sizes and measuring budget of one kind of run."""

    name: str
    vision: dict
    text: dict
    projection_dim: int
    image_size: int
    batch: int
    train_batch: int
    seconds: float
    data_images: int
    worker_counts: tuple[int, ...]


PROFILES = {
    "cpu": Profile(
        name="ViT-B/16",
        vision={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "patch_size": 16},
        text={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
        projection_dim=512, image_size=224, batch=8, train_batch=8, seconds=4.0,
        data_images=512, worker_counts=(0, 2),
    ),
    "gpu": Profile(
        name="ViT-L/14",
        vision={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "patch_size": 14},
        text={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        projection_dim=768, image_size=224, batch=256, train_batch=128, seconds=5.0,
        data_images=4096, worker_counts=(0, 4, 8, 16),
    ),
    "tiny": Profile(
        name="tiny",
        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                "patch_size": 8},
        text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4},
        projection_dim=16, image_size=32, batch=4, train_batch=4, seconds=0.2,
        data_images=128, worker_counts=(0,),
    ),
}  # fmt: skip


def build(profile, attn, device, **mirage):
    """A random MiraGe model of the profile's size, made directly on `device` (no slow CPU init of ViT-L)."""
    clip = CLIPConfig(
        vision_config={**profile.vision, "image_size": profile.image_size},
        text_config=profile.text,
        projection_dim=profile.projection_dim,
    )
    depth = min(9, profile.vision["num_hidden_layers"], profile.text["num_hidden_layers"])
    torch.manual_seed(0)
    with torch.device(device):
        model = MiraGeForImageClassification(MiraGeConfig(clip_config=clip, n_ctx=2, prompt_depth=depth, **mirage))
    model.set_attn_implementation(attn)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def throughput(fn, batch, device, seconds, warmup=2):
    """Images per second of `fn()` over at least `seconds` (after warm-up calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    sync(device)
    return calls * batch / (time.perf_counter() - start)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def inference_rows(args, profile, device):
    pixels, _ = random_batch(profile, args.batch, device)
    rows = {}

    def bare(model, autocast_dtype=None):
        tower = model.clip

        def run():
            with torch.inference_mode(), autocast(device, autocast_dtype):
                tower.get_image_features(pixel_values=pixels)

        return run

    def mirage(model, autocast_dtype=None):
        def run():
            with torch.inference_mode(), autocast(device, autocast_dtype):
                model(pixel_values=pixels)

        return run

    def peer_style(model):
        """What research detectors do: fp32 eager, text features recomputed for every batch.

        All fp32 rows keep PyTorch's default of no TF32 matmuls, as such code runs.
        """

        def run():
            with torch.no_grad():
                model._anchor_cache = None
                model(pixel_values=pixels)

        return run

    sdpa = build(profile, "sdpa", device, mode="maple").eval()
    eager = build(profile, "eager", device, mode="maple").eval()
    variants = {
        "bare CLIP tower, fp32, SDPA": bare(sdpa),
        "MiraGe, fp32, SDPA, cached anchors": mirage(sdpa),
        "peer-style: MiraGe fp32 eager, anchors recomputed": peer_style(eager),
    }
    if args.bf16:
        variants["bare CLIP tower, bf16, SDPA"] = bare(sdpa, torch.bfloat16)
        variants["MiraGe, bf16, SDPA, cached anchors"] = mirage(sdpa, torch.bfloat16)
    if args.compile:
        compiled = compile_image_path(build(profile, "sdpa", device, mode="maple").eval())  # what --compile runs
        cast = torch.bfloat16 if args.bf16 else None
        start = time.perf_counter()
        mirage(compiled, cast)()
        sync(device)
        rows["compile time (s)"] = time.perf_counter() - start
        variants[f"MiraGe compiled, {'bf16' if cast else 'fp32'}, SDPA"] = mirage(compiled, cast)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Rounds alternate the variants so that drift (clock, cache, other load) hits all of them alike; best round kept.
    for _ in range(args.rounds):
        for name, run in variants.items():
            rows[name] = max(rows.get(name, 0.0), throughput(run, args.batch, device, args.seconds))
    if device.type == "cuda":
        rows["inference: peak GPU memory (MiB)"] = peak_memory_mb(device)
    return rows


def random_batch(profile, size, device):
    """Random pixels and alternating real/fake labels."""
    pixels = torch.randn(size, 3, profile.image_size, profile.image_size, device=device)
    return pixels, torch.arange(size, device=device) % 2


def prompts_only_step(model, pixels, labels, device, cast):
    """One optimiser step of the prompts (the MiraGe loss, AdamW), as a closure; the caller sets the model's mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        with autocast(device, cast):
            loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def training_rows(args, profile, device):
    """A prompts-only training step, with and without activation checkpointing."""
    pixels, labels = random_batch(profile, args.train_batch, device)
    cast = torch.bfloat16 if args.bf16 else None
    rows = {}
    for checkpointing in (False, True):
        model = build(profile, "sdpa", device, mode="mirage").train()
        if checkpointing:
            model.activation_checkpointing_enable()
        step = prompts_only_step(model, pixels, labels, device, cast)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        name = f"training step, prompts only, {'bf16' if cast else 'fp32'}"
        name += ", activation checkpointing" if checkpointing else ""
        rows[name] = throughput(step, args.train_batch, device, args.seconds, warmup=1)
        memory = "peak GPU memory (MiB)" if device.type == "cuda" else "peak RSS of the process so far (MiB)"
        rows[f"{name}: {memory}"] = peak_memory_mb(device)
        del model, step
    return rows


def sync_checks(profile, device):
    """Whether the eval forward and a training step run without a host-device sync (CUDA's sync debug mode)."""
    pixels, labels = random_batch(profile, 8, device)
    model = build(profile, "sdpa", device, mode="mirage")

    def eval_forward():
        with torch.inference_mode(), autocast(device, torch.bfloat16):
            model(pixel_values=pixels)

    checks = {}
    training_step = prompts_only_step(model, pixels, labels, device, torch.bfloat16)
    for name, training, fn in (
        ("eval forward, anchors cached", False, eval_forward),
        ("training step", True, training_step),
    ):
        model.train(training)
        fn()  # warm-up: the anchor cache, lazy optimizer state
        sync(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
            checks[f"host-device syncs: {name}"] = "none"
        except RuntimeError as error:
            checks[f"host-device syncs: {name}"] = str(error).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return checks


def export_graphs(profile, folder) -> dict:
    """The ONNX graphs of the benchmark's MiraGe model (built on the CPU, as `mirage-export-onnx` loads it), by
    backend, and the seconds each took to write."""
    model = build(profile, "sdpa", torch.device("cpu"), mode="maple").eval()
    paths, seconds = {backend: os.path.join(folder, name) for backend, name in ONNX_FILES.items()}, {}
    start = time.perf_counter()
    export_graph(model, paths["onnx"])
    seconds["onnx"] = time.perf_counter() - start
    start = time.perf_counter()
    quantize_graph(paths["onnx"], paths["onnx-int8"])
    seconds["onnx-int8"] = time.perf_counter() - start
    return {"paths": paths, "seconds": seconds, "config": model.config}


def onnx_rows(args, profile, device, graphs):
    """ONNX Runtime against the torch backend (PyTorch fp32 eager: SDPA, cached anchors) and the bare CLIP tower,
    at batch 1 (the Space) and the profile's batch, alternating rounds on the same pixels. On CUDA: the fp32 graph
    on ONNX Runtime's CUDA provider next to PyTorch bf16 (dynamic int8 is a CPU technique)."""
    rows = {f"export time, {backend} (s)": value for backend, value in graphs["seconds"].items()}
    sdpa = build(profile, "sdpa", device, mode="maple").eval()
    cuda = device.type == "cuda"
    backends = {"onnx": ["CUDAExecutionProvider"]} if cuda else {b: ["CPUExecutionProvider"] for b in ONNX_FILES}
    cast, precision = (torch.bfloat16, "bf16") if cuda else (None, "fp32")
    variants = {}
    for batch in dict.fromkeys((1, args.batch)):
        pixels, _ = random_batch(profile, batch, device)
        host = pixels.cpu().numpy()

        def bare(pixels=pixels):
            with torch.inference_mode(), autocast(device, cast):
                sdpa.clip.get_image_features(pixel_values=pixels)

        def eager(pixels=pixels):
            with torch.inference_mode(), autocast(device, cast):
                sdpa(pixel_values=pixels)

        variants[(f"bare CLIP tower, {precision}, SDPA, batch {batch}", batch)] = bare
        variants[(f"PyTorch {precision} eager (torch backend), batch {batch}", batch)] = eager
        for backend, providers in backends.items():
            graph = session(graphs["paths"][backend], providers)
            provider = "CUDA provider" if cuda else "CPU"
            name = f"ONNX Runtime {'int8' if backend == 'onnx-int8' else 'fp32'}, {provider}, batch {batch}"
            variants[(name, batch)] = lambda graph=graph, host=host: graph.run(["p_fake"], {"pixel_values": host})
    for _ in range(args.rounds):
        for (name, batch), run in variants.items():
            rows[name] = max(rows.get(name, 0.0), throughput(run, batch, device, args.seconds))
    return rows


def latency_rows(args, profile, graphs=None):
    """Single-image latency of the Space's predict path (Detector on CPU, a 640x480 input), for each backend."""
    from PIL import Image

    from mirage_hf.demo.tiny import tiny_image_processor

    image = Image.new("RGB", (640, 480), "gray")
    processor = tiny_image_processor(profile.image_size)
    detectors = {"torch": Detector(build(profile, "sdpa", torch.device("cpu"), mode="maple").eval(), processor)}
    for backend, path in (graphs or {}).get("paths", {}).items():
        model = OnnxModel(path, graphs["config"], backend, ["CPUExecutionProvider"])
        detectors[backend] = Detector(model, processor)
    rows = {}
    for _ in range(1 if graphs is None else args.rounds):
        for backend, detector in detectors.items():
            detector([image])
            start, calls = time.perf_counter(), 0
            while calls < 3 or time.perf_counter() - start < args.seconds:
                detector([image])
                calls += 1
            name = f"single-image latency, {profile.name} on CPU, backend {backend} (ms)"
            rows[name] = min(rows.get(name, math.inf), 1000 * (time.perf_counter() - start) / calls)
    return rows


def data_rows(args, profile):
    """Decode + augment + collate throughput of the training input pipeline alone (CPU), per worker count.

    128 generated images repeated to `profile.data_images` rows (the cost per row is the same, the generation
    time is not); timed from the first batch on, so worker start-up is not counted against steady throughput.
    """
    from datasets import concatenate_datasets
    from torch.utils.data import DataLoader

    from mirage_hf.data import load_genimage
    from mirage_hf.demo.synthetic import make_synthetic_genimage
    from mirage_hf.demo.tiny import tiny_image_processor
    from mirage_hf.transforms import DetectionCollator, Preprocessor, TrainAugmentation

    rows = {}
    with tempfile.TemporaryDirectory() as root:
        make_synthetic_genimage(root, generators=["upsampler"], n_train_per_class=64, n_val_per_class=1, image_size=256)
        dataset = load_genimage(root, split="train")
        dataset = concatenate_datasets([dataset] * (profile.data_images // len(dataset)))
        augmentation = TrainAugmentation(profile.image_size, resize_prob=0.1, blur_prob=0.1, jpeg_prob=0.1)
        collate = DetectionCollator(Preprocessor(tiny_image_processor(profile.image_size), "resize", augmentation))
        for workers in [w for w in profile.worker_counts if w <= (os.cpu_count() or 1)]:
            loader = iter(DataLoader(dataset, batch_size=32, num_workers=workers, collate_fn=collate, shuffle=True))
            next(loader)
            start = time.perf_counter()
            seen = sum(batch["labels"].numel() for batch in loader)
            rows[f"data pipeline, {workers} workers (images/s)"] = seen / (time.perf_counter() - start)
    return rows


def eval_memory_rows(args):
    """Peak RSS while evaluation streams 8x more images: flat when nothing per image is kept but one float."""
    from accelerate import Accelerator

    from mirage_hf.data import load_genimage
    from mirage_hf.demo.synthetic import make_synthetic_genimage
    from mirage_hf.demo.tiny import tiny_clip_config, tiny_image_processor
    from mirage_hf.evaluation import predict
    from mirage_hf.transforms import Preprocessor

    model = MiraGeForImageClassification(MiraGeConfig(clip_config=tiny_clip_config(), prompt_depth=2)).eval()
    preprocess, accelerator, rows = Preprocessor(tiny_image_processor()), Accelerator(cpu=True), {}
    small, large = (16, 128) if args.tiny else (256, 2048)
    with tempfile.TemporaryDirectory() as root:
        make_synthetic_genimage(root, generators=["upsampler"], n_train_per_class=large // 2, n_val_per_class=1,
                                image_size=64)  # fmt: skip
        dataset = load_genimage(root, split="train")
        predict(model, dataset.select(range(16)), preprocess, accelerator)  # warm-up: allocator, imports
        for n in (small, large):
            before = peak_memory_mb(torch.device("cpu"))
            predict(model, dataset.select(range(n)), preprocess, accelerator, batch_size=64)
            rows[f"evaluation of {n} images: peak RSS growth (MiB)"] = peak_memory_mb(torch.device("cpu")) - before
    return rows


def datasets_missing():
    """Why the rows that load data through `datasets` cannot run here, or None where they can.

    Builds a one-row data set rather than only importing: an install can import and still fail to build one
    (seen with Python 3.12.1, where fingerprinting a table fails to pickle pyarrow's MonthDayNano).
    """
    try:
        import datasets

        datasets.Dataset.from_dict({"probe": [1]})
    except Exception as error:  # noqa: BLE001 - any failure here only means these rows cannot be measured
        return f"skipped: `datasets` does not work here ({type(error).__name__}: {error})"
    return None


def onnx_missing():
    """Why the ONNX Runtime rows cannot run here, or None where they can."""
    try:
        require_onnx("The ONNX rows")
    except ImportError as error:
        return f"skipped: {error}"
    return None


def onnx_ratios(rows, args, device):
    """ONNX Runtime over the torch backend and over the bare tower, per batch; Space latency speed-ups."""
    ratios = {}
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    for batch in dict.fromkeys((1, args.batch)):
        for graph in ("fp32",) if cuda else ("fp32", "int8"):
            onnx = rows.get(f"ONNX Runtime {graph}, {'CUDA provider' if cuda else 'CPU'}, batch {batch}")
            if onnx is None:
                continue
            ratios[f"ONNX {graph} / PyTorch {precision} eager, batch {batch}"] = (
                onnx / rows[f"PyTorch {precision} eager (torch backend), batch {batch}"]
            )
            ratios[f"ONNX {graph} / bare tower {precision}, batch {batch}"] = (
                onnx / rows[f"bare CLIP tower, {precision}, SDPA, batch {batch}"]
            )
    latency = {name.split("backend ")[1].split(" ")[0]: value for name, value in rows.items() if " backend " in name}
    for backend in ONNX_FILES:
        if backend in latency:
            ratios[f"Space latency speed-up, {backend} over torch"] = latency["torch"] / latency[backend]
    return ratios


def ratios_of(rows, args, device):
    """The comparisons the targets are stated in, each between rows of this run."""
    mirage, peer = rows["MiraGe, fp32, SDPA, cached anchors"], rows["peer-style: MiraGe fp32 eager, anchors recomputed"]
    ratios = {
        "MiraGe / bare tower (fp32 SDPA)": mirage / rows["bare CLIP tower, fp32, SDPA"],
        "MiraGe / peer-style fp32 eager": mirage / peer,
    }
    if args.bf16:
        mirage_bf16 = rows["MiraGe, bf16, SDPA, cached anchors"]
        ratios["MiraGe bf16 / bare tower bf16"] = mirage_bf16 / rows["bare CLIP tower, bf16, SDPA"]
        ratios["MiraGe bf16 / peer-style fp32 eager"] = mirage_bf16 / peer
    compiled = next((value for name, value in rows.items() if name.startswith("MiraGe compiled")), None)
    if compiled is not None:
        bare = rows[f"bare CLIP tower, {'bf16' if args.bf16 else 'fp32'}, SDPA"]
        ratios["compiled MiraGe / bare tower (same dtype)"] = compiled / bare
        ratios["compiled MiraGe / peer-style fp32 eager"] = compiled / peer
    step = next(value for name, value in rows.items() if name.startswith("training step") and ":" not in name)
    pipeline = [value for name, value in rows.items() if name.startswith("data pipeline")]
    if pipeline:
        ratios["data pipeline (most workers) / training step"] = pipeline[-1] / step
    return ratios | onnx_ratios(rows, args, device)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--gpu", action="store_true", help="ViT-L/14 on CUDA, with bf16 rows and the sync check")
    size.add_argument("--tiny", action="store_true", help="a tiny CLIP on the CPU, to check the script itself")
    parser.add_argument("--bf16", action="store_true", help="also measure bf16 autocast (always on with --gpu)")
    parser.add_argument("--compile", action="store_true", help="also measure the torch.compile path")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--train_batch", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="measuring time per row")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per inference variant")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    args.bf16 = args.bf16 or args.gpu
    return args


def main(argv=None):
    args = parse_args(argv)
    profile = PROFILES["gpu" if args.gpu else "tiny" if args.tiny else "cpu"]
    device = torch.device("cuda" if args.gpu else "cpu")
    args.batch = args.batch or profile.batch
    args.train_batch = args.train_batch or profile.train_batch
    args.seconds = args.seconds or profile.seconds
    args.rounds = args.rounds or (1 if args.tiny else 3)

    rows, checks = {}, {}
    missing, no_onnx = datasets_missing(), onnx_missing()
    skipped = {"evaluation memory and data pipeline": missing} if missing else {}
    if no_onnx:
        skipped["ONNX Runtime rows"] = no_onnx
    elif device.type == "cuda" and "CUDAExecutionProvider" not in require_onnx("ONNX").get_available_providers():
        skipped["ONNX Runtime rows"] = "skipped: this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)"
    if not missing:
        rows.update(eval_memory_rows(args))  # first: before the big models raise the process peak
    rows.update(inference_rows(args, profile, device))
    rows.update(training_rows(args, profile, device))
    with tempfile.TemporaryDirectory() as folder:
        graphs = None if "ONNX Runtime rows" in skipped else export_graphs(profile, folder)
        if graphs is not None:
            rows.update(onnx_rows(args, profile, device, graphs))
        if device.type == "cuda":
            checks.update(sync_checks(profile, device))
        else:
            rows.update(latency_rows(args, profile, graphs))
    if not missing:
        rows.update(data_rows(args, profile))
    ratios = ratios_of(rows, args, device)

    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "onnxruntime": None if no_onnx else require_onnx("The ONNX rows").__version__,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "model": profile.name,
        "batch": args.batch,
        "train_batch": args.train_batch,
        "rows": rows,
        "ratios": ratios,
        "checks": checks,
        "skipped": skipped,
    }
    width = max(map(len, [*rows, *ratios, *checks]))
    for name, value in [*rows.items(), *ratios.items()]:
        print(f"{name:<{width}}  {value:10.3f}")
    for name, value in [*checks.items(), *skipped.items()]:
        print(f"{name:<{width}}  {value}")
    if not all(math.isfinite(value) and value > 0 for value in ratios.values()):
        raise SystemExit(f"a ratio is not a positive number: {ratios}")
    if args.output:
        with atomic_write(args.output) as staging:
            staging.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
