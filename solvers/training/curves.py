"""TensorBoard curves a user reads first: ce and ppl of train and valid on one update axis, one run per XP.

flashy's TensorboardLogger writes `<stage>/<metric>` per epoch (so `evaluate/duration` and `generate/duration` sort
first and train/valid curves are collapsed), and its `add_hparams` makes a new `<unix-time>` run at every launch.
This logger, a drop-in for flashy's, writes:

- ``ce/train``, ``ce/valid``, ``ppl/train``, ``ppl/valid``: per update (train) and per epoch, all against the
  number of optimizer updates, so the curves share one x axis (``ce/train_epoch`` is the epoch mean);
- ``train/<metric>`` for the optimizer and system scalars (lr, grad_norm, tokens_per_s, mem_gb, ...);
- ``quality/<metric>`` for evaluation metrics; ``samples/<prompt>`` audio and ``samples/<metric>`` (rtf, lufs);
- the hyper-parameters into the same run (no extra run per launch); stage durations are not logged.

Runs are indexed under ``<outputs>/tensorboard/<dataset>_<sig>`` (a link to the XP's own ``tensorboard/`` folder),
so ``tensorboard --logdir outputs/tensorboard`` lists one readable run per XP.
"""

from __future__ import annotations

import logging
import os
import typing as tp
from pathlib import Path

import torch
from flashy.loggers.tensorboard import TensorboardLogger

logger = logging.getLogger(__name__)

CURVES = ('ce', 'ppl')  # metrics that get their own top-level group, one card per stage
SKIPPED = ('duration',)  # per-stage wall times: noise next to the curves


def tag(stage: str, key: str, per_update: bool = False) -> str | None:
    """The TensorBoard tag of ``key`` logged by ``stage``; None for metrics that are not logged.

    Args:
        stage: flashy stage name (train, valid, evaluate, generate).
        key: metric name.
        per_update: True for the per-update train points, False for per-epoch summaries.
    """
    if key in SKIPPED:
        return None
    if key in CURVES:
        suffix = '' if per_update or stage != 'train' else '_epoch'
        return f'{key}/{stage}{suffix}'
    if stage == 'evaluate':
        return f'quality/{key}'
    if stage == 'generate':
        return f'samples/{key}'  # beside the audio samples' tab, after the curves
    if stage == 'train':
        return f'train/{key}' + ('' if per_update else '_epoch')
    return f'{stage}/{key}'


class CurvesLogger(TensorboardLogger):
    """flashy's TensorboardLogger with the tag layout above, epoch summaries on the update axis, in-run hparams.

    Args:
        save_dir: the XP's tensorboard folder.
        updates_per_epoch: returns the optimizer updates per epoch (known once the loaders exist), to put epoch
            summaries on the update axis.
        with_media_logging: log audio samples too.
    """

    def __init__(self, save_dir: str | Path, updates_per_epoch: tp.Callable[[], int], with_media_logging: bool = True):
        # flashy's __init__ would open an event file at once; this one opens it at the first point logged, so a
        # launch that logs nothing (re-running a finished XP) leaves no empty event file in the run.
        self._with_media_logging = with_media_logging
        self._save_dir = str(save_dir)
        self._name = 'tensorboard'
        self._writer = None
        self._hparams: list = []
        self.updates_per_epoch = updates_per_epoch

    @property  # type: ignore[override]
    def writer(self) -> tp.Any:
        """The SummaryWriter, opened on first use on rank 0 (None on other ranks); pending hparams go in first."""
        import flashy

        if not flashy.distrib.is_rank_zero():
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self._save_dir)
            file_writer = self._writer._get_file_writer()
            for summary in self._hparams:
                file_writer.add_summary(summary)
        return self._writer

    def is_disabled(self) -> bool:
        return not self._save_dir

    def log_hyperparams(self, params: tp.Any, metrics: dict | None = None) -> None:
        """Keep the config for this run, written with its first point (flashy's add_hparams opens a new run per
        launch)."""
        from flashy.loggers.utils import _convert_params, _flatten_dict, _sanitize_params
        from torch.utils.tensorboard.summary import hparams

        flat = _sanitize_params(_flatten_dict(_convert_params(params)))
        self._hparams = list(hparams(flat, metrics or {'ce/valid': float('nan')}))
        if self._writer is not None:
            for summary in self._hparams:
                self._writer._get_file_writer().add_summary(summary)

    def log_metrics(self, prefix: tp.Any, metrics: dict, step: int | None = None) -> None:
        """Per-epoch stage summaries (``step`` is the epoch), placed at the update that ended the epoch."""
        writer = self.writer
        if writer is None:
            return
        x = (step or 0) * max(1, self.updates_per_epoch())
        for key, value in metrics.items():
            name = tag(str(prefix), key)
            if name is not None:
                writer.add_scalar(name, _scalar(value), x)

    def log_update(self, metrics: dict, update: int) -> None:
        """Per-update training points."""
        writer = self.writer
        if writer is None:
            return
        for key, value in metrics.items():
            name = tag('train', key, per_update=True)
            if name is not None:
                writer.add_scalar(name, _scalar(value), update)


def _scalar(value: tp.Any) -> float:
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def link_run(tb_dir: Path, outputs: Path, name: str) -> Path | None:
    """Make ``<outputs>/tensorboard/<name>`` point at an XP's tensorboard folder; None if links can't be made.

    Args:
        tb_dir: the XP's tensorboard folder.
        outputs: the outputs root (``project.outputs_dir()``).
        name: readable run name, e.g. ``mysounds_77f0c3fb``.
    """
    index = outputs / 'tensorboard'
    link = index / name
    try:
        index.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and Path(os.readlink(link)) == tb_dir:
            return link
        tmp = index / f'.{name}.tmp'
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(tb_dir, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as err:  # e.g. a filesystem without symlinks: the XP folder still has everything
        logger.debug('No TensorBoard index link %s: %s', link, err)
        return None
    return link


def run_name(cfg: tp.Any, sig: str) -> str:
    """``<dataset>_<sig>`` (or ``<label>_<sig>``): the dataset is the folder name of the train manifest."""
    label = cfg.get('label')
    if label:
        base = str(label)
    else:
        train = cfg.datasource.get('train')
        base = Path(str(train)).parent.name if train else 'xp'
    safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in base) or 'xp'
    return f'{safe}_{sig}'


# The per-update training scalars (the per-codebook ce_qN/ppl_qN stay in the epoch summaries).
UPDATE_KEYS = ('ce', 'ppl', 'lr', 'grad_norm', 'tokens_per_s', 'mem_gb', 'skipped', 'grad_scale')


def install(result_logger: tp.Any, folder: Path, updates_per_epoch: tp.Callable[[], int], media: bool) -> CurvesLogger:
    """Put a :class:`CurvesLogger` writing to ``folder`` in flashy's result logger, in place of its TensorBoard one.

    Args:
        result_logger: the solver's ``flashy.ResultLogger``.
        folder: the XP's ``tensorboard`` folder (created).
        updates_per_epoch: returns the updates per epoch (known once the loaders exist).
        media: also log the audio samples.
    """
    folder.mkdir(parents=True, exist_ok=True)
    curves = CurvesLogger(folder, updates_per_epoch, media)
    result_logger._experiment_loggers['tensorboard'] = curves  # flashy keeps its loggers in a private dict
    return curves


def installed(result_logger: tp.Any) -> CurvesLogger | None:
    """The :class:`CurvesLogger` of a result logger, or None when TensorBoard is disabled."""
    return tp.cast('CurvesLogger | None', result_logger._experiment_loggers.get('tensorboard'))
