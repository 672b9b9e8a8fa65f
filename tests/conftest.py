"""Tiny CLIP checkpoints built in the tests: no Hub access, a few milliseconds per forward."""

import contextlib
import gzip
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import mirage_hf
from mirage_hf import from_clip
from mirage_hf.demo.tiny import save_tiny_clip, tiny_clip_config  # noqa: F401  (re-exported for the tests)

IMAGE_SIZE = 30
DATA_DIR = Path(__file__).resolve().parent / "data"

# A few-second train.py run: tiny random CLIP (shapes only), tiny generated data, LoRA so that something learns.
TINY_TRAIN_ARGS = [
    "--clip_model", "tiny-random",
    "--tiny_clip", "{image_size: 16, patch_size: 4, hidden_size: 32, num_layers: 2, projection_dim: 16}",
    "--synthetic", "{generators: [upsampler, diffusion], n_train_per_class: 24, n_val_per_class: 8, image_size: 16}",
    "--prompt_depth", "2", "--batch_size", "8", "--eval_batch_size", "16", "--num_workers", "0",
    "--memory_bank_size", "32", "--lora_r", "4", "--learning_rate", "0.01",
]  # fmt: skip
TINY_EVAL_ARGS = [
    arg for option in zip(TINY_TRAIN_ARGS[::2], TINY_TRAIN_ARGS[1::2], strict=True)
    if option[0] in ("--synthetic", "--eval_batch_size", "--num_workers") for arg in option
]  # fmt: skip
"""The options of TINY_TRAIN_ARGS that mirage-eval takes: the same generated data, scored the same way."""


def reset_accelerator_state():
    """Accelerate keeps one state per process; each in-process training run configures its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    reset_accelerator_state()


@pytest.fixture(autouse=True, scope="module")
def fresh_accelerator_state_for_module_fixtures():
    """Module fixtures that train (test_adapt's `adapted`) start before the first test's reset."""
    reset_accelerator_state()


class LoadReports(logging.Handler):
    """Collects the load reports transformers logs (the tables of MISSING / UNEXPECTED weights)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.reports = []

    def emit(self, record):
        if "LOAD REPORT" in record.getMessage():
            self.reports.append(record.getMessage())


@pytest.fixture(autouse=True)
def load_reports(request):
    """No `from_clip` or `from_pretrained` in any test may log a MISSING table, except in a test marked
    `missing_weights_expected` (a checkpoint that really lacks weights). Yields the reports to assert on."""
    handler = LoadReports()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.reports
    logger.removeHandler(handler)
    missing = [report for report in handler.reports if "MISSING" in report]
    if missing and request.node.get_closest_marker("missing_weights_expected") is None:
        pytest.fail(f"a load report calls weights missing:\n{missing[0]}")


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A saved random CLIP with its tokenizer and image processor: what `from_clip` reads from the Hub."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), image_size=IMAGE_SIZE)


def openai_clip_tokenizer():
    """OpenAI's CLIP tokenizer, built from its BPE merges (tests/data) as HF's vocab.json / merges.txt are:
    the 256 byte characters, the same with `</w>`, one token per merge, then the two special tokens."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(DATA_DIR / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # as OpenAI's tokenizer reads it
    byte_chars = list(bytes_to_unicode().values())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=merges)


@pytest.fixture(scope="session")
def openai_vocab_clip_dir(tmp_path_factory):
    """A tiny random CLIP laid out like `openai/clip-vit-large-patch14`: OpenAI's 49,408-token vocabulary and the
    placeholder special ids (bos 0, eos 2) its config.json holds."""
    from transformers import CLIPModel

    from mirage_hf.demo.tiny import tiny_image_processor

    path = tmp_path_factory.mktemp("openai-vocab-clip")
    tokenizer = openai_clip_tokenizer()
    config = tiny_clip_config(image_size=IMAGE_SIZE)
    config.text_config.vocab_size = len(tokenizer)
    config.text_config.bos_token_id, config.text_config.eos_token_id, config.text_config.pad_token_id = 0, 2, 1
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    tiny_image_processor(IMAGE_SIZE).save_pretrained(path)
    return str(path)


@pytest.fixture
def make_model(clip_dir):
    """Builds a detector on the tiny CLIP; prompt depth 2 of 3 layers unless overridden."""

    def build(mode="mirage", cls=mirage_hf.MiraGeForImageClassification, **overrides):
        torch.manual_seed(0)
        overrides.setdefault("prompt_depth", 2)
        return from_clip(cls, clip_dir, mode=mode, **overrides)

    return build


@pytest.fixture(scope="session")
def detector_dir(clip_dir, tmp_path_factory):
    """A saved detector folder (weights, config, remote code, image processor) whose scores are not all 0.5:
    its fake anchor is moved away from the real one (the word "fake" gets a random embedding); calibrated threshold
    0.3, temperature 1. The seed is one whose scores spread on both sides of the tests' thresholds (over 0.25 on the
    bf16 test's images, mid-range on the Space's example); a change to the tiny CLIP's random draws can move them,
    so the tests that need a spread assert it first."""
    from transformers import AutoTokenizer
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from mirage_hf.model_folder import export_model

    torch.manual_seed(0)
    model = mirage_hf.from_clip(mirage_hf.MiraGeForImageClassification, clip_dir, mode="mirage", prompt_depth=2)
    fake = AutoTokenizer.from_pretrained(clip_dir).convert_tokens_to_ids("fake</w>")
    torch.manual_seed(4)
    with torch.no_grad():
        model.prompt_learner.text_prompts[1].normal_(std=0.5)
        model.clip.text_model.embeddings.token_embedding.weight[fake].normal_(std=0.5)
    model.config.decision_threshold, model.config.calibration_temperature = 0.3, 1.0
    model.config._name_or_path = "tiny-random-mirage"
    return export_model(model, AutoImageProcessor.from_pretrained(clip_dir), tmp_path_factory.mktemp("run") / "model")


class Killed(Exception):
    """Stands for a SIGKILL that lands right after a checkpoint was written."""


@contextlib.contextmanager
def killed_after_checkpoint(monkeypatch, step: int | None = None):
    """The run inside stops (`Killed`) once the engine has saved the checkpoint of `step` (None: the first)."""
    import mirage_hf.engine as engine

    real_save = engine.save_checkpoint

    def save_then_die(accelerator, output_dir, progress, total_limit):
        real_save(accelerator, output_dir, progress, total_limit)
        if step is None or progress["global_step"] == step:
            raise Killed

    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(Killed):
            yield
    finally:
        monkeypatch.setattr(engine, "save_checkpoint", real_save)


def random_images(root: Path, count: int, size: tuple[int, int], seed: int, name: str = "{:03d}.png") -> Path:
    """`count` distinct noise images of `size` (height, width) in `root`, named `name.format(index)`."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name.format(index))
    return root


def scaled_p_fake(model_dir, images) -> np.ndarray:
    """The temperature-scaled probability sigmoid(logit_diff / T) of `images` under the detector in `model_dir`: the
    scale its calibrated threshold lives on (the reported p(fake) has the threshold folded in)."""
    from mirage_hf.inference import Detector

    detector = Detector.from_pretrained(model_dir, device="cpu")
    logit_diff = detector.scorer(detector.preprocess(images))["logit_diff"].astype(np.float64)
    return 1.0 / (1.0 + np.exp(-logit_diff / detector.scorer.config.calibration_temperature))


def with_threshold(model_dir, folder, threshold: float) -> Path:
    """A copy of the detector folder `model_dir` at `folder`, its calibrated threshold set to `threshold` (placed
    between a test's scores, so that its decisions fall on both sides)."""
    import json
    import shutil

    folder = Path(shutil.copytree(model_dir, folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "decision_threshold": threshold}))
    return folder


@pytest.fixture
def pixel_values():
    return torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
