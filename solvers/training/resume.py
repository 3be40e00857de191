"""Which checkpoint a run resumes from, what it must hold, what an epoch writes, and where a new XP starts.

The resume policy: the newest loadable of the step, last and epoch checkpoints of the XP folder (a corrupt one is
skipped with a warning, never silently ignored; a step checkpoint older than the last epoch is skipped), and every
registered part of the state must be in it unless ``checkpoint.reset`` names it. Every file is read through
:func:`solvers.models.checkpoint_io.safe_load` and written through :mod:`solvers.atomic`.
"""

from __future__ import annotations

import dataclasses
import logging
import typing as tp
from pathlib import Path

import omegaconf

from solvers import atomic
from solvers.models import adapters, checkpoint_io, package
from solvers.training import checkpoints as ckpt

logger = logging.getLogger(__name__)

# Parts a checkpoint may lack: `position` is absent from checkpoints written before it was registered (they hold
# whole epochs); the config and signature are informative; the FSDP best state exists only under FSDP.
OPTIONAL_PARTS = ('xp.cfg', 'xp.sig', 'fsdp_best_state', 'position')
BEST_PARTS = ('best_state', 'xp.cfg', 'xp.sig', 'history', 'adapter_layout')


@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
    """The checkpoint files of an XP folder, named as audiocraft names them (without FSDP)."""

    folder: Path

    @property
    def last(self) -> Path:
        return self.folder / 'checkpoint.th'

    @property
    def best(self) -> Path:
        return self.folder / 'checkpoint_best.th'

    @property
    def step(self) -> Path:
        return self.folder / 'checkpoint_step.th'

    def epoch(self, epoch: int) -> Path:
        return self.folder / f'checkpoint_{epoch}.th'

    def epochs(self) -> list[Path]:
        """The epoch checkpoints, oldest first."""
        return sorted(self.folder.glob('checkpoint_[0-9]*.th'), key=lambda p: int(p.stem.split('_')[1]))

    def candidates(self) -> list[Path]:
        """Checkpoints to resume from, newest position first: step, last, then epoch checkpoints by epoch."""
        return [p for p in (self.step, self.last) if p.exists()] + self.epochs()[::-1]


def clean_stale(folder: Path) -> None:
    """Remove the temporary files an interrupted save left, and say so."""
    stale = ckpt.clean_stale_tmp(folder)
    if stale:
        logger.warning(
            'Removed %d temporary file(s) left by an interrupted save: %s', len(stale), ', '.join(p.name for p in stale)
        )


def load_resume_state(files: CheckpointFiles, parts: tp.Iterable[str], reset: tp.Sequence[str], ema: bool) -> dict:
    """The state to resume from: the newest loadable candidate, checked complete, the ``reset`` parts dropped.

    Args:
        files: the XP's checkpoint files (there must be at least one candidate).
        parts: the solver's registered stateful parts.
        reset: ``checkpoint.reset``.
        ema: whether the run has an EMA (then ``ema`` is required).
    Raises:
        CheckpointError: no candidate is loadable (each one's reason listed), or the chosen one lacks a part.
    """
    candidates, errors = files.candidates(), []
    for path in candidates:
        try:
            state = checkpoint_io.safe_load(path)
        except checkpoint_io.CheckpointError as err:
            errors.append(str(err))
            logger.warning('%s Trying an older checkpoint.', err)
            continue
        if path == files.step and len(state['history']) < last_epoch_on_disk(candidates, files.step):
            continue  # a step checkpoint older than the last epoch checkpoint
        if errors:
            logger.warning(
                'Resuming from %s (epoch %d) instead of the unreadable checkpoint(s) above.',
                path,
                len(state['history']) + 1,
            )
        check_complete(state, path, parts, reset, ema)
        for key in reset:
            state.pop(key, None)
        update = (state.get('position') or {}).get('update', 0)
        if update:
            logger.info('Resuming epoch %d at update %d from %s', len(state['history']) + 1, update, path)
        else:
            logger.info('Loading existing checkpoint: %s', path)
        return state
    raise checkpoint_io.CheckpointError(
        f'No loadable checkpoint in {files.folder}:\n  '
        + '\n  '.join(errors)
        + '\nRestore a checkpoint from a backup, or move these files away to restart this XP from scratch.'
    )


def last_epoch_on_disk(candidates: tp.Sequence[Path], step: Path) -> int:
    """Epochs completed according to the last/epoch checkpoints' history (0 when none is readable)."""
    for path in candidates:
        if path != step:
            try:
                return len(checkpoint_io.safe_load(path, mmap=True)['history'])  # mapped: only the history is read
            except checkpoint_io.CheckpointError:
                continue
    return 0


def check_complete(state: dict, path: Path, parts: tp.Iterable[str], reset: tp.Sequence[str], ema: bool) -> None:
    """Every stateful part must be in the checkpoint, unless `checkpoint.reset` restarts it on purpose.

    Raises:
        ValueError: ``reset`` names a part the solver doesn't have.
        CheckpointError: a part is missing, with the ``checkpoint.reset`` that would restart it.
    """
    parts, restarted = set(parts), set(reset)
    unknown = restarted - parts
    if unknown:
        raise ValueError(f'checkpoint.reset names unknown parts {sorted(unknown)}; choose among {sorted(parts)}.')
    required = {name for name in parts if name not in OPTIONAL_PARTS}
    if not ema:
        required.discard('ema')
    missing = sorted(required - set(state) - restarted)
    if missing:
        raise checkpoint_io.CheckpointError(
            f'Checkpoint {path} lacks {", ".join(missing)}: resuming would silently restart them. To restart '
            f'them on purpose, add checkpoint.reset=[{",".join(missing)}] to the command.'
        )


def write_epoch(state: dict, files: CheckpointFiles, epoch: int, cfg: omegaconf.DictConfig, new_best: bool) -> None:
    """An epoch's files: ``checkpoint_<epoch>.th`` every ``save_every`` epochs (keeping ``keep_last``), the best
    state on a new best, the last checkpoint; then the epoch's step checkpoint goes.

    Args:
        state: the solver's state dict.
        files: the XP's checkpoint files.
        epoch: the epoch just completed.
        cfg: the ``checkpoint`` block.
        new_best: whether this epoch holds a new best state.
    """
    if cfg.save_every and epoch % cfg.save_every == 0:
        atomic.save_torch(state, files.epoch(epoch))
        if cfg.keep_last is not None and cfg.keep_last >= 0:
            epochs = files.epochs()
            for old in epochs[: max(0, len(epochs) - cfg.keep_last)]:
                atomic.remove(old)
    if new_best:
        atomic.save_torch({key: state[key] for key in BEST_PARTS if key in state}, files.best)
    if cfg.save_last:
        atomic.save_torch(state, files.last)
    atomic.remove(files.step)


def explain_disk_full(err: BaseException, files: CheckpointFiles, epoch: int) -> checkpoint_io.CheckpointError | None:
    """The one-line error for a save that failed on a full disk (None when the disk is not full)."""
    if not ckpt.is_disk_full(err, files.folder):
        return None
    return checkpoint_io.CheckpointError(
        f'The disk holding {files.folder} is full: saving epoch {epoch} failed ({ckpt.first_line(err)}). '
        f'{ckpt.describe_kept(files.folder)} Free some space (a checkpoint of this XP takes about '
        f'{ckpt.size_text(files.last)}), then re-run the same command: it resumes from there.'
    )


def plain_dicts(obj: tp.Any) -> tp.Any:
    """Copy nested dicts as plain dicts: the EMA keeps a defaultdict, which weights_only unpickling refuses."""
    if isinstance(obj, dict):
        return {key: plain_dicts(value) for key, value in obj.items()}
    return obj


def checkpoint_start(path: Path, lora: bool, continue_from: str) -> dict:
    """A new XP's initial weights from another XP's checkpoint: its best state (``continue_from=//sig/...``).

    Args:
        path: the checkpoint file.
        lora: whether this run trains LoRA adapters.
        continue_from: the user's ``continue_from``, for the message.
    Raises:
        AdapterError: a LoRA checkpoint for a full fine-tune, or the other way round.
    """
    state = checkpoint_io.safe_load(path)
    best = {key: state[key] for key in ('best_state', 'fsdp_best_state') if key in state}
    holds_lora = any('.lora_' in key for key in (best.get('best_state') or {}).get('model', {}))
    if holds_lora != lora:
        raise adapters.AdapterError(
            f'continue_from={continue_from}: that checkpoint holds '
            f'{"a full fine-tune" if lora else "LoRA adapters"}, but this run is '
            f'{"a LoRA run" if lora else "a full fine-tune"}. Export it (python -m '
            'scripts.export <sig> DIR --merge) and start from the export with pretrained=DIR instead.'
        )
    return best


def package_start(name: str, base: str, adapter: tp.Any, package_state: tp.Callable[[], dict]) -> dict:
    """A new XP's initial weights from a package: the LM weights, or for a LoRA run the fresh adapters.

    Args:
        name: the package the run starts from.
        base: ``pretrained``, the package the run was built on.
        adapter: the LoRA adapters' state module, or None for a full fine-tune.
        package_state: returns ``base``'s LM weights (read once, when the run was built).
    Raises:
        AdapterError: a LoRA run asked to start from another package than its base.
    """
    if adapter is not None:
        if name != base:
            raise adapters.AdapterError(
                f'continue_from={name}: a LoRA run takes its base from `pretrained` ({base}); to put '
                f'adapters over another package, pass pretrained={name} instead.'
            )
        return {'best_state': {'model': {k: v.clone() for k, v in adapter.state_dict().items()}}}
    if name == base:
        return {'best_state': {'model': package_state()}}
    from solvers import project

    return {'best_state': {'model': package.lm_state(package.resolve(name, base_dir=project.resolve_path('.')))}}


class DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def save_step(state: dict, files: CheckpointFiles) -> None:
    """A mid-epoch checkpoint: the full state, ``position`` included (where the epoch stands)."""
    atomic.save_torch(state, files.step)


def pretrained_source(continue_from: str | None, base: str) -> str:
    """The ``continue_from`` of a new XP, as ``//pretrained/<path>`` for ``load_from_pretrained``.

    audiocraft resolves other ``continue_from`` values through ``audiocraft.train``, which can't be imported here;
    every source (another XP, a checkpoint, a package, by default ``pretrained``) is routed through
    ``load_from_pretrained`` instead.

    Args:
        continue_from: the user's ``continue_from`` (None: start from ``base``).
        base: the resolved ``pretrained`` package.
    """
    from solvers.models import references

    source = continue_from or base
    if str(source).startswith('//pretrained/'):
        return str(source)
    logger.info('New XP: initialising the LM from %s', source)
    return f'//pretrained/{references.continue_source(source, base)}'


def complete_message(sig: str, epochs: int, folder: Path) -> str:
    """What a re-run of a finished XP says: nothing to do, and how to train on from its best weights."""
    return (
        f'XP {sig} is complete: it trained all {epochs} epochs before ({folder}). Nothing to do. To train on from '
        f'its best weights, start a new XP with continue_from=//sig/{sig} (and e.g. optim.epochs=N).'
    )
