"""Explorers for our grids: how `dora grid <name>` turns each XP's history.json into a row of its table."""

from __future__ import annotations

import time
import typing as tp

import treetable as tt
from dora import Explorer
from dora.shep import Sheep


def _ping(sheep: Sheep) -> str:
    """Time since the XP's SLURM log last changed ('' before its first job starts): a stuck job shows a large ping."""
    log = sheep.log
    if log is None or not log.exists():
        return ''
    delta = time.time() - log.stat().st_mtime
    for unit, seconds in (('d', 86400), ('h', 3600), ('m', 60)):
        if delta >= seconds:
            return f'{delta / seconds:.1f}{unit}'
    return f'{delta:.0f}s'


class AudioGenExplorer(Explorer):
    """Shows, per XP: epochs done, the last epoch's train and valid cross-entropy and perplexity, and the best valid ce.

    The metrics come from the `train` and `valid` stages the solver appends to history.json after every epoch
    (`ce`: the mean token cross-entropy in nats; `ppl`: the mean over updates of exp(ce)). `best` is the lowest valid
    ce so far, the epoch whose weights checkpoint_best.th holds. An XP that has not finished an epoch shows empty
    cells. `job ping` is the time since the job's log last changed.
    """

    def get_grid_metrics(self) -> list:
        # shorten=False: Dora's table cuts headers to the width of their values by default ('ce' would become 'c').
        return [
            tt.group('job', [tt.leaf('ping', align='>')], shorten=False),
            tt.group(
                'train',
                [
                    tt.leaf('epoch', align='>'),
                    tt.leaf('ce', '.3f'),
                    tt.leaf('ppl', '.2f'),
                ],
                align='>',
                shorten=False,
            ),
            tt.group(
                'valid',
                [
                    tt.leaf('ce', '.3f'),
                    tt.leaf('ppl', '.2f'),
                    tt.leaf('best_ce', '.3f', display='best'),
                ],
                align='>',
                shorten=False,
            ),
        ]

    def process_sheep(self, sheep: Sheep, history: list[dict]) -> dict:
        """One row: the job's ping (Dora fills the Meta group itself and would replace it with a Meta key of ours),
        plus the metrics of `process_history`."""
        return {'job': {'ping': _ping(sheep)}, **self.process_history(history)}

    def process_history(self, history: list[dict]) -> dict:
        """The last epoch's train/valid ce and ppl, the epochs done, and the lowest valid ce so far."""
        train: dict[str, tp.Any] = {'epoch': len(history)}
        valid: dict[str, tp.Any] = {}
        for epoch in history:
            train.update({key: epoch['train'][key] for key in ('ce', 'ppl') if key in epoch.get('train', {})})
            valid.update({key: epoch['valid'][key] for key in ('ce', 'ppl') if key in epoch.get('valid', {})})
        valid_ces = [epoch['valid']['ce'] for epoch in history if 'ce' in epoch.get('valid', {})]
        if valid_ces:
            valid['best_ce'] = min(valid_ces)
        return {'train': train, 'valid': valid}
