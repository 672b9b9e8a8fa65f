"""Options of `train.py`: typed dataclass fields, defaults from a YAML/JSON preset, then command-line overrides.

`HfArgumentParser` builds the command line from the fields' types (as transformers' examples do), so
`--mixed_precision no`, `--calibrate None` and `--train_subsets a b` mean what they say.
"""

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from .calibration import METHODS
from .configuration_mirage import PREPROCESS_MODES, MiraGeConfig
from .scoring import check_backend_options
from .transforms import ROBUSTNESS_SWEEP

PRESETS = files("mirage_hf") / "configs"  # package data: found by name from any directory, in a wheel too
NONE_WORDS = ("None", "null")
"""What `--<optional option>` takes for "no value" (Python's and YAML's spelling)."""


def option(default, help: str, factory: bool = False):
    """A field with help text for `--help`; `factory=True` for a callable making a mutable default."""
    if factory:
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


NOT_OPTIONS = (
    "clip_config", "prompt_token_ids", "clip_name_or_path", "calibration_temperature", "decision_threshold",
    "preprocess",
)  # fmt: skip
"""MiraGeConfig fields that `from_clip`, calibration or `--eval_preprocess` write; every other field is an option."""


def _model_option(config_field: dataclasses.Field) -> tuple:
    """(name, type, field) of a MiraGeConfig field, with its default; `float | int` parses as float."""
    annotation = MiraGeConfig.__annotations__[config_field.name]
    return (
        config_field.name,
        float if annotation == float | int else annotation,
        field(
            default=config_field.default,
            default_factory=config_field.default_factory,
            metadata={"help": f"MiraGeConfig.{config_field.name} (see its docstring)"},
        ),
    )


ModelOptions = dataclasses.make_dataclass(
    "ModelOptions",
    [_model_option(f) for f in dataclasses.fields(MiraGeConfig)
     if f.name in MiraGeConfig.__annotations__ and f.name not in NOT_OPTIONS],
)  # fmt: skip
ModelOptions.__doc__ = "The model options of `train.py`, passed to `from_clip`: declared once, in MiraGeConfig."


@dataclass
class TrainConfig(ModelOptions):
    """Everything `train.py` does, as typed options; the model's own come from MiraGeConfig through ModelOptions."""

    clip_model: str = option(
        "tiny-random",
        'CLIP checkpoint (Hub id or folder); "tiny-pretrained": the tiny CLIP shipped in the package (demo); '
        '"tiny-random": a tiny random CLIP built locally (tests that need only shapes).',
    )
    lora_r: int = option(0, "LoRA rank on the CLIP projections of lora_projections (0 = prompts only, the paper's).")
    lora_alpha: int = 16
    lora_towers: list[str] = field(default_factory=lambda: ["vision"])
    lora_projections: list[str] = option(
        lambda: ["q_proj", "v_proj"],
        "Projections that get LoRA: q_proj, k_proj, v_proj, out_proj, fc1, fc2.",
        factory=True,
    )
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
    eval_preprocess: Literal[PREPROCESS_MODES] | None = option(
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
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", '"no", "bf16" or "fp16" (Accelerate).')
    gradient_checkpointing: bool = False
    num_workers: int = 2
    torch_threads: int | None = option(
        None,
        "CPU threads torch may use (None: torch's default, one per core). Tiny models run faster on one: the demo "
        "preset sets 1 (benchmarks/BENCHMARKS.md has the measurement).",
    )
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
    robustness: bool = option(
        False,
        "Also evaluate under "
        + "; ".join(
            f"{kind} {', '.join(f'{value:g}' for value in values)}" for kind, values in ROBUSTNESS_SWEEP.items()
        )
        + ".",
    )
    calibrate: Literal[METHODS] | None = option(
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
    backend: Literal["torch", "onnx", "onnx-int8"] = option(
        "torch",
        'For --eval_only: "torch", or ONNX Runtime on the graphs mirage-export-onnx wrote: "onnx" (fp32) or '
        '"onnx-int8" (quantized), to measure what the export costs in accuracy.',
    )

    def __post_init__(self):
        for name, annotation in typing.get_type_hints(TrainConfig).items():
            kinds, value = _kinds(annotation), getattr(self, name)
            if float in kinds and isinstance(value, str | int) and not isinstance(value, bool):
                setattr(self, name, float(value))  # YAML reads "1e-3" as a string
            elif any(typing.get_origin(kind) is list for kind in kinds):
                if isinstance(value, str):
                    setattr(self, name, [value])  # `train_subsets: sd14` in a preset is a one-element list
                elif value == [None]:
                    setattr(self, name, None)  # `--train_subsets None`
            allowed = _choices(kinds)
            if allowed and getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.backend != "torch" and not self.eval_only:
            raise ValueError(f"--backend {self.backend} scores an exported model: use it with --eval_only --model DIR")
        check_backend_options(self.backend, compile=self.compile)
        if self.eval_only and not self.model:
            raise ValueError("--eval_only needs --model <trained MiraGe folder or Hub id>")
        if not 0.0 <= self.calibration_holdout < 1.0:
            raise ValueError(f"calibration_holdout must lie in [0, 1), got {self.calibration_holdout}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")

    def model_options(self) -> dict:
        """The MiraGeConfig fields to pass to `from_clip`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelOptions)}


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


def _kinds(annotation) -> tuple:
    """The members of a union annotation (`str | None` -> (str, NoneType)), else the annotation alone."""
    return (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )


def _choices(kinds: tuple) -> tuple:
    """The values a `Literal` option allows, None included when the option is optional; () for other types."""
    literal = next((kind for kind in kinds if typing.get_origin(kind) is Literal), None)
    return (*typing.get_args(literal), *((None,) if type(None) in kinds else ())) if literal else ()


def _mapping(text: str) -> dict:
    mapping = yaml.safe_load(text)
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping such as '{{image_size: 32}}', got {text!r}")
    return mapping


class OptionParser(HfArgumentParser):
    """`HfArgumentParser` plus two types it leaves out: "None" for optional options, YAML mappings for dicts."""

    @staticmethod
    def _parse_dataclass_field(parser, field):
        kinds = _kinds(field.type)  # read before HfArgumentParser strips the None
        HfArgumentParser._parse_dataclass_field(parser, field)
        action = next(action for action in parser._actions if action.dest == field.name)
        if dict in kinds:
            action.type = _mapping
        if type(None) in kinds:
            convert = action.type
            action.type = lambda text: None if text in NONE_WORDS else convert(text)
            action.choices = [*action.choices, None] if action.choices else None


def build_parser(preset: dict | None = None) -> OptionParser:
    parser = OptionParser(TrainConfig, description="Train or evaluate a MiraGe detector with Accelerate.")
    parser.add_argument(
        "--config",
        help=f"a shipped preset ({', '.join(preset_names())}) or a YAML/JSON file (default: demo; none with "
        "--eval_only, which then scores with the preprocessing stored in the model)",
    )
    parser.set_defaults(**(preset or {}))
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """`--config <preset or file>` sets the defaults; `--<option> <value>` overrides them."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    first.add_argument("--eval_only", nargs="?", const="true", default="false", type=string_to_bool)
    known = first.parse_known_args(argv)[0]
    preset = known.config or (None if known.eval_only else "demo")
    values = vars(build_parser(load_preset(preset) if preset else {}).parse_args(argv))
    values.pop("config")
    return TrainConfig(**values)
