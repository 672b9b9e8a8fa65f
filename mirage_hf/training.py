"""The training loop behind `train.py`: Accelerate, exact resume, periodic evaluation, calibration, export.

Runs unchanged on one CPU, one GPU or many (`accelerate launch --multi_gpu train.py ...`): data is sharded by
Accelerate, evaluation by `evaluation.predict`, and only rank 0 writes files.
"""

import math
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed
from datasets import IterableDataset
from torch.utils.data import DataLoader, Subset
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17

from .building import clip_config_dict, from_clip, offline_if_hub_unreachable
from .calibration import calibrate
from .checkpoints import frozen_base_fingerprint
from .commands import one_line_errors
from .data_sources import load_split, resolve_dataset
from .demo.tiny import PRETRAINED_TINY_CLIP, save_tiny_clip
from .engine import Checkpointing, Engine, Optimisation, Task, TrainingLog, TrainState, due, make_accelerator
from .evaluation import Evaluation, predict
from .lora import add_lora
from .metrics import to_jsonable
from .modeling_mirage import MiraGeForImageClassification
from .parameters import mirage_core, trainable_parameters
from .progress import configure_logging, logger
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
    total_steps = cfg.max_steps or steps_per_epoch(cfg, train_set, accelerator) * cfg.num_epochs
    bad_images = BadImageReport()
    optimisation = Optimisation(
        cfg.learning_rate, total_steps, int(cfg.warmup_ratio * total_steps), weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
    )  # fmt: skip
    checkpointing = Checkpointing(
        cfg.output_dir, cfg.save_every, cfg.checkpoints_total_limit, cfg.resume_from_checkpoint,
        frozen_base=frozen_base_fingerprint(clip_path),
    )  # fmt: skip
    engine = Engine(accelerator, detection_task(model, bad_images), optimisation, checkpointing)
    accelerator.init_trackers(
        "mirage", config=to_jsonable({k: v for k, v in vars(cfg).items() if not isinstance(v, (dict, list))})
    )
    state = engine.resume()

    def evaluate_when_due(output, state, last, epoch_done):
        if last or due(state.global_step, cfg.eval_every, epoch_done):
            evaluation.evaluate_and_export(engine.model, state)

    log = TrainingLog(accelerator, cfg.log_every, total_steps, state, desc="train")
    engine.train(
        lambda state: epoch_batches(cfg, accelerator, train_set, train_collate, state), state, log,
        after_step=evaluate_when_due,
    )  # fmt: skip
    if bad_images.count:
        logger.warning("training: %s", bad_images.summary(), main_process_only=False)  # per process
    if state.best_score is None:  # resumed from a checkpoint taken after the last step
        evaluation.evaluate_and_export(engine.model, state)

    results = calibrate_and_export(cfg, accelerator, evaluation)
    accelerator.end_training()
    return results


def detection_task(model, bad_images: BadImageReport) -> Task:
    """Detection as a task of the engine: the model's own loss (MiraGe's terms) on each batch of readable images;
    the unreadable ones go into `bad_images`."""

    def loss(model, batch):
        bad_images.add(batch["failed"])
        if not batch["labels"].numel():
            return None
        return model(pixel_values=batch["pixel_values"], labels=batch["labels"])

    return Task(model, list(trainable_parameters(model).values()), loss)


def epoch_batches(cfg, accelerator, train_set, collate, state: TrainState):
    """The batches of `state.epoch` from where `state` stands: a resumed run skips those it trained on."""
    loader = accelerator.prepare(train_loader(train_set, cfg, collate, state.epoch))
    if state.batches_in_epoch:
        loader = accelerator.skip_first_batches(loader, state.batches_in_epoch)
    return loader


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
