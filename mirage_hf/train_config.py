"""Options of `train.py`: one dataclass, filled from a YAML/JSON preset and then from command-line overrides."""

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from .configuration_mirage import PREPROCESS_MODES
from .onnx_export import BACKENDS

PRESETS = files("mirage_hf") / "configs"  # package data: found by name from any directory, in a wheel too


def option(default, help: str, factory: bool = False):
    """A field with help text for `--help`; `factory=True` for a callable making a mutable default."""
    if factory:
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------------
    clip_model: str = option(
        "tiny-random",
        'CLIP checkpoint (Hub id or folder); "tiny-random" builds a tiny random CLIP locally (demo, tests).',
    )
    mode: str = "mirage"
    n_ctx: int = 2
    prompt_depth: int = 9
    ctx_init: str | None = "a photo of a"
    ce_weight: float = 1.0
    align_weight: float = 1.0
    sep_weight: float = 1.0
    supcon_weight: float = 0.1
    sep_margin: float = 0.0
    anchor_margin: float = 0.5
    supcon_temperature: float = 0.07
    memory_bank_size: int = 1024
    lora_r: int = option(0, "LoRA rank on CLIP attention (0 = prompts only, the paper's setting).")
    lora_alpha: int = 16
    lora_towers: list[str] = field(default_factory=lambda: ["vision"])
    lora_projections: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    tiny_clip: dict = option(
        dict,
        'Options of the "tiny-random" CLIP (image_size, patch_size, hidden_size, num_layers, projection_dim).',
        factory=True,
    )

    # --- data --------------------------------------------------------------------------------------
    dataset: str = option(
        "synthetic",
        'Training data: "synthetic" (generated), "genimage:<root>", "ufd:<root>", a folder, a file or a Hub id.',
    )
    eval_dataset: str | None = option(None, "Test data (same forms); defaults to `dataset`.")
    train_split: str = "train"
    eval_split: str = "val"
    train_subsets: list[str] | None = option(
        None, 'Generators (subsets) to train on; None = all. GenImage protocol: ["stable_diffusion_v_1_4"].'
    )
    eval_subsets: list[str] | None = None
    image_column: str = "image"
    label_column: str = "label"
    subset_column: str | None = None
    streaming: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    synthetic: dict = option(
        dict,
        "Options of the generated data set (generators, n_train_per_class, n_val_per_class, image_size).",
        factory=True,
    )
    flip_prob: float = 0.5
    resize_prob: float = 0.1
    blur_prob: float = 0.1
    jpeg_prob: float = 0.1
    eval_preprocess: str | None = option(
        None,
        '"resize" (the CLIP processor\'s resize + centre crop) or "center_crop" (no resize: keeps artefacts). '
        "Training stores it in the model's config (default resize); --eval_only defaults to the model's.",
    )

    # --- optimisation ------------------------------------------------------------------------------
    output_dir: str = "outputs/demo"
    seed: int = 0
    num_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    mixed_precision: str = option("no", '"no", "bf16" or "fp16" (Accelerate).')
    gradient_checkpointing: bool = False
    num_workers: int = 2
    eval_every: int = option(
        0, "Evaluate (and export the model if it is the best so far) every N optimiser steps; 0 = each epoch end."
    )
    save_every: int = option(0, "Checkpoint every N optimiser steps (for resume); 0 = each epoch end.")
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = option(
        None, 'A checkpoint folder, or "latest" (the newest complete one in <output_dir>/checkpoints).'
    )
    log_with: list[str] = option(list, "Accelerate trackers: tensorboard, wandb, ...", factory=True)
    log_every: int = option(
        10, "Log the loss terms, averaged over the last N optimiser steps (each log waits once for the GPU)."
    )

    # --- evaluation --------------------------------------------------------------------------------
    eval_only: bool = False
    model: str | None = option(None, "For --eval_only: a trained MiraGe folder or Hub id.")
    robustness: bool = option(False, "Also evaluate under JPEG 95/75/50/30, blur 1/2/3 and downscale 0.5/0.25.")
    calibrate: str | None = option(
        "balanced_accuracy",
        'After training, choose the threshold on held-out data: "balanced_accuracy", "target_fpr" or None.',
    )
    target_fpr: float = 0.05
    calibration_holdout: float = option(
        0.1, "Fraction of the training data held out (never trained on) for calibration."
    )
    compile: bool = option(
        False, "Evaluate with the image encoder under torch.compile (opt-in; pays off on large sets)."
    )
    backend: str = option(
        "torch",
        'For --eval_only: "torch", or ONNX Runtime on the graphs mirage-export-onnx wrote: "onnx" (fp32) or '
        '"onnx-int8" (quantized), to measure what the export costs in accuracy.',
    )

    def __post_init__(self):
        for option in dataclasses.fields(self):  # YAML reads "1e-3" as a string
            if option.type in (float, float | None) and isinstance(getattr(self, option.name), str | int):
                setattr(self, option.name, float(getattr(self, option.name)))
        choices = {
            "mixed_precision": ("no", "bf16", "fp16"),
            "eval_preprocess": (None, *PREPROCESS_MODES),
            "calibrate": (None, "balanced_accuracy", "target_fpr"),
            "backend": BACKENDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.backend != "torch" and not self.eval_only:
            raise ValueError(f"--backend {self.backend} scores an exported model: use it with --eval_only --model DIR")
        if self.backend != "torch" and self.compile:
            raise ValueError("--compile applies to the torch backend")
        if self.eval_only and not self.model:
            raise ValueError("--eval_only needs --model <trained MiraGe folder or Hub id>")
        if not 0.0 <= self.calibration_holdout < 1.0:
            raise ValueError(f"calibration_holdout must lie in [0, 1), got {self.calibration_holdout}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")


def preset_names() -> list[str]:
    """The presets shipped in the package (`mirage_hf/configs/<name>.yaml`)."""
    return sorted(entry.name.removesuffix(".yaml") for entry in PRESETS.iterdir() if entry.name.endswith(".yaml"))


def load_preset(path: str | os.PathLike) -> dict:
    """Reads a YAML or JSON file; a name that is not a file ("demo") means the shipped preset of that name."""
    path = Path(path)
    if path.exists():
        text = path.read_text()
    elif str(path) in preset_names():
        text = (PRESETS / f"{path}.yaml").read_text()
    else:
        raise FileNotFoundError(f"config file {str(path)!r} not found (presets: {preset_names()})")
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    unknown = set(values or {}) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {sorted(unknown)}")
    return values or {}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """`--config <preset or file>` then `--<option> <value>` overrides (values parsed as YAML: 1e-3, true, [a, b])."""
    parser = argparse.ArgumentParser(
        description="Train or evaluate a MiraGe detector with Accelerate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config",
        help=f"a shipped preset ({', '.join(preset_names())}) or a YAML/JSON file (default: demo; none with "
        "--eval_only, which then scores with the preprocessing stored in the model)",
    )
    for option in dataclasses.fields(TrainConfig):
        flag = {"nargs": "?", "const": True} if option.type is bool else {}
        parser.add_argument(
            f"--{option.name}",
            type=yaml.safe_load,
            default=argparse.SUPPRESS,
            help=option.metadata.get("help", ""),
            **flag,
        )
    args = vars(parser.parse_args(argv))
    preset = args.pop("config") or (None if args.get("eval_only") else "demo")
    values = load_preset(preset) if preset else {}
    values.update(args)
    return TrainConfig(**values)
