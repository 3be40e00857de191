"""The optimizer side of an update: building the optimizer, schedule and grad scaler, and the guarded step.

The guard runs before the optimizer: a non-finite loss or gradient never reaches the weights, the optimizer moments,
the EMA or the LR schedule; ``optim.max_bad_steps`` such steps in a row stop the run.
"""

from __future__ import annotations

import logging
import math
import typing as tp
from pathlib import Path

import omegaconf
import torch
from audiocraft.solvers import builders

from solvers.errors import AudiogenError
from solvers.training import settings

logger = logging.getLogger(__name__)


class DivergenceError(AudiogenError, RuntimeError):
    """Too many non-finite steps in a row; the message names the last good checkpoint and the fix."""


def build_optimizer(model: torch.nn.Module, cfg: omegaconf.DictConfig) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters (audiocraft's parameter groups, frozen ones left out).

    ``optim.optimizer``: audiocraft's adam/adamw/dadam, or ``adamw8bit`` (bitsandbytes' 8-bit AdamW: its two moments
    take 2 bytes per parameter instead of 8; it runs on CPU and CUDA).

    Args:
        model: the LM.
        cfg: the ``optim`` block.
    """
    groups = []
    for group in builders.get_optim_parameter_groups(model):
        params = [p for p in group['params'] if p.requires_grad]
        if params:
            groups.append({**group, 'params': params})
    if cfg.optimizer == 'adamw8bit':
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            groups, lr=cfg.lr, betas=tuple(cfg.adam.betas), eps=cfg.adam.eps, weight_decay=cfg.adam.weight_decay
        )
    return builders.get_optimizer(tp.cast(tp.Any, groups), cfg)  # audiocraft accepts groups (annotated too narrowly)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: omegaconf.DictConfig, total_updates: int
) -> tp.Any | None:
    """audiocraft's LR schedule over the run's updates, after checking its warmup fits in the run.

    Args:
        optimizer: the optimizer it drives.
        schedule: the ``schedule`` block.
        total_updates: optimizer updates of the whole run.
    """
    settings.check_schedule(schedule, total_updates)
    return builders.get_lr_scheduler(optimizer, schedule, total_updates)


def build_scaler(autocast: bool, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """A grad scaler for fp16 autocast (bf16 and fp32 need none)."""
    if autocast and dtype is torch.float16:
        return torch.amp.GradScaler('cuda')
    return None


class NonFiniteGuard:
    """Counts consecutive non-finite steps and stops the run after ``max_bad_steps`` of them.

    Attributes:
        bad_steps: non-finite steps in a row so far (0 after a good step); checkpointed in ``position.bad_steps``.
    """

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = int(max_bad_steps)
        self.bad_steps = 0

    def finite(self, ce: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether this step may reach the optimizer (resets the count when it may)."""
        if torch.isfinite(grad_norm) and torch.isfinite(ce):
            self.bad_steps = 0
            return True
        return False

    def skip(self, ce: torch.Tensor, where: str, last_checkpoint: Path) -> None:
        """Record a skipped step; raise DivergenceError after ``max_bad_steps`` in a row.

        Args:
            ce: the step's loss (to say whether the loss or the gradient was non-finite).
            where: ``epoch E update U``, for the messages.
            last_checkpoint: what a re-run resumes from.
        """
        self.bad_steps += 1
        kind = 'loss' if not torch.isfinite(ce) else 'gradient'
        logger.warning('Non-finite %s at %s: step skipped (%d in a row).', kind, where, self.bad_steps)
        if self.bad_steps >= self.max_bad_steps:
            raise DivergenceError(
                f'Training diverged: {self.bad_steps} consecutive non-finite steps, the last at {where}. The last '
                f'good checkpoint is {last_checkpoint}. Lower optim.lr or optim.max_norm, or use '
                'autocast_dtype=bfloat16, then re-run the same command to resume from it.'
            )


def apply_update(
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    max_norm: float | None,
    scaler: torch.amp.GradScaler | None,
    lr_scheduler: tp.Any | None,
    guard: NonFiniteGuard,
    ce: torch.Tensor,
) -> dict[str, tp.Any]:
    """Clip, check and step once the micro-batches' gradients are accumulated; return the update's metrics.

    A non-finite loss or gradient skips the step (``skipped: 1``); the caller then calls :meth:`NonFiniteGuard.skip`.
    The gradients are zeroed either way.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    metrics: dict[str, tp.Any] = {}
    if not guard.finite(ce, grad_norm):
        if scaler is not None:
            scaler.update()  # an fp16 overflow: lower the scale and try again next step
        metrics['skipped'] = 1.0
    else:
        metrics.update(skipped=0.0, lr=optimizer.param_groups[0]['lr'])
        stepped = True
        if scaler is None:
            optimizer.step()
        else:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= scale  # the scaler lowers its scale when it skips a step
            metrics['grad_scale'] = scaler.get_scale()
        if stepped and lr_scheduler is not None:
            lr_scheduler.step()
        metrics['grad_norm'] = grad_norm
    optimizer.zero_grad(set_to_none=True)
    return metrics


def ema_due(epoch: int, idx: int, updates_per_epoch: int, every: int) -> bool:
    """Whether the EMA steps after update ``idx`` of ``epoch``: every ``every`` updates of the run, and at the end
    of an epoch that had none.

    Otherwise an epoch (or a whole run) shorter than the EMA period would validate, sample and export the EMA's
    untouched base weights; audiocraft's unbiased EMA takes the weights whole at its first step.
    """
    first = (epoch - 1) * updates_per_epoch
    none_this_epoch = (first + updates_per_epoch) // every == first // every
    return (first + idx + 1) % every == 0 or (idx + 1 == updates_per_epoch and none_this_epoch)


def check_ema_period(every: int, updates_per_epoch: int) -> None:
    """Warn when the EMA period is longer than an epoch: it then steps at each epoch's end (:func:`ema_due`)."""
    if updates_per_epoch and every > updates_per_epoch:
        logger.warning(
            'optim.ema.updates=%d is longer than an epoch (%d updates): the EMA is stepped at the end of each epoch '
            'instead.',
            every,
            updates_per_epoch,
        )
