"""Training checkpoints that survive a kill at any moment, and hold only what trains.

A checkpoint is written by `Accelerator.save_state` into a hidden temporary folder, completed with
`progress.json` (where the run stands), then renamed into place: a folder named `step_XXXXXXXX` is therefore
always whole. Resuming tries the newest one and falls back to older ones when a file in it is unreadable.

The frozen CLIP is not copied into checkpoints (1.7 GB per checkpoint at ViT-L/14): they hold the trained
weights (prompts, couplings, head, LoRA) and buffers (the memory bank), the optimizer, scheduler and RNG
states, and a fingerprint of the CLIP they were trained on. Resuming rebuilds the model from `clip_model`, checks
the fingerprint, and loads the rest.
"""

import json
import logging
import os
import shutil
from pathlib import Path

from accelerate.utils import SAFE_WEIGHTS_NAME
from safetensors.torch import load_file
from transformers.utils import cached_file

from .atomic import commit, staging_path
from .file_hashes import sha256_of_files
from .parameters import trainable_parameters

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
PREFIX = "step_"
FROZEN_BASE_FILE = "frozen_base.json"


class FrozenBaseMismatch(ValueError):
    """The checkpoint was trained on another CLIP than the one the resumed run was built on."""


def frozen_base_fingerprint(clip_name_or_path: str) -> dict:
    """sha256 over the CLIP checkpoint's config and weight files (local folder or Hub cache).

    Weights are hashed as stored: safetensors files if the checkpoint has any, else its PyTorch files.
    """
    folder = Path(cached_file(clip_name_or_path, "config.json")).parent
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return {"clip_model": str(clip_name_or_path), "sha256": sha256_of_files([folder / "config.json", *weights])}


def _frozen_parameters(model) -> set[str]:
    return {name for name, _ in model.named_parameters()} - trainable_parameters(model).keys()


def keep_frozen_base_out_of_checkpoints(accelerator, fingerprint: dict):
    """Makes `save_state` skip the frozen parameters and `load_state` check the base and load the rest.

    Call once after `accelerator.prepare`; the model the run builds supplies the frozen part on resume.
    """

    def drop_frozen(models, weights, output_dir):
        for index, model in enumerate(models):
            frozen = _frozen_parameters(model)
            weights[index] = {key: value for key, value in weights[index].items() if key not in frozen}
        if accelerator.is_main_process:
            (Path(output_dir) / FROZEN_BASE_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")

    def load_trained(models, input_dir):
        saved = json.loads((Path(input_dir) / FROZEN_BASE_FILE).read_text())
        if saved["sha256"] != fingerprint["sha256"]:
            raise FrozenBaseMismatch(
                f"checkpoint {input_dir} was trained on the CLIP {saved['clip_model']!r} (sha256 "
                f"{saved['sha256'][:12]}...), but this run is built on {fingerprint['clip_model']!r} (sha256 "
                f"{fingerprint['sha256'][:12]}...); resume with --clip_model pointing at the original checkpoint"
            )
        for index, model in enumerate(models):
            name = SAFE_WEIGHTS_NAME if index == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{index}.")
            missing, unexpected = model.load_state_dict(load_file(Path(input_dir) / name), strict=False)
            not_restored = set(missing) - _frozen_parameters(model)
            if unexpected or not_restored:
                raise ValueError(
                    f"checkpoint {input_dir} does not fit the model: unexpected {sorted(unexpected)[:5]}, "
                    f"missing {sorted(not_restored)[:5]}"
                )
        models.clear()  # loaded here; Accelerate goes on with the optimizer, scheduler and RNG states

    accelerator.register_save_state_pre_hook(drop_frozen)
    accelerator.register_load_state_pre_hook(load_trained)


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / PROGRESS_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(accelerator, output_dir, progress: dict, total_limit: int) -> Path | None:
    """Saves the full training state atomically; keeps the newest `total_limit` checkpoints."""
    root = checkpoint_dir(output_dir)
    final = root / f"{PREFIX}{progress['global_step']:08d}"
    staging = staging_path(final)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (staging / PROGRESS_FILE).write_text(json.dumps(progress, indent=2))
        commit(staging, final)
        for old in complete_checkpoints(output_dir)[:-total_limit] if total_limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir, resume_from: str | None) -> list[Path]:
    """Checkpoints to try, best first: the named one, or for "latest" every complete one, newest first."""
    if not resume_from:
        return []
    if resume_from == "latest":
        candidates = complete_checkpoints(output_dir)[::-1]
        if not candidates:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch", output_dir)
        return candidates
    path = Path(resume_from)
    if not (path / PROGRESS_FILE).is_file():
        raise ValueError(
            f"{resume_from!r} is not a complete checkpoint (no {PROGRESS_FILE}); use 'latest' or a step_* folder"
        )
    return [path]


def load_checkpoint(accelerator, candidates: list[Path]) -> dict | None:
    """Loads the first checkpoint that reads cleanly and returns its progress; reports the broken ones."""
    for path in candidates:
        try:
            accelerator.load_state(str(path))
            return json.loads((path / PROGRESS_FILE).read_text())
        except FrozenBaseMismatch:  # holds for every checkpoint of the run: no point in trying older ones
            raise
        except Exception as error:  # a truncated or corrupt file in any of the state files
            logger.error("checkpoint %s is unreadable (%s: %s); trying an older one", path, type(error).__name__, error)
    if candidates:
        raise RuntimeError(f"no readable checkpoint among {[str(p) for p in candidates]}")
    return None
