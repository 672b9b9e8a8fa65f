"""The training loop behind `train.py`: Accelerate, exact resume, periodic evaluation, calibration, export.

Runs unchanged on one CPU, one GPU or many (`accelerate launch --multi_gpu train.py ...`): data is sharded by
Accelerate, evaluation by `evaluation.predict`, and only rank 0 writes files.
"""

import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import MultiProcessAdapter
from accelerate.state import PartialState
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
from .data import check_binary_labels, load_data
from .demo.synthetic import make_synthetic_genimage
from .demo.tiny import PRETRAINED_TINY_CLIP, save_tiny_clip
from .evaluation import evaluate, predict
from .lora import add_lora
from .metrics import format_comparison_table, format_table, to_jsonable
from .model_folder import BACKEND_EVAL_RESULTS_FILE, EVAL_RESULTS_FILE, export_model, mirage_core
from .modeling_mirage import MiraGeForImageClassification
from .onnx_runtime import ONNX_DIR
from .progress import hide_library_bars, progress_bar
from .scoring import ModelNotFound, as_scorer, load_scorer
from .train_config import TrainConfig
from .transforms import (
    BadImageReport,
    DetectionCollator,
    Preprocessor,
    TrainAugmentation,
    scoring_preprocessor,
)


class RunLogger(MultiProcessAdapter):
    """accelerate's logger (the main process only, unless told otherwise) that names the rank only where there are
    several: "[RANK 0]" in front of every line of a one-process run tells a user nothing."""

    def process(self, msg, kwargs):
        kwargs.setdefault("stacklevel", 2)
        state = PartialState()
        return (f"[RANK {state.process_index}] {msg}" if state.num_processes > 1 else msg), kwargs


logger = RunLogger(logging.getLogger("mirage_hf"), {})

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


SYNTHETIC_DIR = "synthetic-data"  # in a run's output folder
SYNTHETIC_STAMP = "options.json"  # the generator options a synthetic-data folder was made with


def made_with(root: Path, options: dict) -> bool:
    """Whether `root` holds a generated data set made with `options`."""
    stamp = root / SYNTHETIC_STAMP
    return stamp.is_file() and json.loads(stamp.read_text()) == options


def synthetic_options(cfg: TrainConfig) -> dict:
    """What the "synthetic" data is generated with (`make_synthetic_genimage`); eval_results.json records it, so
    that `mirage-adapt` can regenerate the evaluation data."""
    return {"seed": cfg.seed, **cfg.synthetic}


def resolve_dataset(cfg: TrainConfig, source: str) -> str:
    """ "synthetic" becomes a generated GenImage-layout folder (made once, deterministic for the options). With
    --eval_only, the folder of the run that trained the model is used when it was made with the same options."""
    if source != "synthetic":
        return source
    options = synthetic_options(cfg)
    trained_with = Path(cfg.model or "").parent / SYNTHETIC_DIR
    if cfg.eval_only and made_with(trained_with, options):
        return f"genimage:{trained_with}"
    root = Path(cfg.output_dir) / SYNTHETIC_DIR
    if not made_with(root, options):
        make_synthetic_genimage(root, **options)
        (root / SYNTHETIC_STAMP).write_text(json.dumps(options))
    return f"genimage:{root}"


def load_split(cfg: TrainConfig, source: str, split: str, subsets, max_samples):
    """One split in the standard image/label/subset schema, filtered and checked before any long work."""
    ds = load_data(
        source, split=split, image_column=cfg.image_column, label_column=cfg.label_column,
        subset_column=cfg.subset_column, streaming=cfg.streaming,
    )  # fmt: skip
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


def configure_logging():
    """Progress messages (rank 0 only, through accelerate's logger); the libraries' INFO chatter and their loading
    and saving bars (transformers' "Loading weights", "Writing model shards") stay hidden."""
    hide_library_bars()
    base = logging.getLogger("mirage_hf")
    base.setLevel(logging.INFO)
    if not base.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        base.addHandler(handler)


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


def use_threads(cfg: TrainConfig) -> None:
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)


def train(cfg: TrainConfig) -> dict:
    """Builds data and model, trains for `max_steps` or `num_epochs`, then calibrates, evaluates and exports."""
    use_threads(cfg)
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


class Evaluation:
    """The test set and where results go: periodic evaluation during training, and the final report."""

    def __init__(self, cfg, accelerator, eval_set, preprocess, image_processor, calibration_set=None):
        self.cfg, self.accelerator, self.eval_set = cfg, accelerator, eval_set
        self.preprocess, self.image_processor = preprocess, image_processor
        self.calibration_set = calibration_set  # held-out training images: they choose the checkpoint and T, t
        self.model_dir = Path(cfg.output_dir) / "model"

    def evaluate_and_export(self, model, state: TrainState):
        """Evaluates the model in training; exports it to `model_dir` when it is the best yet.

        "Best" is the lowest cross-entropy on the held-out training images when there are some (the test split is
        only reported, never used to choose), else the mean test accuracy.
        """
        results, _ = evaluate(
            model, self.eval_set, self.preprocess, self.accelerator, batch_size=self.cfg.eval_batch_size,
            num_workers=self.cfg.num_workers,
        )  # fmt: skip
        mean = results["clean"]["mean"]
        self.accelerator.log({f"eval/{k}": v for k, v in mean.items() if isinstance(v, float)}, step=state.global_step)
        logger.info(
            "step %d: mean accuracy %.4f, mean AP %.4f", state.global_step, mean["accuracy"], mean["average_precision"]
        )
        score = mean["accuracy"]
        if self.calibration_set is not None:
            scored = predict(
                model, self.calibration_set, self.preprocess, self.accelerator, self.cfg.eval_batch_size,
                desc="validate",
            )  # fmt: skip
            margins = (2.0 * scored.labels - 1.0) * scored.logit_diff
            score = -float(np.logaddexp(0.0, -margins).mean())  # held-out cross-entropy
            logger.info("step %d: held-out cross-entropy %.3g", state.global_step, -score)
        if state.best_score is None or score > state.best_score:
            state.best_score = score
            if self.accelerator.is_main_process:
                eval_results = to_jsonable({"step": state.global_step, **results})
                export_model(model, self.image_processor, self.model_dir, eval_results=eval_results)
        self.accelerator.wait_for_everyone()

    def final(self, model, export: bool = False, calibration: dict | None = None) -> dict:
        """Evaluates (with the robustness sweep if asked), prints the tables and writes eval_results.json.

        With `export`, the model is exported once, with these results, as `model_dir`. `calibration` is the record
        of how this run chose T and t; None when it fitted none.
        """
        cfg, accelerator = self.cfg, self.accelerator
        results, report = evaluate(
            model, self.eval_set, self.preprocess, accelerator, robustness=cfg.robustness,
            batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
        )  # fmt: skip
        config = as_scorer(model).config
        summary = to_jsonable(
            {
                "model": cfg.model or str(self.model_dir),
                "backend": cfg.backend,
                "eval_dataset": cfg.eval_dataset or cfg.dataset,
                "eval_split": cfg.eval_split,
                "synthetic": synthetic_options(cfg) if (cfg.eval_dataset or cfg.dataset) == "synthetic" else None,
                "preprocess": self.preprocess.mode,
                "threshold": config.decision_threshold,
                "temperature": config.calibration_temperature,
                "calibration": calibration,
                "bad_images": report.count,
                **results,
            }
        )
        if accelerator.is_main_process:
            print(results_table(summary))
            if cfg.robustness:
                print(format_comparison_table(results, metric="accuracy", title="robustness: accuracy per condition"))
                print(
                    format_comparison_table(results, metric="average_precision", title="robustness: AP per condition")
                )
            if report.count:
                print(report.summary())
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / EVAL_RESULTS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            onnx_dir = Path(cfg.model or "", ONNX_DIR)
            if cfg.backend != "torch" and onnx_dir.is_dir():  # next to the graph it measures, for the model card
                (onnx_dir / BACKEND_EVAL_RESULTS_FILE.format(backend=cfg.backend)).write_text(
                    json.dumps(summary, indent=2) + "\n"
                )
            if export:
                export_model(model, self.image_processor, self.model_dir, eval_results=summary)
                print(f"model written to {self.model_dir}")
            print(f"results written to {out / EVAL_RESULTS_FILE}")
        accelerator.wait_for_everyone()
        return summary


def results_table(summary: dict) -> str:
    """The clean table an evaluation prints, from its eval_results.json summary (docs quote it through this too)."""
    title = (
        f"threshold {summary['threshold']:.3f}, temperature {summary['temperature']:.3f}, "
        f"preprocessing: {summary['preprocess']}, backend: {summary['backend']}"
    )
    return format_table(summary["clean"], title=title)


def evaluate_only(cfg: TrainConfig) -> dict:
    """Evaluates a trained model folder or Hub id (`--eval_only --model ...`); exports nothing."""
    use_threads(cfg)
    accelerator = make_accelerator(mixed_precision=cfg.mixed_precision)
    configure_logging()
    scorer = load_scorer(cfg.model, cfg.backend, device=accelerator.device, compile=cfg.compile)
    image_processor = AutoImageProcessor.from_pretrained(cfg.model)
    source = resolve_dataset(cfg, cfg.eval_dataset or cfg.dataset)
    eval_set = load_split(cfg, source, cfg.eval_split, cfg.eval_subsets, cfg.max_eval_samples)
    preprocess = scoring_preprocessor(image_processor, scorer.config, cfg.eval_preprocess)
    return Evaluation(cfg, accelerator, eval_set, preprocess, image_processor).final(scorer)


def main(argv=None) -> dict:
    from .train_config import parse_args

    prog = Path(sys.argv[0]).name or "train.py"
    try:
        cfg = parse_args(argv)
    except (FileNotFoundError, ValueError) as error:  # no such preset, options that do not fit: a usage error
        raise SystemExit(f"{prog}: {error}") from None
    try:
        return evaluate_only(cfg) if cfg.eval_only else train(cfg)
    except (ClipUnavailable, ModelNotFound) as error:  # a set-up problem, not a bug: one line, not a traceback
        raise SystemExit(f"{prog}: {error}") from None


def script() -> None:
    """`mirage-train` and `train.py`: `main` on the command line (a console script would exit with its results)."""
    main()
