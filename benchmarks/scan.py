#!/usr/bin/env python
"""Throughput and memory of `mirage-detect` scanning a folder of JPEGs, as a user runs it.

    python benchmarks/scan.py                       # 2000 JPEGs, tiny detector at 224 px: the input pipeline
    python benchmarks/scan.py --vit_b16 64          # also a ViT-B/16-sized random detector on 64 of them
    python benchmarks/scan.py --images 64 --rss_files 100 1000 --output /tmp/scan.json   # a quick check
    python benchmarks/scan.py --ray 1 2                 # also --engine ray on a local cluster, 1 and 2 actors

Images/s is the wall time of `mirage_hf.cli.main` over the whole folder (model loading and worker start-up
included, as a user waits for them), at 0 workers and at each worker count, with the ratio against 0 workers
from the same run. With the tiny detector the model costs next to nothing, so its rate is the rate at which the
scan decodes and preprocesses (224 px, CLIP's resize and centre crop); the ViT-B/16 row is model-bound.
Peak RSS is that of a fresh process running `mirage-detect --files_from LIST` (its VmHWM) for each
number of files, so the path list and the rows of a large scan show, and nothing of this process does.
With `--ray`, the same folder is scanned with `--engine ray` on a local Ray cluster of this machine's CPUs (started
once, its start-up timed apart), with each number of scoring actors, and compared with the local scan's best rate
from the same run; each Ray scan's wall time includes its actors' start (they load the detector).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date

import numpy as np
import torch
from peak_rss import run_with_peak_rss
from PIL import Image
from transformers import CLIPConfig

from mirage_hf import MiraGeConfig, MiraGeForImageClassification
from mirage_hf.atomic import atomic_write
from mirage_hf.cli import main as detect
from mirage_hf.demo.tiny import tiny_clip_config, tiny_image_processor
from mirage_hf.model_folder import export_model

VIT_B16 = CLIPConfig(
    vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "patch_size": 16, "image_size": 224},
    text_config={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
    projection_dim=512,
)  # fmt: skip


def save_detector(clip_config, folder, prompt_depth):
    torch.manual_seed(0)
    model = MiraGeForImageClassification(MiraGeConfig(clip_config=clip_config, n_ctx=2, prompt_depth=prompt_depth))
    return str(export_model(model.eval(), tiny_image_processor(224), folder))


def write_jpegs(folder, count, size=(512, 384), distinct=32):
    """`count` photo-sized JPEGs (quality 90): `distinct` smooth-plus-noise images, each copied in turn."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(distinct):
        ramp = np.linspace(0, 255, size[0])[None, :, None] * rng.uniform(0.2, 1.0, 3)
        pixels = np.clip(ramp + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"seed-{len(encoded)}.jpg")
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        encoded.append(open(path, "rb").read())
        os.remove(path)
    paths = []
    for index in range(count):
        paths.append(os.path.join(folder, f"photo-{index:06d}.jpg"))
        with open(paths[-1], "wb") as handle:
            handle.write(encoded[index % distinct])
    return paths


def images_per_second(model, folder, count, workers, batch, scratch):
    output = os.path.join(scratch, f"scores-{workers}.jsonl")
    start = time.perf_counter()
    code = detect([folder, "--model", model, "--format", "jsonl", "--output", output, "--overwrite",
                   "--batch_size", str(batch), "--num_workers", str(workers), "--quiet"])  # fmt: skip
    elapsed = time.perf_counter() - start
    rows = sum(1 for _ in open(output))
    if code != 0 or rows != count:
        raise SystemExit(f"the scan at {workers} workers gave exit code {code} and {rows} rows for {count} files")
    return count / elapsed


def ray_rows(model, folder, count, actors, batch, scratch) -> dict:
    """Start-up of a local Ray cluster, then images/s of `--engine ray` with each number of scoring actors."""
    import ray

    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    rows = {"Ray: starting a local cluster, s": time.perf_counter() - start}
    single = [os.path.join(folder, "photo-000000.jpg"), "--model", model, "--engine", "ray", "--quiet"]
    start = time.perf_counter()
    detect([*single, "--format", "csv", "--output", os.path.join(scratch, "ray-one.csv"), "--overwrite"])
    rows["Ray: one image (actor start and model load), s"] = time.perf_counter() - start
    for n in actors:
        output = os.path.join(scratch, f"ray-{n}.jsonl")
        start = time.perf_counter()
        code = detect([folder, "--model", model, "--engine", "ray", "--concurrency", str(n), "--format", "jsonl",
                       "--output", output, "--overwrite", "--batch_size", str(batch), "--quiet"])  # fmt: skip
        elapsed = time.perf_counter() - start
        scored = sum(1 for _ in open(output))
        if code != 0 or scored != count:
            raise SystemExit(f"the Ray scan with {n} actors gave exit code {code} and {scored} rows for {count} files")
        rows[f"Ray: tiny detector, {n} actors, images/s"] = count / elapsed
    ray.shutdown()
    return rows


def peak_rss_mib(model, files, scratch):
    """Peak RSS of one `mirage-detect --files_from` process over `files` hard links of one small JPEG."""
    seed = os.path.join(scratch, "rss-seed.jpg")
    Image.new("RGB", (64, 48), (90, 120, 200)).save(seed, "JPEG")
    folder = os.path.join(scratch, "rss")
    os.makedirs(folder, exist_ok=True)
    links = [os.path.join(folder, f"link-{index:07d}.jpg") for index in range(files)]
    for link in links:
        if not os.path.exists(link):
            os.link(seed, link)
    listing = os.path.join(scratch, f"list-{files}.txt")
    with open(listing, "w") as handle:
        handle.writelines(link + "\n" for link in links)
    detect_args = ["--files_from", listing, "--model", model, "--format", "jsonl", "--output",
                   os.path.join(scratch, f"rss-{files}.jsonl"), "--overwrite", "--batch_size", "64", "--num_workers",
                   "0", "--quiet"]  # fmt: skip
    code, peak_mib = run_with_peak_rss("mirage_hf.cli", detect_args, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if code != 0:
        raise SystemExit(f"mirage-detect exited with {code}")
    return peak_mib


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the timed folder (default 2000)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts besides 0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vit_b16", type=int, default=0, metavar="N", help="also time a ViT-B/16 on N images")
    parser.add_argument("--rss_files", type=int, nargs=2, default=(1000, 20000), metavar=("SMALL", "LARGE"))
    parser.add_argument("--ray", type=int, nargs="*", metavar="ACTORS", help="also --engine ray with these actors")
    parser.add_argument("--output", default=None, help="write the report as JSON here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cpus = len(os.sched_getaffinity(0))
    workers = sorted({w for w in (args.workers or {1, cpus}) if w > 0})
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        tiny = save_detector(tiny_clip_config(image_size=224, patch_size=32), os.path.join(scratch, "tiny"), 2)
        folder = os.path.join(scratch, "photos")
        write_jpegs(folder, args.images)
        warm_up = [os.path.join(folder, "photo-000000.jpg"), "--model", tiny, "--quiet", "--format", "csv"]
        detect([*warm_up, "--output", os.path.join(scratch, "warm-up.csv")])  # imports and caches, not timed
        base = images_per_second(tiny, folder, args.images, 0, args.batch, scratch)
        rows["tiny detector, 0 workers, images/s"] = base
        for count in workers:
            rate = images_per_second(tiny, folder, args.images, count, args.batch, scratch)
            rows[f"tiny detector, {count} workers, images/s"] = rate
            rows[f"tiny detector, {count} workers / 0 workers"] = rate / base
        if args.vit_b16:
            vit = save_detector(VIT_B16, os.path.join(scratch, "vit-b16"), 9)
            subset = os.path.join(scratch, "subset")
            os.makedirs(subset)
            for name in sorted(os.listdir(folder))[: args.vit_b16]:
                os.link(os.path.join(folder, name), os.path.join(subset, name))
            for count in (0, max(workers)):
                rows[f"ViT-B/16 detector, {count} workers, images/s"] = images_per_second(
                    vit, subset, args.vit_b16, count, 8, scratch
                )
        if args.ray:
            best_local = max(rate for name, rate in rows.items() if name.endswith("workers, images/s"))
            rows.update(ray_rows(tiny, folder, args.images, args.ray, args.batch, scratch))
            for n in args.ray:
                rows[f"Ray {n} actors / best local scan"] = (
                    rows[f"Ray: tiny detector, {n} actors, images/s"] / best_local
                )
        small, large = args.rss_files
        rss = {files: peak_rss_mib(tiny, files, scratch) for files in (small, large)}
        rows[f"peak RSS, {small} files, MiB"] = rss[small]
        rows[f"peak RSS, {large} files, MiB"] = rss[large]
        rows[f"peak RSS growth from {small} to {large} files, bytes per extra file"] = (
            (rss[large] - rss[small]) * 2**20 / (large - small)
        )
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {cpus} usable CPUs",
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "images": args.images,
        "batch": args.batch,
        "rows": rows,
    }
    width = max(map(len, rows))
    for name, value in rows.items():
        print(f"{name:<{width}}  {value:10.3f}")
    if args.output:
        with atomic_write(args.output) as staging:
            staging.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
