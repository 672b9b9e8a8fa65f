"""Options of `train.py` (TrainConfig) and `mirage-eval` (EvalConfig): typed dataclass fields, defaults from a
YAML/JSON preset, then command-line overrides.

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
from typing import ClassVar, Literal

import torch
import yaml
from transformers import HfArgumentParser

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


ROBUSTNESS_HELP = (
    "Also evaluate under "
    + "; ".join(f"{kind} {', '.join(f'{value:g}' for value in values)}" for kind, values in ROBUSTNESS_SWEEP.items())
    + "."
)


@dataclass
class EvaluationOptions:
    """What an evaluation reads: the test data, where results go and how it runs. `mirage-train` evaluates as it
    trains and `mirage-eval` evaluates a saved model, both with these options."""

    DEFAULT_PRESET: ClassVar[str | None] = None  # the preset `--config` defaults to
    DESCRIPTION: ClassVar[str] = ""  # the command's --help

    # --- data --------------------------------------------------------------------------------------
    dataset: str = option(
        "synthetic",
        'Training data, and test data unless eval_dataset: "synthetic" (generated), "genimage:<root>", "ufd:<root>", '
        "a folder, a file or a Hub id.",
    )
    eval_dataset: str | None = option(None, "Test data (same forms); defaults to `dataset`.")
    eval_split: str = option("val", 'Split of the test data (default "val").')
    eval_subsets: list[str] | None = option(None, "Generators (subsets) to test on; None = all.")
    image_column: str = option("image", 'Column holding the image in a Hub or file data set (default "image").')
    label_column: str = option("label", 'Column holding the label, 0 real / 1 fake (default "label").')
    subset_column: str | None = option(None, "Column naming each image's generator (subset); None = one subset.")
    streaming: bool = option(False, "Stream a Hub data set instead of downloading it whole (default False).")
    max_eval_samples: int | None = option(None, "Test on at most this many images (None = all).")
    synthetic: dict = option(
        dict,
        "Options of the generated data set (generators, n_train_per_class, n_val_per_class, image_size).",
        factory=True,
    )
    eval_preprocess: Literal[PREPROCESS_MODES] | None = option(
        None,
        '"resize" (the CLIP processor\'s resize + centre crop) or "center_crop" (no resize: keeps artefacts). '
        "Training stores it in the model's config (default resize); mirage-eval defaults to the model's.",
    )

    # --- running -----------------------------------------------------------------------------------
    output_dir: str = option("outputs/demo", 'Folder for the results, model and checkpoints (default "outputs/demo").')
    seed: int = option(0, "Seed of the data order, augmentation, sampling and generated data (default 0).")
    eval_batch_size: int = option(64, "Images per forward pass when evaluating (default 64).")
    num_workers: int = option(2, "DataLoader worker processes decoding images; 0 = in the main process (default 2).")
    torch_threads: int | None = option(
        None,
        "CPU threads torch may use (None: torch's default, one per core). Tiny models run faster on one: the demo "
        "preset sets 1 (benchmarks/BENCHMARKS.md has the measurement).",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", '"no", "bf16" or "fp16" (Accelerate).')

    # --- evaluation --------------------------------------------------------------------------------
    robustness: bool = option(False, ROBUSTNESS_HELP)

    def __post_init__(self):
        for name, annotation in typing.get_type_hints(type(self)).items():
            if typing.get_origin(annotation) is ClassVar:
                continue
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

    def use_threads(self) -> None:
        """Applies `torch_threads` to this process."""
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)


@dataclass
class EvalConfig(EvaluationOptions):
    """`mirage-eval`: a trained model folder or Hub id, scored by a backend on the test data of EvaluationOptions."""

    DESCRIPTION: ClassVar[str] = (
        "Evaluate a trained MiraGe detector (a folder or Hub id) on a data set: prints the tables and writes "
        "<output_dir>/eval_results.json; exports nothing."
    )

    model: str | None = field(
        default=None, metadata={"help": "The trained MiraGe folder or Hub id to evaluate.", "required": True}
    )
    compile: bool = option(
        False, "Evaluate with the image encoder under torch.compile (opt-in; pays off on large sets)."
    )
    backend: Literal["torch", "onnx", "onnx-int8"] = option(
        "torch",
        '"torch", or ONNX Runtime on the graphs mirage-export-onnx wrote: "onnx" (fp32) or "onnx-int8" (quantized), '
        "to measure what the export costs in accuracy.",
    )

    def __post_init__(self):
        super().__post_init__()
        check_backend_options(self.backend, compile=self.compile)
        if not self.model:
            raise ValueError("mirage-eval needs --model <trained MiraGe folder or Hub id>")


@dataclass
class TrainConfig(EvaluationOptions, ModelOptions):
    """Everything `train.py` does, as typed options; the model's own come from MiraGeConfig through ModelOptions,
    the evaluation's from EvaluationOptions."""

    DEFAULT_PRESET: ClassVar[str | None] = "demo"
    DESCRIPTION: ClassVar[str] = "Train a MiraGe detector with Accelerate."

    clip_model: str = option(
        "tiny-random",
        'CLIP checkpoint (Hub id or folder); "tiny-pretrained": the tiny CLIP shipped in the package (demo); '
        '"tiny-random": a tiny random CLIP built locally (tests that need only shapes).',
    )
    lora_r: int = option(0, "LoRA rank on the CLIP projections of lora_projections (0 = prompts only, the paper's).")
    lora_alpha: int = option(16, "LoRA scaling numerator: updates are scaled by lora_alpha / lora_r (default 16).")
    lora_towers: list[str] = option(
        lambda: ["vision"], 'CLIP towers that get LoRA: "vision" and/or "text" (default vision).', factory=True
    )
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
    train_split: str = option("train", 'Split of the training data (default "train").')
    train_subsets: list[str] | None = option(
        None, 'Generators (subsets) to train on; None = all. GenImage protocol: ["stable_diffusion_v_1_4"].'
    )
    max_train_samples: int | None = option(None, "Train on at most this many images (None = all).")
    flip_prob: float = option(0.5, "Probability of a horizontal flip of a training image (default 0.5).")
    resize_prob: float = option(0.1, "Probability of a down-then-up resize of a training image (default 0.1).")
    blur_prob: float = option(0.1, "Probability of a Gaussian blur of a training image (default 0.1).")
    jpeg_prob: float = option(0.1, "Probability of a JPEG re-compression of a training image (default 0.1).")

    # --- optimisation ------------------------------------------------------------------------------
    num_epochs: int = option(1, "Passes over the training data, unless max_steps is set (default 1).")
    max_steps: int | None = option(None, "Optimiser steps to train for; None = num_epochs (needed when streaming).")
    batch_size: int = option(32, "Training images per batch and process (default 32).")
    gradient_accumulation_steps: int = option(1, "Batches accumulated per optimiser step (default 1).")
    learning_rate: float = option(2e-3, "Peak AdamW learning rate, after warm-up, before cosine decay (default 2e-3).")
    weight_decay: float = option(0.0, "AdamW weight decay (default 0).")
    warmup_ratio: float = option(0.05, "Fraction of the steps the learning rate warms up over (default 0.05).")
    max_grad_norm: float = option(1.0, "Clip the gradients' global norm to this; 0 = no clipping (default 1).")
    gradient_checkpointing: bool = option(
        False, "Recompute CLIP's activations in the backward pass: less memory, more time (default False)."
    )
    eval_every: int = option(
        0, "Evaluate (and export the model if it is the best so far) every N optimiser steps; 0 = each epoch end."
    )
    save_every: int = option(0, "Checkpoint every N optimiser steps (for resume); 0 = each epoch end.")
    checkpoints_total_limit: int = option(
        2, "Checkpoints kept in <output_dir>/checkpoints, the oldest removed (default 2)."
    )
    resume_from_checkpoint: str | None = option(
        None, 'A checkpoint folder, or "latest" (the newest complete one in <output_dir>/checkpoints).'
    )
    log_with: list[str] = option(list, "Accelerate trackers: tensorboard, wandb, ...", factory=True)
    log_every: int = option(
        10, "Log the loss terms, averaged over the last N optimiser steps (each log waits once for the GPU)."
    )

    # --- calibration -------------------------------------------------------------------------------
    calibrate: Literal[METHODS] | None = option(
        "balanced_accuracy",
        'After training, choose the threshold on held-out data: "balanced_accuracy", "target_fpr" or None.',
    )
    target_fpr: float = option(0.05, 'With calibrate "target_fpr": the false-positive rate to hold (default 0.05).')
    calibration_holdout: float = option(
        0.1, "Fraction of the training data held out (never trained on) for calibration."
    )

    def __post_init__(self):
        super().__post_init__()
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


def build_parser(preset: dict | None = None, config_class=TrainConfig) -> OptionParser:
    """The command line of `config_class` (TrainConfig: mirage-train, EvalConfig: mirage-eval)."""
    parser = OptionParser(config_class, description=config_class.DESCRIPTION)
    default = config_class.DEFAULT_PRESET or "none: the preprocessing stored in the model"
    parser.add_argument(
        "--config",
        help=f"a shipped preset ({', '.join(preset_names())}) or a YAML/JSON file (default: {default})",
    )
    parser.set_defaults(**(preset or {}))
    return parser


def parse_args(argv: list[str] | None = None, config_class=TrainConfig):
    """`--config <preset or file>` sets the defaults; `--<option> <value>` overrides them. A preset holds training
    options too: `config_class` takes the ones it has."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    preset = first.parse_known_args(argv)[0].config or config_class.DEFAULT_PRESET
    names = {f.name for f in dataclasses.fields(config_class)}
    defaults = {name: value for name, value in load_preset(preset).items() if name in names} if preset else {}
    values = vars(build_parser(defaults, config_class).parse_args(argv))
    values.pop("config")
    return config_class(**values)
