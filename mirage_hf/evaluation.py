"""Streaming evaluation: per-generator metrics, a robustness sweep, and the data for calibration; `Evaluation`,
the test set of a run with its report (the tables printed, eval_results.json written).

Each process scores its own contiguous shard of the test set (no sample is duplicated or dropped) and keeps
one float per image; the shards are gathered at the end. Images are never held beyond their batch, so memory
stays flat whatever the size of the set.
"""

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
from accelerate.utils import gather_object
from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from .data_sources import synthetic_data_options
from .metrics import format_comparison_table, format_table, per_subset_metrics, to_jsonable
from .model_folder import BACKEND_EVAL_RESULTS_FILE, EVAL_RESULTS_FILE, export_model
from .modeling_mirage import FAKE_FROM
from .onnx_runtime import ONNX_DIR
from .progress import logger, progress_bar
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


class Evaluation:
    """The test set and where results go: periodic evaluation during training, and the final report."""

    def __init__(
        self, cfg, accelerator, eval_set, preprocess, image_processor, calibration_set=None, model_name=None,
        backend="torch",
    ):  # fmt: skip
        self.cfg, self.accelerator, self.eval_set = cfg, accelerator, eval_set
        self.preprocess, self.image_processor = preprocess, image_processor
        self.calibration_set = calibration_set  # held-out training images: they choose the checkpoint and T, t
        self.model_dir = Path(cfg.output_dir) / "model"
        self.model_name = model_name  # a saved model evaluated as it is (mirage-eval); None: training's model_dir
        self.backend = backend  # what scores a saved model: torch, onnx or onnx-int8

    def evaluate_and_export(self, model, state):
        """Evaluates the model in training; exports it to `model_dir` when it is the best yet. `state` is where
        training stands (its global_step, and the best_score this updates).

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
                "model": self.model_name or str(self.model_dir),
                "backend": self.backend,
                "eval_dataset": cfg.eval_dataset or cfg.dataset,
                "eval_split": cfg.eval_split,
                "synthetic": synthetic_data_options(cfg) if (cfg.eval_dataset or cfg.dataset) == "synthetic" else None,
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
            onnx_dir = Path(self.model_name or "", ONNX_DIR)
            if self.backend != "torch" and onnx_dir.is_dir():  # next to the graph it measures, for the model card
                (onnx_dir / BACKEND_EVAL_RESULTS_FILE.format(backend=self.backend)).write_text(
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
