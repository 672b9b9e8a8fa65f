"""The package's one optimisation loop. It trains a *task* (a model, the parameters that train, a loss) with
Accelerate: device, mixed precision, DDP, gradient accumulation, clipping, the warm-up + cosine schedule,
checkpoints that resume exactly, and the progress bar with the loss terms.

Detection (`training`), adaptation (`adaptation`) and the tiny CLIP's pretraining (`demo.pretrain_tiny_clip`) are
tasks of it; each keeps its own data and its own reports (given to `Engine.train` as `after_step`).
"""

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import get_cosine_schedule_with_warmup

from .checkpoints import keep_frozen_base_out_of_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from .progress import logger, progress_bar


@dataclass
class Task:
    """What the engine trains. `loss(model, batch)` gets the prepared model (DDP-wrapped where there are several
    processes) and returns a mapping whose "loss" is minimised (the others are named terms, reported), or None
    for a batch with nothing to learn from (all its images unreadable)."""

    model: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    loss: Callable[[torch.nn.Module, object], Mapping | None]


@dataclass
class Optimisation:
    """AdamW over the task's parameters, a linear warm-up then a cosine decay over `total_steps` optimiser steps,
    and gradient clipping to `max_grad_norm` (0: none)."""

    learning_rate: float
    total_steps: int
    warmup_steps: int
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0


@dataclass
class TrainState:
    """Where a run stands: saved as each checkpoint's progress.json, so a resumed run continues mid-epoch."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained on
    best_score: float | None = None  # the score of the model kept as best (detection's evaluation)


@dataclass
class Checkpointing:
    """Where checkpoints go and when: every `every` optimiser steps (0: at each epoch's end) and at the last step.

    `process_state` names what each process draws its batches from and records (a row stream, an augmentation's
    random draws, a loss log), each with `state_dict` / `load_state_dict` (JSON-able); it is saved per process in
    progress.json, so a resume continues the same draws. Empty where the batches are a pure function of the state
    (detection's seeded epochs)."""

    output_dir: str
    every: int = 0
    total_limit: int = 0
    resume_from: str | None = None
    process_state: dict = dataclasses.field(default_factory=dict)
    frozen_base: dict | None = None
    """`checkpoints.frozen_base_fingerprint` of the frozen backbone: its weights stay out of the checkpoints, and a
    resume checks that it is the same."""


def make_accelerator(cpu: bool = False, **options) -> Accelerator:
    """An Accelerator that joins the processes of `accelerate launch --multi_gpu` (torchrun) on a machine without
    GPUs too, through gloo: accelerate would otherwise run each of them alone, on all the data."""
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu or (several_processes and not torch.cuda.is_available()), **options)


def due(step: int, every: int, epoch_done: bool) -> bool:
    """Whether a periodic action (evaluation, checkpoint) runs now: every N steps, or at epoch ends for N = 0."""
    return step % every == 0 if every else epoch_done


class LossWindow:
    """Sums of the loss terms over the optimiser steps since the last log, kept on the device.

    Reading a loss (`.item()`) waits for the GPU to finish; doing it once per log instead of once per step lets
    the next steps be queued while the current one runs.
    """

    def __init__(self):
        self.sums, self.steps = {}, 0

    def add(self, output):
        for name, value in output.items():
            if name.startswith("loss") and value is not None and value.ndim == 0:
                self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.steps += 1

    def pop_means(self) -> dict[str, float]:
        means = (torch.stack(list(self.sums.values())) / self.steps).tolist()  # the one device sync
        terms = dict(zip(self.sums, means, strict=True))
        self.sums, self.steps = {}, 0
        return terms


class TrainingLog:
    """What a run reports as it goes: the progress bar, and the loss means every `log_every` steps (to the
    accelerator's trackers and the bar)."""

    def __init__(self, accelerator, log_every: int, total_steps: int, state: TrainState, desc: str, quiet=False):
        self.accelerator, self.log_every, self.losses = accelerator, log_every, LossWindow()
        disable = quiet or not accelerator.is_local_main_process
        self.bar = progress_bar(total=total_steps, initial=state.global_step, desc=desc, disable=disable)

    def step(self, output, step: int, lr: float, last: bool):
        """After an optimiser step: `output` is None for a batch of unreadable files only."""
        self.bar.update(1)
        if output is not None:
            self.losses.add(output)
        if self.losses.steps and (last or step % self.log_every == 0):
            terms = self.losses.pop_means()
            self.accelerator.log({f"train/{k}": v for k, v in terms.items()} | {"train/lr": lr}, step=step)
            postfix = {k.removeprefix("loss_") or "loss": f"{v:.3f}" for k, v in terms.items()}
            self.bar.set_postfix(postfix, refresh=False)  # shown at the bar's next redraw, not as a line of its own

    def close(self):
        self.bar.close()


def nothing_to_learn(parameters) -> torch.Tensor:
    """A zero loss touching every trained parameter, so DDP stays in step when a batch was all bad files."""
    return sum(p.sum() for p in parameters) * 0.0


class Engine:
    """A task prepared by Accelerate with its optimiser and schedule; `train` runs the loop."""

    def __init__(self, accelerator, task: Task, optimisation: Optimisation, checkpointing: Checkpointing | None = None):
        optimizer = torch.optim.AdamW(
            task.parameters, lr=optimisation.learning_rate, betas=optimisation.betas, eps=optimisation.eps,
            weight_decay=optimisation.weight_decay,
        )  # fmt: skip
        # Accelerate's prepared scheduler steps once per process at each optimiser step (unless batches are split
        # over the processes): it is built for them all, so the warm-up and decay span the run on any number.
        processes = 1 if accelerator.split_batches else accelerator.num_processes
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, optimisation.warmup_steps * processes, optimisation.total_steps * processes
        )
        self.model, self.optimizer, self.scheduler = accelerator.prepare(task.model, optimizer, scheduler)
        self.accelerator, self.task, self.max_grad_norm = accelerator, task, optimisation.max_grad_norm
        self.total_steps, self.checkpointing = optimisation.total_steps, checkpointing
        if checkpointing is not None and checkpointing.frozen_base is not None:
            keep_frozen_base_out_of_checkpoints(accelerator, checkpointing.frozen_base)

    def step(self, batch) -> Mapping | None:
        """One micro-batch: the loss under autocast, backward, and at an accumulation boundary clipping, the
        optimiser and the schedule. Returns the task's loss output."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            with accelerator.autocast():
                output = self.task.loss(self.model, batch)
            accelerator.backward(nothing_to_learn(self.task.parameters) if output is None else output["loss"])
            if accelerator.sync_gradients and self.max_grad_norm:
                accelerator.clip_grad_norm_(self.task.parameters, self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return output

    def resume(self) -> TrainState:
        """The state of the checkpoint named by `checkpointing.resume_from` (loaded into the model, optimiser,
        schedule, RNGs and this process's batches), or a fresh one."""
        checkpointing = self.checkpointing
        if checkpointing is None:
            return TrainState()
        progress = load_checkpoint(
            self.accelerator, resolve_resume(checkpointing.output_dir, checkpointing.resume_from)
        )
        if progress is None:
            return TrainState()
        process_states = progress.pop("process_states", None)
        if checkpointing.process_state:
            if len(process_states or ()) != self.accelerator.num_processes:
                raise ValueError(
                    f"the checkpoint was written by {len(process_states or ())} process(es); resume it with as many "
                    f"(this run has {self.accelerator.num_processes})"
                )
            for name, part in checkpointing.process_state.items():
                part.load_state_dict(process_states[self.accelerator.process_index][name])
        state = TrainState(**progress)
        logger.info("resumed from step %d (epoch %d, batch %d)", state.global_step, state.epoch, state.batches_in_epoch)
        return state

    def save(self, state: TrainState) -> None:
        checkpointing = self.checkpointing
        progress = dataclasses.asdict(state)
        if checkpointing.process_state:
            mine = {name: part.state_dict() for name, part in checkpointing.process_state.items()}
            progress["process_states"] = gather_object([mine])
        save_checkpoint(self.accelerator, checkpointing.output_dir, progress, checkpointing.total_limit)

    def train(
        self,
        batches_from: Callable[[TrainState], Iterable],
        state: TrainState,
        log: TrainingLog,
        after_step: Callable[[Mapping | None, TrainState, bool, bool], None] | None = None,
    ) -> TrainState:
        """Trains until the optimisation's `total_steps`. `batches_from(state)` gives the batches from where
        `state` stands (an epoch's loader, or an endless stream); after each optimiser step the log is told,
        `after_step(output, state, last, epoch_done)` runs (the task's evaluations and reports), then a checkpoint
        is saved when due."""
        self.model.train()
        while state.global_step < self.total_steps:
            batches = batches_from(state)
            try:
                epoch_length = len(batches)
            except TypeError:  # a stream: its epoch ends when it runs out
                epoch_length = None
            for batch in batches:
                output = self.step(batch)
                state.batches_in_epoch += 1
                if not self.accelerator.sync_gradients:
                    continue
                state.global_step += 1
                last, epoch_done = state.global_step >= self.total_steps, state.batches_in_epoch == epoch_length
                log.step(output, state.global_step, self.scheduler.get_last_lr()[0], last=last)
                if epoch_done:
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if after_step is not None:
                    after_step(output, state, last, epoch_done)
                checkpointing = self.checkpointing
                if checkpointing is not None and (last or due(state.global_step, checkpointing.every, epoch_done)):
                    self.save(state)
                if last or epoch_done:
                    break
            else:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        log.close()
        return state
