"""The training loop behind `train.py`: Accelerate, exact resume, periodic evaluation, calibration, export.

Runs unchanged on one CPU, one GPU or many (`accelerate launch --multi_gpu train.py ...`): data is sharded by
Accelerate, evaluation by `evaluation.predict`, and only rank 0 writes files.
"""

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import IterableDataset
from torch.utils.data import DataLoader, Subset
from transformers import get_cosine_schedule_with_warmup
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17

from .building import clip_config_dict, from_clip, offline_if_hub_unreachable
from .calibration import calibrate
from .checkpoints import (
    frozen_base_fingerprint,
    keep_frozen_base_out_of_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from .commands import one_line_errors
from .data_sources import load_split, resolve_dataset
from .demo.tiny import PRETRAINED_TINY_CLIP, save_tiny_clip
from .evaluation import Evaluation, predict
from .lora import add_lora
from .metrics import to_jsonable
from .model_folder import mirage_core
from .modeling_mirage import MiraGeForImageClassification
from .progress import configure_logging, logger, progress_bar
from .scoring import ModelNotFound
from .train_config import TrainConfig
from .transforms import (
    BadImageReport,
    DetectionCollator,
    Preprocessor,
    TrainAugmentation,
)

# ------------------------------------------------------------------------------------------- building


class ClipUnavailable(OSError):
    """The configured CLIP is neither a local folder nor reachable on the Hub (or in its cache)."""


def resolve_clip(cfg: TrainConfig) -> str:
    """The CLIP checkpoint to build on; "tiny-pretrained" is the folder shipped in the package, "tiny-random" is
    written once into the output folder."""
    if cfg.clip_model == "tiny-pretrained":
        return str(PRETRAINED_TINY_CLIP)
    if cfg.clip_model != "tiny-random":
        if not Path(cfg.clip_model).is_dir():
            offline_if_hub_unreachable()
        try:
            clip_config_dict(cfg.clip_model)  # not CLIP: fail before any data work
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
    options = cfg.model_options()
    if cfg.eval_preprocess:  # recorded in the model: it is scored (and calibrated) with it from now on
        options["preprocess"] = cfg.eval_preprocess
    model = from_clip(MiraGeForImageClassification, clip_path, **options)
    if cfg.lora_r:
        model = add_lora(
            model, r=cfg.lora_r, alpha=cfg.lora_alpha, towers=tuple(cfg.lora_towers),
            projections=tuple(cfg.lora_projections),
        )  # fmt: skip
    if cfg.gradient_checkpointing:
        mirage_core(model).activation_checkpointing_enable()
    return model


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
    """This epoch's batches in a fixed order derived from (seed, epoch), so a resume sees the same ones.

    Not accelerate's seedable sampler: an order that is a pure function of (seed, epoch), rebuilt per epoch, needs no
    sampler state carried into the skipped loader of a resumed epoch.
    """
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


@dataclass
class TrainState:
    """Where a run stands: saved as each checkpoint's progress.json, so a resumed run continues mid-epoch."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained on
    best_score: float | None = None  # mean accuracy of the exported model


def due(step: int, every: int, epoch_done: bool) -> bool:
    """Whether a periodic action (evaluation, checkpoint) runs now: every N steps, or at epoch ends for N = 0."""
    return step % every == 0 if every else epoch_done


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


class TrainingLog:
    """What training reports as it runs: the progress bar, loss means every `log_every` steps, unreadable images."""

    def __init__(self, accelerator, cfg: TrainConfig, total_steps: int, state: TrainState):
        self.accelerator, self.log_every = accelerator, cfg.log_every
        self.losses, self.bad_images = LossWindow(), BadImageReport()
        self.bar = progress_bar(
            total=total_steps, initial=state.global_step, desc="train", disable=not accelerator.is_local_main_process
        )

    def step(self, output, step: int, lr: float, last: bool):
        """After an optimiser step: `output` is None for a batch of unreadable files only."""
        self.bar.update(1)
        if output is not None:
            self.losses.add(output)
        if self.losses.steps and (last or step % self.log_every == 0):
            terms = self.losses.pop_means()
            self.accelerator.log({f"train/{k}": v for k, v in terms.items()} | {"train/lr": lr}, step=step)
            postfix = {k.removeprefix("loss_") or "loss": f"{v:.3f}" for k, v in terms.items()}
            self.bar.set_postfix(postfix, refresh=False)  # shown at the bar's next redraw, not as a line of its own

    def close(self):
        self.bar.close()
        if self.bad_images.count:
            logger.warning("training: %s", self.bad_images.summary(), main_process_only=False)  # per process


def empty_batch_loss(model):
    """A zero loss touching every trainable parameter, so DDP stays in step when a batch was all bad files."""
    return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0


def steps_per_epoch(cfg: TrainConfig, train_set, accelerator) -> int:
    if isinstance(train_set, IterableDataset):
        if not cfg.max_steps:
            raise ValueError("streaming training needs --max_steps (the length of a stream is unknown)")
        return cfg.max_steps
    batches = len(train_set) // (cfg.batch_size * accelerator.num_processes)
    if batches == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {cfg.batch_size}")
    return math.ceil(batches / cfg.gradient_accumulation_steps)


def prepare_data(cfg: TrainConfig, accelerator):
    """The CLIP to build on and the train, calibration (None without --calibrate) and test splits."""
    with accelerator.main_process_first():  # downloads and generated files are made once
        clip_path = resolve_clip(cfg)
        train_source = resolve_dataset(cfg, cfg.dataset)
        eval_source = resolve_dataset(cfg, cfg.eval_dataset or cfg.dataset)
        train_set = load_split(cfg, train_source, cfg.train_split, cfg.train_subsets, cfg.max_train_samples)
        eval_set = load_split(cfg, eval_source, cfg.eval_split, cfg.eval_subsets, cfg.max_eval_samples)
    calibration_set = None
    if cfg.calibrate and cfg.calibration_holdout and not isinstance(train_set, IterableDataset):
        split = train_set.train_test_split(test_size=cfg.calibration_holdout, seed=cfg.seed, stratify_by_column="label")
        train_set, calibration_set = split["train"], split["test"]
    return clip_path, train_set, calibration_set, eval_set


def make_accelerator(**options) -> Accelerator:
    """An Accelerator that joins the processes of `accelerate launch --multi_gpu` (torchrun) on a machine without
    GPUs too, through gloo: accelerate would otherwise run each of them alone, on all the data."""
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=several_processes and not torch.cuda.is_available(), **options)


def train(cfg: TrainConfig) -> dict:
    """Builds data and model, trains for `max_steps` or `num_epochs`, then calibrates, evaluates and exports."""
    cfg.use_threads()
    accelerator = make_accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.log_with or None,
        project_dir=cfg.output_dir,
    )
    configure_logging()
    set_seed(cfg.seed)  # once, first: what follows draws the same numbers whether or not it builds files
    clip_path, train_set, calibration_set, eval_set = prepare_data(cfg, accelerator)
    model = build_model(cfg, clip_path)
    image_processor = AutoImageProcessor.from_pretrained(clip_path)
    augmentation = TrainAugmentation(
        image_processor.crop_size["height"], flip_prob=cfg.flip_prob, resize_prob=cfg.resize_prob,
        blur_prob=cfg.blur_prob, jpeg_prob=cfg.jpeg_prob, seed=cfg.seed,
    )  # fmt: skip
    preprocess_mode = mirage_core(model).config.preprocess
    train_collate = SeededCollator(augmentation, Preprocessor(image_processor, preprocess_mode, augmentation), cfg.seed)
    evaluation = Evaluation(
        cfg, accelerator, eval_set, Preprocessor(image_processor, preprocess_mode), image_processor, calibration_set
    )

    if not any(p.requires_grad for p in model.parameters()):  # zero_shot: CLIP with hand-written prompts
        logger.info("mode %s has no trainable parameters: evaluating as is", cfg.mode)
        return evaluation.final(model.eval().to(accelerator.device), export=True)

    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    total_steps = cfg.max_steps or steps_per_epoch(cfg, train_set, accelerator) * cfg.num_epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    keep_frozen_base_out_of_checkpoints(accelerator, frozen_base_fingerprint(clip_path))
    accelerator.init_trackers(
        "mirage", config=to_jsonable({k: v for k, v in vars(cfg).items() if not isinstance(v, (dict, list))})
    )

    state = TrainState()
    resumed = load_checkpoint(accelerator, resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint))
    if resumed:
        state = TrainState(**resumed)
        logger.info("resumed from step %d (epoch %d, batch %d)", state.global_step, state.epoch, state.batches_in_epoch)

    log = TrainingLog(accelerator, cfg, total_steps, state)
    while state.global_step < total_steps:
        loader = accelerator.prepare(train_loader(train_set, cfg, train_collate, state.epoch))
        train_one_epoch(cfg, accelerator, model, optimizer, scheduler, loader, state, total_steps, evaluation, log)
    log.close()
    if state.best_score is None:  # resumed from a checkpoint taken after the last step
        evaluation.evaluate_and_export(model, state)

    results = calibrate_and_export(cfg, accelerator, evaluation)
    accelerator.end_training()
    return results


def train_one_epoch(cfg, accelerator, model, optimizer, scheduler, loader, state, total_steps, evaluation, log):
    """One pass over `loader` (from `state.batches_in_epoch` on after a resume), stopping early at `total_steps`.

    Each optimiser step advances `state`; the model is evaluated (and exported when best) and a checkpoint saved
    on their schedules, and always at the last step.
    """
    try:
        epoch_length = len(loader)
    except TypeError:  # a stream: its epoch ends when it runs out
        epoch_length = None
    if state.batches_in_epoch:
        loader = accelerator.skip_first_batches(loader, state.batches_in_epoch)
    for batch in loader:
        log.bad_images.add(batch["failed"])
        with accelerator.accumulate(model):
            if batch["labels"].numel():
                output = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                loss = output.loss
            else:
                output, loss = None, empty_batch_loss(model)
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        state.batches_in_epoch += 1
        if not accelerator.sync_gradients:
            continue
        state.global_step += 1
        finished, epoch_done = state.global_step >= total_steps, state.batches_in_epoch == epoch_length
        log.step(output, state.global_step, scheduler.get_last_lr()[0], last=finished)
        if epoch_done:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        if finished or due(state.global_step, cfg.eval_every, epoch_done):
            evaluation.evaluate_and_export(model, state)
        if finished or due(state.global_step, cfg.save_every, epoch_done):
            save_checkpoint(accelerator, cfg.output_dir, dataclasses.asdict(state), cfg.checkpoints_total_limit)
        if finished or epoch_done:
            return
    state.epoch, state.batches_in_epoch = state.epoch + 1, 0


def calibrate_and_export(cfg, accelerator, evaluation: "Evaluation") -> dict:
    """Reloads the best exported model, fits its temperature and threshold on held-out data, evaluates it as it
    will be used and exports it once more, calibrated, with those results."""
    best = MiraGeForImageClassification.from_pretrained(evaluation.model_dir).to(accelerator.device)
    calibration = None
    if evaluation.calibration_set is not None:
        calibration = calibrate_model(cfg, accelerator, best, evaluation.calibration_set, evaluation.preprocess)
    return evaluation.final(best, export=True, calibration=calibration)


def calibrate_model(cfg, accelerator, model, calibration_set, preprocess) -> dict:
    """Fits the temperature and threshold of `model` on held-out training data (never the test set).

    Returns the record of how they were chosen (`calibration.calibrate`), for eval_results.json and the card.
    """
    scored = predict(model, calibration_set, preprocess, accelerator, cfg.eval_batch_size, desc="calibrate")
    if scored.bad_images.count:
        logger.warning("calibration data: %s", scored.bad_images.summary())
    calibration = calibrate(scored.logit_diff, scored.labels, method=cfg.calibrate, target_fpr=cfg.target_fpr)
    model.config.calibration_temperature = calibration["temperature"]
    model.config.decision_threshold = calibration["threshold"]
    logger.info(
        "calibration on %d real + %d fake held-out images: temperature %.3f, threshold %.3f (%s)",
        calibration["n_real"],
        calibration["n_fake"],
        calibration["temperature"],
        calibration["threshold"],
        calibration["rule"],
    )
    return calibration


def main(argv=None) -> dict:
    from .train_config import parse_args

    prog = Path(sys.argv[0]).name or "train.py"
    with one_line_errors(prog, FileNotFoundError, ValueError):  # no such preset, options that do not fit
        cfg = parse_args(argv)
    with one_line_errors(prog, ClipUnavailable, ModelNotFound):  # a set-up problem, not a bug
        return train(cfg)


def script() -> None:
    """`mirage-train` and `train.py`: `main` on the command line (a console script would exit with its results)."""
    main()
