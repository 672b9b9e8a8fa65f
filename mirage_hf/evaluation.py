"""Streaming evaluation: per-generator metrics, a robustness sweep, and the data for calibration.

Each process scores its own contiguous shard of the test set (no sample is duplicated or dropped) and keeps
one float per image; the shards are gathered at the end. Images are never held beyond their batch, so memory
stays flat whatever the size of the set.
"""

from typing import NamedTuple

import numpy as np
from accelerate.utils import gather_object
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from .metrics import per_subset_metrics
from .modeling_mirage import FAKE_FROM
from .progress import progress_bar
from .scoring import as_scorer
from .transforms import ROBUSTNESS_SWEEP, BadImageReport, DetectionCollator, degrade


def condition_name(kind: str, value) -> str:
    return f"{kind}{value:g}"


class Degraded:
    """Preprocessing with a fixed degradation applied first (one column of the robustness sweep)."""

    def __init__(self, preprocess, kind: str, value):
        self.preprocess, self.kind, self.value = preprocess, kind, value

    def __call__(self, images):
        return self.preprocess([degrade(image, self.kind, self.value) for image in images])


def _shard(dataset, accelerator):
    if accelerator.num_processes == 1:
        return dataset
    if isinstance(dataset, IterableDataset):
        return split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
    return dataset.shard(num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True)


class Predictions(NamedTuple):
    """What `predict` returns, one entry per readable image (gathered from all processes)."""

    labels: np.ndarray  # 0 real, 1 fake (int64)
    logit_diff: np.ndarray  # the model's uncalibrated ranking score (float32)
    p_fake: np.ndarray  # the calibrated probability (float32)
    subsets: list  # the generator (subset) of each image
    bad_images: BadImageReport  # the files that could not be read


def predict(model, dataset, preprocess, accelerator, batch_size=64, num_workers=0, desc="eval", quiet=False):
    """The model's output for every readable image: its label, logit difference and calibrated p(fake).

    Returns `Predictions`, gathered from all processes; `logit_diff` and `p_fake` are the model's `MiraGeOutput`
    fields (uncalibrated ranking score, calibrated probability). `model` is
    a MiraGe model (inside any training wrapper) or any scorer of `mirage_hf.scoring`, such as an `OnnxModel`
    evaluating an exported graph on the same data.
    """
    scorer = as_scorer(model)
    loader = DataLoader(
        _shard(dataset, accelerator), batch_size=batch_size, num_workers=num_workers,
        collate_fn=DetectionCollator(preprocess),
    )  # fmt: skip
    labels, diffs, p_fakes, subsets, failures = [], [], [], [], BadImageReport()
    disable = quiet or not accelerator.is_local_main_process
    progress = progress_bar(loader, desc=desc, disable=disable, leave=False)
    with accelerator.autocast():
        for batch in progress:
            failures.add(batch["failed"])
            if not batch["labels"].numel():
                continue
            output = scorer(batch["pixel_values"])
            diffs.append(output["logit_diff"])
            p_fakes.append(output["p_fake"])
            labels.append(batch["labels"].numpy())
            subsets.extend(batch["subsets"])
    shards = gather_object([(labels, diffs, p_fakes, subsets, failures.count, failures.examples)])
    report = BadImageReport()
    all_labels, all_diffs, all_p_fakes, all_subsets = [], [], [], []
    for shard_labels, shard_diffs, shard_p_fakes, shard_subsets, count, examples in shards:
        all_labels += shard_labels
        all_diffs += shard_diffs
        all_p_fakes += shard_p_fakes
        all_subsets += shard_subsets
        report.add(examples)
        report.count += count - len(examples)
    concat = lambda arrays, dtype: np.concatenate(arrays) if arrays else np.zeros(0, dtype)  # noqa: E731
    diffs, p_fakes = concat(all_diffs, np.float32), concat(all_p_fakes, np.float32)
    return Predictions(concat(all_labels, np.int64), diffs, p_fakes, all_subsets, report)


def evaluate(model, dataset, preprocess, accelerator, robustness=False, batch_size=64, num_workers=0, quiet=False):
    """{"clean": per-subset metrics[, "jpeg95": ..., ...]} plus the bad-image report of the clean pass."""
    conditions = [("clean", preprocess)]
    if robustness:
        conditions += [
            (condition_name(kind, value), Degraded(preprocess, kind, value))
            for kind, values in ROBUSTNESS_SWEEP.items()
            for value in values
        ]
    results, clean_report = {}, None
    for name, condition in conditions:
        scored = predict(
            model, dataset, condition, accelerator, batch_size, num_workers, desc=f"eval {name}", quiet=quiet
        )
        if not scored.labels.size:
            raise ValueError(f"no readable image in the evaluation data ({scored.bad_images.summary()})")
        # ranking metrics on the logit difference (no temperature changes them), the rest on calibrated p(fake)
        results[name] = per_subset_metrics(
            scored.labels, scored.p_fake, scored.subsets, threshold=FAKE_FROM, scores=scored.logit_diff
        )
        clean_report = clean_report or scored.bad_images
    return results, clean_report
