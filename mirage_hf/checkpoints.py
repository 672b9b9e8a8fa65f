"""Training checkpoints that survive a kill at any moment.

A checkpoint is written by `Accelerator.save_state` into a hidden temporary folder, completed with
`progress.json` (where the run stands), then renamed into place: a folder named `step_XXXXXXXX` is therefore
always whole. Resuming tries the newest one and falls back to older ones when a file in it is unreadable.
"""

import json
import logging
import os
import shutil
from pathlib import Path

from .atomic import commit, staging_path

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
PREFIX = "step_"


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
        except Exception as error:  # a truncated or corrupt file in any of the state files
            logger.error("checkpoint %s is unreadable (%s: %s); trying an older one", path, type(error).__name__, error)
    if candidates:
        raise RuntimeError(f"no readable checkpoint among {[str(p) for p in candidates]}")
    return None
