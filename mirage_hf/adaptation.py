"""`mirage-adapt`: teach a trained detector a new generator from a few dozen of its images, and measure what the
detector forgets on the generators it knew.

    mirage-adapt outputs/demo/model --fakes new-generator/ --reals photos/ --generator flux --output flux-adapter

By default (`--method anchor`) adaptation adds one fake anchor for the new generator beside the detector's class
anchors and trains only it, so the old decisions move only where it wins; `--method prompts` retrains the
detector's prompts and couplings (a fresh LoRA with `--lora_r`) with an L2 penalty toward its weights. Both
distil the detector's own scores on the real images and train for a bounded number of steps (docs/adaptation.md
says why and what each changes). Before and after, it scores the detector's earlier evaluation data (the subsets
of its `eval_results.json`, or `--reference`) and the held-out part of the new images; it refuses to write the
adapter when an old generator loses more than `--max_forgetting` points of real or of fake accuracy (`--force`
writes it anyway, and the card says so). The output is a PEFT-style adapter folder
(`mirage_hf.adapter_files`) that `AutoModelForImageClassification`, `pipeline()`, `mirage-detect --model` and the
Space load on top of the base detector.

Exit codes: 0 the adapter was written; 1 usage error or unusable input (no images, no model, no reference data);
3 the forgetting guard refused to write it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from transformers.models.auto.image_processing_auto import AutoImageProcessor  # top-level: torchvision-only in 5.17
from transformers.utils import cached_file

from .adapter_files import (
    ADAPT_RESULTS_NAME,
    detector_fingerprint,
    is_detector_adapter,
    save_detector_adapter,
)
from .building import offline_if_hub_unreachable
from .calibration import MIN_PER_CLASS, calibrate
from .cards import adapter_card
from .commands import UsageParser, add_quiet
from .data import FAKE, REAL, load_data
from .data_sources import SYNTHETIC_DIR, stamped_options
from .demo.synthetic import make_synthetic_genimage
from .engine import Checkpointing, Engine, Optimisation, Task, TrainingLog, make_accelerator
from .evaluation import evaluate, predict
from .lora import mirage_lora_config
from .metrics import RESERVED_SUBSETS, format_before_after, to_jsonable
from .model_folder import EVAL_RESULTS_FILE
from .modeling_mirage import MiraGeAddedAnchors, MiraGeForImageClassification
from .parameters import mirage_core, trainable_parameters
from .progress import configure_logging, hide_library_bars
from .scan import find_images
from .scoring import check_model_name
from .transforms import (
    BadImageReport,
    DetectionCollator,
    ImageLoadError,
    Preprocessor,
    TrainAugmentation,
    open_image,
    random_state,
)

PROG = "mirage-adapt"
REFUSED = 3  # exit code: the forgetting guard kept the adapter from being written
NEW_GENERATOR = "new generator"  # the held-out images' subset when --generator is not given


@dataclass
class AdaptOptions:
    """How adaptation trains and what it accepts; the defaults suit 8 to 1,000 new images (docs/adaptation.md)."""

    steps: int | None = None
    """Optimiser steps; None = 10 passes over the training fakes, within [STEPS_MIN, STEPS_MAX]."""
    batch_size: int = 32
    """Images per step, half new fakes and half reals when reals are given."""
    learning_rate: float = 2e-3
    anchor_weight: float = 10.0
    """Weight of the L2 penalty ||theta - theta_base||^2 / ||theta_base||^2 on the trained weights (0: off)."""
    distill_weight: float = 1.0
    """Weight of the distillation of the base detector's p(fake) on the real images (0: off)."""
    holdout: float = 0.2
    """Fraction of the new images (each class) held out to measure the new generator and refit the calibration."""
    lora_r: int = 0
    """Rank of a fresh LoRA on the vision tower's attention, trained with the prompts (0: prompts and couplings only)."""
    max_forgetting: float = 2.0
    """Largest loss, in points, of real accuracy and of fake accuracy allowed on any old generator of the reference
    data."""
    generator: str | None = None
    """Name of the new generator; a reference subset of that name measures it (and is not an old generator)."""
    seed: int = 0
    eval_batch_size: int = 64
    method: str = "anchor"
    """What adapts: "prompts" retrains the detector's prompts and couplings (with the L2 penalty and distillation);
    "anchor" adds a fake anchor for the new generator and trains only it, the prompts, class anchors and
    calibration staying the base's (docs/adaptation.md)."""

    mixed_precision: str = "no"
    """Autocast of the training and scoring forwards: "no", "fp16" or "bf16" (accelerate's settings)."""

    STEPS_MIN, STEPS_MAX = 100, 400
    METHODS = ("prompts", "anchor")
    MIXED_PRECISION = ("no", "fp16", "bf16")

    def resolved_steps(self, n_train_fakes: int) -> int:
        if self.steps is not None:
            return self.steps
        passes = math.ceil(10 * n_train_fakes / self.fakes_per_batch())
        return min(self.STEPS_MAX, max(self.STEPS_MIN, passes))

    def fakes_per_batch(self) -> int:
        return max(1, self.batch_size // 2)

    def __post_init__(self):
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must lie in [0, 1), got {self.holdout}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (half fakes, half reals), got {self.batch_size}")
        if min(self.anchor_weight, self.distill_weight, self.max_forgetting, self.lora_r) < 0:
            raise ValueError("anchor_weight, distill_weight, max_forgetting and lora_r must be >= 0")
        if self.method not in self.METHODS:
            raise ValueError(f"method must be one of {', '.join(self.METHODS)}, got {self.method!r}")
        if self.mixed_precision not in self.MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {', '.join(self.MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.method == "anchor" and self.lora_r:
            raise ValueError("method 'anchor' trains one anchor and nothing else: it takes no lora_r")


class AdaptError(ValueError):
    """Input that adaptation cannot use (no images, no reference data, reals passed as fakes, ...)."""


# ----------------------------------------------------------------------------------------------- the images


def image_rows(paths, label: int, subset: str) -> list[dict]:
    """Rows in the package's data schema (`mirage_hf.data`), images undecoded."""
    return [{"image": {"path": str(path), "bytes": None}, "label": label, "subset": subset} for path in paths]


def dataset_rows(source: str, split: str, subset: str) -> tuple[list[dict], list[dict]]:
    """(fake rows, real rows) of a labelled data set (any `mirage_hf.data.load_data` source)."""
    ds = load_data(source, split=split)
    rows = [{"image": row["image"], "label": row["label"], "subset": subset} for row in ds]
    return [r for r in rows if r["label"] == FAKE], [r for r in rows if r["label"] == REAL]


def readable(rows: list[dict], report: BadImageReport) -> list[dict]:
    """The rows whose image decodes; the others go into `report` with their reason."""
    kept = []
    for row in rows:
        try:
            open_image(row["image"])
        except ImageLoadError as error:
            report.add([(error.source or "<in-memory image>", error.reason)])
            continue
        kept.append(row)
    return kept


def _content_hash(row: dict) -> str:
    image = row["image"]
    data = image.get("bytes") or Path(image["path"]).read_bytes()
    return hashlib.sha256(data).hexdigest()


def check_not_the_same_images(fakes: list[dict], reals: list[dict]) -> None:
    """AdaptError when a file is given both as a fake and as a real image (a folder of reals passed as fakes)."""
    real_hashes = {_content_hash(row): row for row in reals}
    same = [(row, real_hashes[h]) for row in fakes if (h := _content_hash(row)) in real_hashes]
    if same:
        fake, real = same[0]
        raise AdaptError(
            f"{len(same)} of the {len(fakes)} images given as fakes are also given as real images (e.g. "
            f"{fake['image'].get('path')} = {real['image'].get('path')}); check --fakes and --reals"
        )


def holdout_size(n: int, fraction: float) -> int:
    """How many of `n` images `split_holdout` holds out: `fraction` of them rounded, at least one left to train."""
    return min(int(round(fraction * n)), max(n - 1, 0))


def split_holdout(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows): a seeded `fraction` of `rows`, none when it would round to zero."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[: holdout_size(len(rows), fraction)])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


MIN_TRAIN_FAKES, MIN_HELD_FAKES = 8, 2
"""Fewest new fakes to train on, and to hold out (when `holdout` > 0) to measure the new generator and calibrate."""


def too_few_fakes(n: int, holdout: float) -> str | None:
    """Why `n` readable new fakes are too few to train on or to hold out at `holdout`, with how many are needed."""

    def enough(count: int) -> bool:
        held = holdout_size(count, holdout)
        return count - held >= MIN_TRAIN_FAKES and (holdout == 0 or held >= MIN_HELD_FAKES)

    if enough(n):
        return None
    needed = next(count for count in range(n + 1, 100 * MIN_TRAIN_FAKES) if enough(count))
    held = holdout_size(n, holdout)
    uses = f"{MIN_TRAIN_FAKES} to train" + (
        f" and {MIN_HELD_FAKES} to hold out at --holdout {holdout:g}" if holdout else ""
    )
    return (
        f"{n} readable image(s) of the new generator ({n - held} to train, {held} held out): adaptation needs at "
        f"least {needed} ({uses})"
    )


# ------------------------------------------------------------------------------------- the reference data


def base_eval_results(detector: str) -> dict | None:
    """The detector's `eval_results.json` (from training or `mirage-eval`), or None."""
    path = cached_file(detector, EVAL_RESULTS_FILE, _raise_exceptions_for_missing_entries=False)
    return json.loads(Path(path).read_text()) if path else None


def eval_subsets(eval_results: dict) -> list[str]:
    return [name for name in eval_results["clean"] if name not in RESERVED_SUBSETS]


def recorded_synthetic_options(detector: str, eval_results: dict) -> dict | None:
    """The options `train.py` generated the detector's "synthetic" evaluation data with: recorded in
    eval_results.json, or in the run's `synthetic-data/options.json` beside a local model folder (runs from before
    that record)."""
    if eval_results.get("synthetic"):
        return dict(eval_results["synthetic"])
    return stamped_options(Path(detector).parent / SYNTHETIC_DIR)  # beside a training run's model/


def reference_rows(detector: str, source: str | None, split: str | None, workdir: Path) -> tuple[list[dict], str]:
    """(rows, description) of the data the forgetting is measured on: `source` (split `split`), else the
    detector's own evaluation data, regenerated as training made it when it was the generated "synthetic" set."""
    if source is not None:
        ds = load_data(source, split=split or "val")
        return list(ds), f"{source} [{split or 'val'}]"
    eval_results = base_eval_results(detector)
    if eval_results is None or "eval_dataset" not in eval_results:
        raise AdaptError(
            f"{detector} has no eval_results.json naming its evaluation data, so that data is unknown: pass --reference "
            "<data the detector knows> to measure forgetting, or --force to adapt without measuring it"
        )
    subsets, dataset, eval_split = eval_subsets(eval_results), eval_results["eval_dataset"], eval_results["eval_split"]
    if dataset == "synthetic":
        options = recorded_synthetic_options(detector, eval_results)
        if options is None:
            raise AdaptError(
                f"{detector} was evaluated on generated data whose options are not recorded; pass --reference"
            )
        root = make_synthetic_genimage(
            workdir / "reference", **{**options, "generators": subsets, "n_train_per_class": 0}
        )
        source = f"genimage:{root}"
    else:
        source = dataset
    try:
        ds = load_data(source, split=eval_split)
    except (OSError, ValueError) as error:
        raise AdaptError(
            f"cannot load the data {detector} was evaluated on ({dataset!r}, split {eval_split!r}: {error}); pass "
            "--reference <data the detector knows>"
        ) from error
    wanted = set(subsets)
    return [row for row in ds if row["subset"] in wanted], f"{dataset} [{eval_split}]"


# ------------------------------------------------------------------------------------------------ training


def trained_parameters(model) -> dict[str, torch.nn.Parameter]:
    return trainable_parameters(mirage_core(model))


def anchor_penalty(params: dict, base: dict) -> torch.Tensor:
    """||theta - theta_base||^2 / ||theta_base||^2 over the trained weights: relative, so one weight suits any size."""
    change = sum(((params[name] - base[name]) ** 2).sum() for name in params)
    scale = sum((base[name] ** 2).sum() for name in params).clamp_min(1e-12)
    return change / scale


def distillation(logit_diff, base_logit_diff, temperature: float) -> torch.Tensor:
    """Binary cross-entropy of the adapted p(fake) against the base detector's, at the base's temperature."""
    return F.binary_cross_entropy_with_logits(logit_diff / temperature, torch.sigmoid(base_logit_diff / temperature))


class Batches:
    """Each step's rows: half new fakes, half reals, drawn in seeded passes over each class. It queues row indices,
    so its `state_dict` (the random state and the queues) resumes the same draws."""

    def __init__(self, fakes: list[dict], reals: list[dict], batch_size: int, seed: int):
        self.pools = [(fakes, batch_size // 2 if reals else batch_size), (reals, batch_size - batch_size // 2)]
        self.rng, self.queues = random.Random(seed), [[], []]

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        rows = []
        for index, (pool, n) in enumerate(self.pools):
            while pool and len(self.queues[index]) < n:
                order = list(range(len(pool)))
                self.rng.shuffle(order)
                self.queues[index] += order
            rows += [pool[i] for i in self.queues[index][:n]]
            self.queues[index] = self.queues[index][n:]
        return rows

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "queues": self.queues}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(random_state(state["rng"]))
        self.queues = [list(queue) for queue in state["queues"]]


class LossLog(list):
    """The loss terms every `EVERY` steps (adapt_results.json's loss_log); checkpointed with the run."""

    EVERY = 10

    def state_dict(self) -> dict:
        return {"entries": list(self)}

    def load_state_dict(self, state: dict) -> None:
        self[:] = state["entries"]


def add_adaptation_lora(model, r: int):
    """`model` with a fresh LoRA (B = 0, so it starts as the detector) on the vision tower's attention; the prompts
    stay trainable under their own names. Returns (peft model, the LoRA's settings for the adapter file)."""
    from peft import get_peft_model

    config = mirage_lora_config(model, r=r, alpha=2 * r, save_trainable_modules=False)
    settings = {"r": r, "alpha": 2 * r, "target_modules": config.target_modules}
    trainable = set(trained_parameters(model))
    peft_model = get_peft_model(model, config)
    for name, param in mirage_core(peft_model).named_parameters():
        if name in trainable:
            param.requires_grad_(True)
    return peft_model, settings


ANCHOR_PREFIX = "added_anchors."


def with_new_anchor(detector: str, train_fakes, train_reals, preprocess, device):
    """The detector with one added fake anchor placed from the new images: its direction the difference of the
    mean image features of the new fakes and the reals, its offset halfway between where the typical new fake and
    the typical real would cross the detector's decision. The prompts stay trainable-marked, so the adapter
    holds them unchanged and loads like any other."""
    if not train_reals:
        raise AdaptError("--method anchor places the new anchor between the new fakes and real images: give --reals")
    model = MiraGeForImageClassification.from_pretrained(detector, added_fake_anchors=1).to(device).eval()
    collate = DetectionCollator(preprocess)
    with torch.no_grad():
        features = {
            label: torch.cat([model(pixel_values=collate(rows[i : i + 64])["pixel_values"].to(device)).image_embeds
                              for i in range(0, len(rows), 64)])
            for label, rows in ((FAKE, train_fakes), (REAL, train_reals))
        }  # fmt: skip
        direction = F.normalize(features[FAKE].mean(0) - features[REAL].mean(0), dim=0)
        config, real_anchor = model.config, model.text_anchors()[0]
        boundary = config.calibration_temperature * math.log(
            config.decision_threshold / (1 - config.decision_threshold)
        )
        scale = model.clip.logit_scale.exp()

        def crossing(embeds):  # per image: the offset at which the anchor's logit meets the decision
            return (boundary / scale + embeds @ real_anchor - embeds @ direction).mean()

        model.added_anchors.directions.copy_(direction[None])
        model.added_anchors.offsets.fill_((crossing(features[FAKE]) + crossing(features[REAL])) / 2)
    return model


def optimised_parameters(model, method: str) -> dict[str, torch.nn.Parameter]:
    """What the optimiser moves: every trained weight ("prompts"), or only the added anchor ("anchor")."""
    params = trained_parameters(model)
    return {name: p for name, p in params.items() if method != "anchor" or name.startswith(ANCHOR_PREFIX)}


def train(
    model, train_fakes, train_reals, preprocess, options: AdaptOptions, accelerator, quiet=False,
    checkpointing: Checkpointing | None = None,
) -> list[dict]:  # fmt: skip
    """Trains the model's weights (`optimised_parameters`) in place with the engine; returns the loss terms every
    10 steps. Each process draws its own batches (seed + process index); `checkpointing` saves and resumes them.

    Distillation keeps the reals' scores at the base detector's: with an added anchor, the base is the model with
    that anchor switched off."""
    core = mirage_core(model)
    params = optimised_parameters(model, options.method)
    base = {name: param.detach().clone() for name, param in params.items()}
    if options.method == "anchor":
        base[ANCHOR_PREFIX + "offsets"] = torch.full_like(base[ANCHOR_PREFIX + "offsets"], MiraGeAddedAnchors.OFF)
    temperature = core.config.calibration_temperature
    steps = options.resolved_steps(len(train_fakes))
    collate, seed = DetectionCollator(preprocess), options.seed + accelerator.process_index
    batches = Batches(train_fakes, train_reals, options.batch_size, seed)
    torch.manual_seed(seed)
    preprocess.augmentation.reseed(seed)
    device = accelerator.device

    def loss(model, batch):
        pixel_values, labels = batch["pixel_values"].to(device), batch["labels"].to(device)
        output = model(pixel_values=pixel_values, labels=labels)
        terms = {"model": output.loss}
        if options.anchor_weight and options.method == "prompts":
            terms["anchor"] = options.anchor_weight * anchor_penalty(params, base)
        real = labels == REAL
        if options.distill_weight and real.any():
            with torch.no_grad():
                base_diff = torch.func.functional_call(
                    core, base, kwargs={"pixel_values": pixel_values[real]}
                ).logit_diff
            terms["distill"] = options.distill_weight * distillation(output.logit_diff[real], base_diff, temperature)
        return {"loss": sum(terms.values()), **terms}

    log = LossLog()

    def record(output, state, last, epoch_done):
        if state.global_step % LossLog.EVERY == 0 or last:
            terms = {name: float(value.detach()) for name, value in output.items() if name != "loss"}
            log.append({"step": state.global_step, **terms})

    resting = [param for name, param in trained_parameters(model).items() if name not in params]
    for param in resting:  # no gradient through the vision tower for weights that do not move (they stay saved)
        param.requires_grad_(False)
    optimisation = Optimisation(options.learning_rate, steps, max(1, steps // 20), max_grad_norm=1.0)
    if checkpointing is not None:
        parts = {"batches": batches, "augmentation": preprocess.augmentation, "loss_log": log}
        checkpointing = dataclasses.replace(checkpointing, process_state=parts)
    engine = Engine(accelerator, Task(model, list(params.values()), loss), optimisation, checkpointing)
    state = engine.resume()
    progress = TrainingLog(accelerator, LossLog.EVERY, steps, state, desc="adapt", quiet=quiet)
    engine.train(lambda state: map(collate, batches), state, progress, after_step=record)
    for param in resting:
        param.requires_grad_(True)
    return list(log)


# ----------------------------------------------------------------------------------------- measuring it


def shardable(rows: list[dict], accelerator):
    """The rows as evaluation shards them over several processes (a `datasets.Dataset`); as they are for one."""
    if accelerator.num_processes == 1:
        return rows
    from datasets import Dataset

    return Dataset.from_list(rows)


def measure(model, rows, preprocess, accelerator, batch_size, quiet=False) -> dict:
    """Per-subset metrics of `model` on `rows` (`mirage_hf.evaluation`), with its calibration."""
    if not rows:
        return {}
    results, _ = evaluate(
        model, shardable(rows, accelerator), preprocess, accelerator, batch_size=batch_size, quiet=quiet
    )
    return results["clean"]


def kept_calibration(config, why: str) -> dict:
    """The calibration record when the base detector's temperature and threshold stay, and why."""
    return {
        "temperature": config.calibration_temperature,
        "threshold": config.decision_threshold,
        "fitted": False,
        "rule": f"the base detector's temperature and threshold, kept: {why}",
    }


def refit_calibration(model, holdout, preprocess, accelerator, batch_size, quiet=False) -> dict:
    """Fits T and t on the held-out new images (fakes and reals) when each class has `MIN_PER_CLASS`; otherwise
    the base detector's calibration stays. Returns the record for adapt_results.json and the card."""
    config = mirage_core(model).config
    labels = np.array([row["label"] for row in holdout])
    if min((labels == FAKE).sum(), (labels == REAL).sum()) < MIN_PER_CLASS:
        why = (
            f"{int((labels == REAL).sum())} real and {int((labels == FAKE).sum())} fake held-out images, fewer than "
            f"{MIN_PER_CLASS} per class"
        )
        return kept_calibration(config, why)
    scored = predict(
        model, shardable(holdout, accelerator), preprocess, accelerator, batch_size, desc="calibrate", quiet=quiet
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback is reported in the record, and the base's values are kept
        record = calibrate(scored.logit_diff, scored.labels)
    if not record["fitted"]:
        return kept_calibration(config, record["rule"])
    config.calibration_temperature, config.decision_threshold = record["temperature"], record["threshold"]
    return record


GUARDED = {"real_accuracy": "real accuracy", "fake_accuracy": "fake accuracy"}
"""What the guard keeps per old generator: each class on its own, as a loss in one can hide behind a gain in the other."""


def forgetting(before: dict, after: dict, new_subset: str | None, margin: float) -> dict:
    """Change in points of each old generator's (reference subsets but the new one) real and fake accuracy, and the
    (generator, metric) pairs that lost more than `margin`; a class a subset lacks (nan) is not guarded."""
    old = [name for name in before if name not in RESERVED_SUBSETS and name != new_subset]
    change = {name: {key: 100.0 * (after[name][key] - before[name][key]) for key in GUARDED} for name in old}
    beyond = [[name, key] for name in old for key, value in change[name].items() if -value > margin + 1e-9]
    return {"max_forgetting": margin, "change": change, "beyond_margin": beyond}


def effect_warnings(before_new: dict, after_new: dict) -> list[str]:
    """What says that the adaptation did nothing useful for the new generator (a no-op, or reals passed as fakes)."""
    notes = []
    if not after_new:
        return notes
    gain = 100.0 * (after_new["fake_accuracy"] - before_new["fake_accuracy"])
    if before_new["fake_accuracy"] >= 0.9:
        notes.append(
            f"the detector already called {100 * before_new['fake_accuracy']:.0f}% of the held-out new fakes fake: "
            "adapting to them changes little"
        )
    elif gain < 5.0:
        moved = f"raised the fake accuracy on the held-out new images by {gain:.1f} points only"
        if gain < 0:
            moved = f"lowered the fake accuracy on the held-out new images by {-gain:.1f} points"
        notes.append(
            f"adaptation {moved}: the detector did not learn to tell them apart (are the images given as fakes really "
            "generated?)"
        )
    auc = after_new.get("roc_auc")
    if auc is not None and not math.isnan(auc) and auc < 0.6:
        notes.append(
            f"after adaptation the held-out fakes and reals are ranked at chance (ROC AUC {auc:.2f}): images given "
            "as fakes that look like the real ones are the usual cause"
        )
    return notes


# -------------------------------------------------------------------------------------------- the result


@dataclass
class Adaptation:
    """What `adapt` returns: the adapted model, its record (adapt_results.json) and why it may not be written."""

    model: MiraGeForImageClassification
    results: dict
    image_processor: object
    lora: dict | None = None
    refused: list[str] = field(default_factory=list)

    def save(self, output_dir, force: bool = False) -> Path:
        """Writes the adapter folder atomically; AdaptError when the guard refused it and `force` is off."""
        if self.refused and not force:
            raise AdaptError("not written: " + "; ".join(self.refused))
        self.results["forced"] = bool(self.refused)
        results = to_jsonable(self.results)

        def write_extra(staging: Path):
            self.image_processor.save_pretrained(staging)
            (staging / ADAPT_RESULTS_NAME).write_text(json.dumps(results, indent=2) + "\n")
            adapter_card(staging, name=Path(output_dir).name).save(staging / "README.md")

        save_detector_adapter(self.model, results["base_model"], output_dir, lora=self.lora, write_extra=write_extra)
        return Path(output_dir)


def adapter_fraction(model, lora_state: dict | None, base: dict) -> float:
    """Bytes of the adapter's weights over bytes of the base detector's weights."""
    tensors = [*trained_parameters(model).values(), *(lora_state or {}).values()]
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return adapter_bytes / base["weights_bytes"]


@dataclass
class NewImages:
    """The new generator's readable images (rows tagged with its subset), split into what trains and what is held
    out, and what could not be read."""

    train_fakes: list[dict]
    train_reals: list[dict]
    held_fakes: list[dict]
    held_reals: list[dict]
    unreadable: BadImageReport

    @property
    def holdout(self) -> list[dict]:
        return self.held_fakes + self.held_reals

    def counts(self) -> dict:
        fakes, reals = len(self.train_fakes) + len(self.held_fakes), len(self.train_reals) + len(self.held_reals)
        return {
            "fakes": fakes, "reals": reals,
            "train_fakes": len(self.train_fakes), "train_reals": len(self.train_reals),
            "holdout_fakes": len(self.held_fakes), "holdout_reals": len(self.held_reals),
            "unreadable": self.unreadable.count, "unreadable_summary": self.unreadable.summary(),
        }  # fmt: skip


def new_images(fakes, reals, options: AdaptOptions, force: bool) -> tuple[NewImages, str | None]:
    """The readable new images, split; and, under `force`, why they are too few (AdaptError without it)."""
    report = BadImageReport()
    fakes, reals = readable(fakes, report), readable(reals, report)
    unreadable = f" ({report.summary()})" if report.count else ""
    if not fakes:
        raise AdaptError(f"no readable image of the new generator{unreadable}")
    shortfall = too_few_fakes(len(fakes), options.holdout)
    if shortfall and not force:
        raise AdaptError(f"{shortfall}{unreadable}; give more, or pass --force to adapt on these")
    check_not_the_same_images(fakes, reals)
    name = options.generator or NEW_GENERATOR
    fakes, reals = [dict(row, subset=name) for row in fakes], [dict(row, subset=name) for row in reals]
    train_fakes, held_fakes = split_holdout(fakes, options.holdout, options.seed)
    train_reals, held_reals = split_holdout(reals, options.holdout, options.seed) if reals else ([], [])
    return NewImages(train_fakes, train_reals, held_fakes, held_reals, report), shortfall


def check_detector_name(detector: str) -> None:
    """AdaptError for a name that is no detector folder or Hub id, or for an adapter (adapters do not stack)."""
    check_model_name(detector)
    if is_detector_adapter(detector):
        raise AdaptError(f"{detector} is an adapter; adapt its base detector instead (adapters do not stack)")


def base_detector(detector: str) -> tuple[MiraGeForImageClassification, dict]:
    """The detector to adapt and its fingerprint (with its weights' size); AdaptError for one that cannot be."""
    model = MiraGeForImageClassification.from_pretrained(detector)
    if model.config.added_fake_anchors:
        raise AdaptError(f"{detector} already has added anchors; adapt the detector it was made from")
    if not trained_parameters(model):
        raise AdaptError(f"{detector} is a {model.config.mode} detector: it has no trained weights to adapt")
    base = detector_fingerprint(detector)
    base["weights_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return model, base


def adapted(model, detector, images: NewImages, image_processor, options, accelerator, quiet, checkpointing):
    """The model after training (LoRA merged), the LoRA's settings and state (or None) and the loss log."""
    lora = None
    if options.lora_r:
        model, lora = add_adaptation_lora(model, options.lora_r)
    preprocess = Preprocessor(image_processor, model.config.preprocess)
    if options.method == "anchor":
        model = with_new_anchor(detector, images.train_fakes, images.train_reals, preprocess, accelerator.device)
    augmentation = TrainAugmentation(preprocess.image_size, resize_prob=0.0, blur_prob=0.0, jpeg_prob=0.0)
    train_preprocess = Preprocessor(image_processor, model.config.preprocess, augmentation)
    log = train(
        model, images.train_fakes, images.train_reals, train_preprocess, options, accelerator, quiet, checkpointing
    )
    model.eval()
    if lora is not None:
        from peft import get_peft_model_state_dict

        lora["state"] = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
        model = model.merge_and_unload()
        for param in model.clip.parameters():
            param.requires_grad_(False)
    return model, lora, log


def guard_verdict(before: dict, after: dict, name: str, options: AdaptOptions, measured: bool) -> dict:
    """The forgetting guard on the reference data, the new generator's before/after, the warnings and the
    reasons the adapter is refused (empty: it may be written)."""
    new_subset = name if name in before["reference"] else None
    guard = forgetting(before["reference"], after["reference"], new_subset, options.max_forgetting)
    new_before = before["reference"].get(new_subset) or before["holdout"].get(name, {})
    new_after = after["reference"].get(new_subset) or after["holdout"].get(name, {})
    refused = [
        f"{subset} lost {-guard['change'][subset][key]:.1f} points of {GUARDED[key]} (margin {options.max_forgetting:g})"
        for subset, key in guard["beyond_margin"]
    ]
    if not measured:
        refused.append("forgetting was not measured (no reference data)")
    return {
        "forgetting": guard,
        "new_generator": {
            "subset": new_subset or (name if before["holdout"] else None),
            "before": new_before,
            "after": new_after,
        },
        "warnings": effect_warnings(before["holdout"].get(name) or new_before, after["holdout"].get(name) or new_after),
        "refused": refused,
    }


def adapt(
    detector: str,
    fakes: list[dict],
    reals: list[dict] | None = None,
    options: AdaptOptions | None = None,
    reference: str | None = None,
    reference_split: str | None = None,
    measure_forgetting: bool = True,
    device=None,
    quiet: bool = False,
    force: bool = False,
    checkpointing: Checkpointing | None = None,
) -> Adaptation:
    """Adapts `detector` (folder or Hub id) to the new generator whose images are `fakes` (rows of `image_rows`).

    `reals` are real images (recommended: without them the detector learns from fakes alone, and only the
    reference data says what that did to real images). The returned `Adaptation` holds the adapted model, the
    before/after tables and, in `refused`, why the forgetting guard would not write it. Too few readable fakes to
    train on and hold out raise AdaptError, unless `force` (then the record warns). `checkpointing` says where
    and how often training saves checkpoints, and which one it resumes from.
    """
    options = options or AdaptOptions()
    started = time.perf_counter()
    quiet = quiet or not PartialState().is_main_process  # one process speaks
    say = (lambda *args: None) if quiet else (lambda message: print(f"{PROG}: {message}", file=sys.stderr))
    check_detector_name(detector)
    images, shortfall = new_images(fakes, reals or [], options, force)
    accelerator = make_accelerator(cpu=device == "cpu", mixed_precision=options.mixed_precision)
    model, base = base_detector(detector)
    image_processor = AutoImageProcessor.from_pretrained(detector)
    preprocess = Preprocessor(image_processor, model.config.preprocess)
    name = options.generator or NEW_GENERATOR
    model.to(accelerator.device)

    with tempfile.TemporaryDirectory(prefix="mirage-adapt-") as workdir:
        ref_rows, ref_name = ([], None)
        if measure_forgetting:
            ref_rows, ref_name = reference_rows(detector, reference, reference_split, Path(workdir))
            say(f"scoring the reference data ({ref_name}, {len(ref_rows)} images) and the held-out new images")

        def scored(model) -> dict:
            return {part: measure(model, rows, preprocess, accelerator, options.eval_batch_size, quiet)
                    for part, rows in (("reference", ref_rows), ("holdout", images.holdout))}  # fmt: skip

        before = scored(model)
        steps = options.resolved_steps(len(images.train_fakes))
        say(f"training on {len(images.train_fakes)} fakes and {len(images.train_reals)} reals for {steps} steps "
            f"({len(images.held_fakes)} fakes and {len(images.held_reals)} reals held out)")  # fmt: skip
        model, lora, log = adapted(model, detector, images, image_processor, options, accelerator, quiet, checkpointing)
        if options.method == "anchor":  # the old decision stays where it was: the base's temperature and threshold
            calibration = kept_calibration(model.config, "--method anchor")
        else:
            calibration = refit_calibration(
                model, images.holdout, preprocess, accelerator, options.eval_batch_size, quiet
            )
        after = scored(model)

    verdict = guard_verdict(before, after, name, options, measure_forgetting)
    if shortfall:
        verdict["warnings"].insert(0, f"adapted with --force on {shortfall}")
    results = {
        "base_model": base,
        "generator": name,
        "reference": ref_name,
        "images": images.counts(),
        "options": {**dataclasses.asdict(options), "steps": steps},
        "preprocess": model.config.preprocess,
        "before": before,
        "after": after,
        "new_generator": verdict["new_generator"],
        "calibration": calibration,
        "forgetting": verdict["forgetting"],
        "refused": verdict["refused"],
        "warnings": verdict["warnings"],
        "adapter_fraction": adapter_fraction(model, None if lora is None else lora["state"], base),
        "loss_log": log,
        "seconds": time.perf_counter() - started,
    }
    return Adaptation(model, results, image_processor, lora, verdict["refused"])


# ------------------------------------------------------------------------------------------------ reporting


def summary_tables(results: dict) -> str:
    """The before/after tables of an adaptation record, as the CLI prints them and the card shows them."""
    titles = {
        "reference": f"the detector's reference data ({results['reference']}), in percent",
        "holdout": "the held-out new images (never trained on), in percent",
    }
    return "\n\n".join(
        format_before_after(results["before"][part], results["after"][part], title)
        for part, title in titles.items()
        if results["before"][part]
    )


# ------------------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=PROG,
        description="Adapt a trained MiraGe detector to a new generator from a few of its images; writes an adapter "
        "folder that the Auto classes, pipeline() and mirage-detect load, unless the detector forgets the "
        "generators it knew.",
        epilog="Exit codes: 0 written, 1 usage error or unusable input, 3 refused by the forgetting guard.",
    )
    _add_image_options(parser)
    _add_guard_options(parser)
    _add_training_options(parser)
    _add_output_options(parser)
    add_quiet(parser, "progress bar")
    return parser


def _add_image_options(parser: argparse.ArgumentParser) -> None:
    """The detector to adapt, the new generator's images and the real ones."""
    group = parser.add_argument_group("detector and new images")
    group.add_argument("detector", help="trained detector folder or Hub id")
    group.add_argument("--fakes", nargs="+", default=[], metavar="INPUT",
                        help="images of the new generator: files, folders (recursive) or glob patterns")  # fmt: skip
    group.add_argument("--files_from", metavar="LIST", help="also the fakes listed in LIST, one path per line")
    group.add_argument("--reals", nargs="+", default=[], metavar="INPUT", help="real images (recommended)")
    group.add_argument("--reals_from", metavar="LIST", help="also the real images listed in LIST")
    group.add_argument("--dataset", help="a labelled data set (folder, genimage:/ufd: root, file or Hub id): its "
                        "fakes are the new generator's, its reals the reals")  # fmt: skip
    group.add_argument("--dataset_split", default="train", help="split of --dataset (default train)")
    group.add_argument("--generator", help="name of the new generator (a reference subset of this name measures it)")


def _add_guard_options(parser: argparse.ArgumentParser) -> None:
    """What the forgetting guard measures and allows."""
    defaults = AdaptOptions()
    group = parser.add_argument_group("forgetting guard")
    group.add_argument("--reference", help="data the detector knows, to measure forgetting on (default: the data in "
                        "its eval_results.json, regenerated when it was the generated demo data)")  # fmt: skip
    group.add_argument("--reference_split", help="split of --reference (default val)")
    group.add_argument("--max_forgetting", type=float, default=defaults.max_forgetting,
                        help="largest loss in points of real accuracy and of fake accuracy on any old generator "
                        "(default %(default)s)")  # fmt: skip
    group.add_argument("--force", action="store_true", help="write the adapter even when the guard refuses (the "
                        "card says so), no reference data exists or the new fakes are too few")  # fmt: skip


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """How the adapter is trained (the engine's options: precision, checkpoints, device)."""
    defaults = AdaptOptions()
    group = parser.add_argument_group("training")
    group.add_argument("--method", choices=AdaptOptions.METHODS, default=defaults.method,
                        help="anchor (default): add a fake anchor for the new generator and train only it, the old "
                        "anchors, prompts and calibration kept; prompts: retrain the detector's prompts")  # fmt: skip
    group.add_argument("--steps", type=int, help="optimiser steps (default: 10 passes over the fakes, 100 to 400)")
    group.add_argument("--batch_size", type=int, default=defaults.batch_size,
                        help="images per step, half new fakes and half reals (default %(default)s)")  # fmt: skip
    group.add_argument("--learning_rate", type=float, default=defaults.learning_rate,
                        help="AdamW learning rate (default %(default)s)")  # fmt: skip
    group.add_argument("--anchor_weight", type=float, default=defaults.anchor_weight,
                        help="L2 penalty toward the detector's weights (default %(default)s; 0 = off)")  # fmt: skip
    group.add_argument("--distill_weight", type=float, default=defaults.distill_weight,
                        help="distillation of the detector's scores on reals (default %(default)s; 0 = off)")  # fmt: skip
    group.add_argument("--holdout", type=float, default=defaults.holdout,
                        help="fraction of the new images held out (default %(default)s)")  # fmt: skip
    group.add_argument(
        "--lora_r",
        type=int,
        default=defaults.lora_r,
        help="also train a fresh LoRA of this rank (default %(default)s: none)",
    )
    group.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the hold-out split, the batches and the new weights (default %(default)s)")  # fmt: skip
    group.add_argument("--mixed_precision", choices=AdaptOptions.MIXED_PRECISION, default=defaults.mixed_precision,
                        help="autocast the forwards in bf16 or fp16 (default %(default)s)")  # fmt: skip
    group.add_argument("--save_every", type=int, default=0, metavar="N",
                        help=f"save a checkpoint every N steps, in <output>{CHECKPOINTS_SUFFIX} (default 0: none)")  # fmt: skip
    group.add_argument("--resume_from_checkpoint", metavar="latest|PATH",
                        help="resume the training from this checkpoint, or the newest one with 'latest'")  # fmt: skip
    group.add_argument("--device", help="torch device (default: cuda if available, else cpu)")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """Where the adapter goes."""
    group = parser.add_argument_group("output")
    group.add_argument("--output", help="adapter folder to write (default: <detector>-adapter, or <name>-adapter)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing --output")


CHECKPOINTS_SUFFIX = ".training"  # <output>.training/checkpoints/step_*: beside the adapter folder, never in it


def training_checkpoints(args, output: str) -> Checkpointing | None:
    """Where `--save_every` / `--resume_from_checkpoint` keep the training's checkpoints; None without them."""
    if not (args.save_every or args.resume_from_checkpoint):
        return None
    return Checkpointing(
        output + CHECKPOINTS_SUFFIX, args.save_every, total_limit=2, resume_from=args.resume_from_checkpoint
    )


def default_output(detector: str) -> str:
    return f"{detector.rstrip('/')}-adapter" if os.path.isdir(detector) else f"{detector.split('/')[-1]}-adapter"


def check_args(parser, args) -> AdaptOptions:
    """Usage errors that argparse cannot see, before any model is loaded; the options of a valid command line."""
    if not (args.fakes or args.files_from or args.dataset):
        parser.error("give the new generator's images: --fakes, --files_from or --dataset")
    output = args.output or default_output(args.detector)
    if os.path.exists(output) and not args.overwrite:
        parser.error(f"--output {output!r} exists; pass --overwrite to replace it")
    if args.save_every < 0:
        parser.error(f"--save_every must be >= 0, got {args.save_every}")
    try:
        return AdaptOptions(
            steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
            anchor_weight=args.anchor_weight, distill_weight=args.distill_weight, holdout=args.holdout,
            lora_r=args.lora_r, max_forgetting=args.max_forgetting, generator=args.generator, seed=args.seed,
            method=args.method, mixed_precision=args.mixed_precision,
        )  # fmt: skip
    except ValueError as error:
        parser.error(str(error))


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        options = check_args(parser, args)
    except SystemExit as exit_:  # --help (0) or a usage error (1), as a return code
        return exit_.code
    output = args.output or default_output(args.detector)
    if not args.quiet:
        configure_logging()  # the engine's messages (where a resumed run continues) reach the command line
    hide_library_bars()  # the weight-loading bar is noise in a command-line tool
    offline_if_hub_unreachable()
    try:
        fakes = image_rows(find_images(args.fakes, args.files_from), FAKE, "")
        reals = image_rows(find_images(args.reals, args.reals_from), REAL, "") if args.reals or args.reals_from else []
        if args.dataset:
            more_fakes, more_reals = dataset_rows(args.dataset, args.dataset_split, "")
            fakes, reals = fakes + more_fakes, reals + more_reals
        if not fakes:
            raise AdaptError(f"no images found in {' '.join(args.fakes) or args.files_from or args.dataset}")
        adaptation = adapt(
            args.detector, fakes, reals, options, reference=args.reference, reference_split=args.reference_split,
            measure_forgetting=not (args.force and args.reference is None and base_eval_results(args.detector) is None),
            device=args.device, quiet=args.quiet, force=args.force, checkpointing=training_checkpoints(args, output),
        )  # fmt: skip
    except (AdaptError, OSError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    if not PartialState().is_main_process:  # the first process reports and writes
        return REFUSED if adaptation.refused and not args.force else 0
    results = adaptation.results
    if results["images"]["unreadable"]:
        print(f"{PROG}: {results['images']['unreadable_summary']}", file=sys.stderr)
    print(summary_tables(results))
    for note in results["warnings"]:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    if adaptation.refused and not args.force:
        print(f"{PROG}: refused, nothing written: {'; '.join(adaptation.refused)}. Pass --force to write it anyway, "
              "or adapt with more real images, a larger --anchor_weight or fewer --steps.", file=sys.stderr)  # fmt: skip
        return REFUSED
    adaptation.save(output, force=args.force)
    shutil.rmtree(output + CHECKPOINTS_SUFFIX, ignore_errors=True)  # the adapter is whole: its checkpoints are spent
    forced = " despite the guard (--force; the card says so)" if adaptation.refused else ""
    print(
        f"{PROG}: wrote {output}{forced}: {100 * results['adapter_fraction']:.2f}% of the detector's weights; load it "
        f"with mirage-detect --model {output}",
        file=sys.stderr,
    )
    return 0


def script() -> None:
    sys.exit(main())


__all__ = ["AdaptOptions", "Adaptation", "AdaptError", "adapt", "image_rows", "dataset_rows"]


if __name__ == "__main__":  # `accelerate launch -m mirage_hf.adaptation ...`
    script()
