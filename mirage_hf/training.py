"""The training loop behind `train.py`: Accelerate, exact resume, periodic evaluation, calibration, export.

Runs unchanged on one CPU, one GPU or many (`accelerate launch --multi_gpu train.py ...`): data is sharded by
Accelerate, evaluation by `evaluation.predict`, and only rank 0 writes files.
"""

import json
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import IterableDataset
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17

from .calibration import calibrate
from .checkpoints import (
    frozen_base_fingerprint,
    keep_frozen_base_out_of_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from .data import check_binary_labels, load_data
from .evaluation import evaluate, predict, scoring_model
from .export import export_model, mirage_core
from .inference import OnnxModel, compile_image_path
from .lora import add_lora
from .metrics import format_comparison_table, format_table, to_jsonable
from .modeling_mirage import MiraGeForImageClassification
from .onnx_export import EVAL_RESULTS_FILE, ONNX_DIR
from .synthetic import make_synthetic_genimage
from .tiny import save_tiny_clip
from .train_config import TrainConfig
from .transforms import (
    BadImageReport,
    DetectionCollator,
    Preprocessor,
    TrainAugmentation,
)

logger = logging.getLogger("mirage_hf")

MODEL_OPTIONS = (
    "mode", "n_ctx", "prompt_depth", "ctx_init", "ce_weight", "align_weight", "sep_weight", "supcon_weight",
    "sep_margin", "anchor_margin", "supcon_temperature", "memory_bank_size",
)  # fmt: skip


# ------------------------------------------------------------------------------------------- building


class ClipUnavailable(OSError):
    """The configured CLIP is neither a local folder nor reachable on the Hub (or in its cache)."""


def resolve_clip(cfg: TrainConfig) -> str:
    """The CLIP checkpoint to build on; "tiny-random" is written once into the output folder."""
    if cfg.clip_model != "tiny-random":
        try:
            MiraGeForImageClassification.clip_config_dict(cfg.clip_model)  # not CLIP: fail before any data work
        except OSError as error:
            name = Path(cfg.clip_model).name
            raise ClipUnavailable(
                f"clip_model {cfg.clip_model!r} is not a local folder and could not be fetched from the Hub "
                f"(offline or unreachable, and not in the cache). Download it once where the Hub is reachable "
                f"(`hf download {cfg.clip_model}`), or point at a local copy: --clip_model /path/to/{name}"
            ) from error
        return cfg.clip_model
    path = Path(cfg.output_dir) / "tiny-clip"
    if not (path / "config.json").exists():
        save_tiny_clip(path, seed=cfg.seed, **cfg.tiny_clip)
    return str(path)


def build_model(cfg: TrainConfig, clip_path: str):
    options = {k: getattr(cfg, k) for k in MODEL_OPTIONS}
    if cfg.eval_preprocess:  # recorded in the model: it is scored (and calibrated) with it from now on
        options["preprocess"] = cfg.eval_preprocess
    model = MiraGeForImageClassification.from_clip(clip_path, **options)
    if cfg.lora_r:
        model = add_lora(
            model, r=cfg.lora_r, alpha=cfg.lora_alpha, towers=tuple(cfg.lora_towers),
            projections=tuple(cfg.lora_projections),
        )  # fmt: skip
    if cfg.gradient_checkpointing:
        mirage_core(model).activation_checkpointing_enable()
    return model


def resolve_dataset(cfg: TrainConfig, source: str) -> str:
    """ "synthetic" becomes a generated GenImage-layout folder (made once, deterministic for the seed)."""
    if source != "synthetic":
        return source
    root = Path(cfg.output_dir) / "synthetic-data"
    stamp = root / "options.json"
    options = {"seed": cfg.seed, **cfg.synthetic}
    if not stamp.exists() or json.loads(stamp.read_text()) != options:
        make_synthetic_genimage(root, **options)
        stamp.write_text(json.dumps(options))
    return f"genimage:{root}"


def load_split(cfg: TrainConfig, source: str, split: str, subsets, max_samples):
    """One split in the standard image/label/subset schema, filtered and checked before any long work."""
    kwargs = {}
    if not source.startswith(("genimage:", "ufd:")) and not Path(source).is_dir():
        kwargs = dict(image_column=cfg.image_column, label_column=cfg.label_column, subset_column=cfg.subset_column)
        if cfg.streaming and not Path(source).is_file():
            kwargs["streaming"] = True
    ds = load_data(source, split=split, **kwargs)
    if subsets:
        wanted = set(subsets)
        ds = ds.filter(lambda subset: subset in wanted, input_columns="subset")
    if max_samples:
        ds = (
            ds.take(max_samples)
            if isinstance(ds, IterableDataset)
            else ds.shuffle(seed=cfg.seed).select(range(min(max_samples, len(ds))))
        )
    check_binary_labels(ds, f"{source} [{split}{', ' + ', '.join(subsets) if subsets else ''}]")
    return ds


class IndexedRows(torch.utils.data.Dataset):
    """Rows of a map-style data set, tagged with their index (which seeds their augmentation)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "index": index}


class SeededCollator:
    """Reseeds the augmentation from the batch's sample indices before collating.

    The same batch is then augmented identically in any worker and after any resume, which makes an
    interrupted run reach exactly the parameters of an uninterrupted one.
    """

    def __init__(self, augmentation: TrainAugmentation, preprocess, seed: int):
        self.augmentation, self.collate, self.seed = augmentation, DetectionCollator(preprocess), seed

    def __call__(self, rows):
        if rows and "index" in rows[0]:  # streamed rows have no index: their draws simply continue
            self.augmentation.reseed(hash((self.seed, *(row["index"] for row in rows))))
        return self.collate(rows)


def train_loader(dataset, cfg: TrainConfig, collate, epoch: int) -> DataLoader:
    """This epoch's batches in a fixed order derived from (seed, epoch), so a resume sees the same ones."""
    if isinstance(dataset, IterableDataset):
        dataset = dataset.shuffle(seed=cfg.seed, buffer_size=10_000)
        dataset.set_epoch(epoch)
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        dataset = Subset(IndexedRows(dataset), order.tolist())
    return DataLoader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate, drop_last=True
    )


# ------------------------------------------------------------------------------------------- training


class LossWindow:
    """Sums of the loss terms over the optimiser steps since the last log, kept on the device.

    Reading a loss (`.item()`) waits for the GPU to finish; doing it once per log instead of once per step lets
    the next steps be queued while the current one runs.
    """

    def __init__(self):
        self.sums, self.steps = {}, 0

    def add(self, output):
        for name, value in output.items():
            if name.startswith("loss") and value is not None and value.ndim == 0:
                self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.steps += 1

    def pop_means(self) -> dict[str, float]:
        means = (torch.stack(list(self.sums.values())) / self.steps).tolist()  # the one device sync
        terms = dict(zip(self.sums, means, strict=True))
        self.sums, self.steps = {}, 0
        return terms


def configure_logging(is_main_process: bool):
    """Progress messages from rank 0 only; the libraries' INFO chatter (each saved file) stays hidden."""
    logger.setLevel(logging.INFO if is_main_process else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def empty_batch_loss(model):
    """A zero loss touching every trainable parameter, so DDP stays in step when a batch was all bad files."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def train(cfg: TrainConfig) -> dict:
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.log_with or None,
        project_dir=cfg.output_dir,
    )
    configure_logging(accelerator.is_main_process)
    output_dir = Path(cfg.output_dir)
    set_seed(cfg.seed)

    with accelerator.main_process_first():
        clip_path = resolve_clip(cfg)
        train_source = resolve_dataset(cfg, cfg.dataset)
        eval_source = resolve_dataset(cfg, cfg.eval_dataset or cfg.dataset)
        train_set = load_split(cfg, train_source, cfg.train_split, cfg.train_subsets, cfg.max_train_samples)
        eval_set = load_split(cfg, eval_source, cfg.eval_split, cfg.eval_subsets, cfg.max_eval_samples)
    calibration_set = None
    if cfg.calibrate and cfg.calibration_holdout and not isinstance(train_set, IterableDataset):
        split = train_set.train_test_split(test_size=cfg.calibration_holdout, seed=cfg.seed, stratify_by_column="label")
        train_set, calibration_set = split["train"], split["test"]

    model = build_model(cfg, clip_path)
    image_processor = AutoImageProcessor.from_pretrained(clip_path)
    image_size = image_processor.crop_size["height"]
    augmentation = TrainAugmentation(
        image_size, flip_prob=cfg.flip_prob, resize_prob=cfg.resize_prob, blur_prob=cfg.blur_prob,
        jpeg_prob=cfg.jpeg_prob, seed=cfg.seed,
    )  # fmt: skip
    preprocess_mode = mirage_core(model).config.preprocess
    train_collate = SeededCollator(augmentation, Preprocessor(image_processor, preprocess_mode, augmentation), cfg.seed)
    eval_preprocess = Preprocessor(image_processor, preprocess_mode)

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:  # zero_shot: CLIP with hand-written prompts, nothing to fit
        logger.info("mode %s has no trainable parameters: evaluating as is", cfg.mode)
        if accelerator.is_main_process:
            export_model(model, image_processor, output_dir / "model")
        accelerator.wait_for_everyone()
        return finish_evaluation(
            cfg, model.eval().to(accelerator.device), eval_set, eval_preprocess, accelerator, image_processor
        )
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if isinstance(train_set, IterableDataset):
        if not cfg.max_steps:
            raise ValueError("streaming training needs --max_steps (the length of a stream is unknown)")
        steps_per_epoch = cfg.max_steps
    else:
        batches = len(train_set) // (cfg.batch_size * accelerator.num_processes)
        if batches == 0:
            raise ValueError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}")
        steps_per_epoch = math.ceil(batches / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    keep_frozen_base_out_of_checkpoints(accelerator, frozen_base_fingerprint(clip_path))
    accelerator.init_trackers(
        "mirage", config=to_jsonable({k: v for k, v in vars(cfg).items() if not isinstance(v, (dict, list))})
    )

    progress = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "best_score": None}
    resumed = load_checkpoint(accelerator, resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint))
    if resumed:
        progress = resumed
        logger.info(
            "resumed from step %d (epoch %d, batch %d)",
            progress["global_step"],
            progress["epoch"],
            progress["batches_in_epoch"],
        )

    def evaluate_and_export():
        results, _ = evaluate(
            model, eval_set, eval_preprocess, accelerator, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers
        )
        clean = results["clean"]
        accelerator.log(
            {f"eval/{k}": v for k, v in clean["mean"].items() if isinstance(v, float)}, step=progress["global_step"]
        )
        logger.info(
            "step %d: mean accuracy %.4f, mean AP %.4f",
            progress["global_step"],
            clean["mean"]["accuracy"],
            clean["mean"]["average_precision"],
        )
        score = clean["mean"]["accuracy"]
        if progress["best_score"] is None or score > progress["best_score"]:
            progress["best_score"] = score
            if accelerator.is_main_process:
                export_model(
                    model,
                    image_processor,
                    output_dir / "model",
                    eval_results=to_jsonable({"step": progress["global_step"], **results}),
                )
        accelerator.wait_for_everyone()

    bad_images, loss_window = BadImageReport(), LossWindow()
    bar = tqdm(
        total=total_steps, initial=progress["global_step"], desc="train", disable=not accelerator.is_local_main_process
    )
    while progress["global_step"] < total_steps:
        loader = accelerator.prepare(train_loader(train_set, cfg, train_collate, progress["epoch"]))
        skip = progress["batches_in_epoch"]
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            bad_images.add(batch["failed"])
            with accelerator.accumulate(model):
                if batch["labels"].numel():
                    output = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                    loss = output.loss
                else:
                    output, loss = None, empty_batch_loss(model)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress["batches_in_epoch"] += 1
            if not accelerator.sync_gradients:
                continue
            progress["global_step"] += 1
            bar.update(1)
            if output is not None:
                loss_window.add(output)
            epoch_done = progress["batches_in_epoch"] >= len(loader)
            finished = progress["global_step"] >= total_steps
            if loss_window.steps and (finished or progress["global_step"] % cfg.log_every == 0):
                terms = loss_window.pop_means()
                accelerator.log(
                    {f"train/{k}": v for k, v in terms.items()} | {"train/lr": scheduler.get_last_lr()[0]},
                    step=progress["global_step"],
                )
                bar.set_postfix({k.removeprefix("loss_") or "loss": f"{v:.3f}" for k, v in terms.items()})
            if epoch_done:
                progress["epoch"], progress["batches_in_epoch"] = progress["epoch"] + 1, 0
            step = progress["global_step"]
            if finished or (step % cfg.eval_every == 0 if cfg.eval_every else epoch_done):
                evaluate_and_export()
            if finished or (step % cfg.save_every == 0 if cfg.save_every else epoch_done):
                save_checkpoint(accelerator, cfg.output_dir, dict(progress), cfg.checkpoints_total_limit)
            if finished or epoch_done:
                break
    bar.close()
    if bad_images.count:
        logger.warning("training: %s", bad_images.summary())
    if progress["best_score"] is None:  # resumed from a checkpoint taken after the last step
        evaluate_and_export()

    # The exported best model gets calibrated on held-out data, then evaluated once more as it will be used.
    best = MiraGeForImageClassification.from_pretrained(output_dir / "model")
    best.to(accelerator.device)
    if calibration_set is not None:
        labels, diffs, _, report = predict(
            best, calibration_set, eval_preprocess, accelerator, cfg.eval_batch_size, desc="calibrate"
        )
        if report.count:
            logger.warning("calibration data: %s", report.summary())
        fitted = calibrate(diffs, labels, method=cfg.calibrate, target_fpr=cfg.target_fpr)
        best.config.calibration_temperature = fitted["temperature"]
        best.config.decision_threshold = min(max(fitted["threshold"], 1e-6), 1 - 1e-6)
        logger.info(
            "calibration (%s on %d held-out images): temperature %.3f, threshold %.3f",
            cfg.calibrate,
            len(labels),
            best.config.calibration_temperature,
            best.config.decision_threshold,
        )
    results = finish_evaluation(cfg, best, eval_set, eval_preprocess, accelerator, image_processor)
    accelerator.end_training()
    return results


def finish_evaluation(cfg, model, eval_set, preprocess, accelerator, image_processor) -> dict:
    """Evaluates (optionally under the robustness sweep), prints the tables, writes eval_results.json."""
    results, report = evaluate(
        model,
        eval_set,
        preprocess,
        accelerator,
        robustness=cfg.robustness,
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers,
    )
    config = scoring_model(model).config
    summary = to_jsonable(
        {
            "model": cfg.model or str(Path(cfg.output_dir) / "model"),
            "backend": cfg.backend,
            "eval_dataset": cfg.eval_dataset or cfg.dataset,
            "eval_split": cfg.eval_split,
            "preprocess": preprocess.mode,
            "threshold": config.decision_threshold,
            "temperature": config.calibration_temperature,
            "bad_images": report.count,
            **results,
        }
    )
    if accelerator.is_main_process:
        title = (
            f"threshold {config.decision_threshold:.3f}, temperature {config.calibration_temperature:.3f}, "
            f"preprocessing: {preprocess.mode}, backend: {cfg.backend}"
        )
        print(format_table(results["clean"], title=title))
        if cfg.robustness:
            print(format_comparison_table(results, metric="accuracy", title="robustness: accuracy per condition"))
            print(format_comparison_table(results, metric="average_precision", title="robustness: AP per condition"))
        if report.count:
            print(report.summary())
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_results.json").write_text(json.dumps(summary, indent=2) + "\n")
        onnx_dir = Path(cfg.model or "", ONNX_DIR)
        if cfg.backend != "torch" and onnx_dir.is_dir():  # next to the graph it measures, for the model card
            (onnx_dir / EVAL_RESULTS_FILE.format(backend=cfg.backend)).write_text(json.dumps(summary, indent=2) + "\n")
        if not cfg.eval_only:
            export_model(model, image_processor, out / "model", eval_results=summary)
    accelerator.wait_for_everyone()
    return summary


def evaluate_only(cfg: TrainConfig) -> dict:
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    configure_logging(accelerator.is_main_process)
    if cfg.backend == "torch":
        model = MiraGeForImageClassification.from_pretrained(cfg.model)
        model.to(accelerator.device)
        if cfg.compile:
            compile_image_path(model)
    else:  # the exported graph, on the same data and preprocessing
        model = OnnxModel.from_pretrained(cfg.model, cfg.backend)
    image_processor = AutoImageProcessor.from_pretrained(cfg.model)
    eval_set = load_split(
        cfg,
        resolve_dataset(cfg, cfg.eval_dataset or cfg.dataset),
        cfg.eval_split,
        cfg.eval_subsets,
        cfg.max_eval_samples,
    )
    preprocess = Preprocessor(image_processor, cfg.eval_preprocess or model.config.preprocess)
    return finish_evaluation(cfg, model, eval_set, preprocess, accelerator, image_processor)


def main(argv=None) -> dict:
    from .train_config import parse_args

    cfg = parse_args(argv)
    try:
        return evaluate_only(cfg) if cfg.eval_only else train(cfg)
    except ClipUnavailable as error:  # a set-up problem, not a bug: one line instead of a chained traceback
        raise SystemExit(f"train.py: {error}") from None


def script() -> None:
    """`mirage-train` and `train.py`: `main` on the command line (a console script would exit with its results)."""
    main()
