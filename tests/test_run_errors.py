"""Config and data mistakes stop `dora run` before its first update with one line and exit status 2, leaving no XP
folder and no TensorBoard run behind; the logs are plain text when they don't go to a terminal."""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT


@pytest.fixture(scope='module')
def home(tmp_path_factory) -> Path:
    """A user's AUDIOGEN_HOME with the tiny stand-in, a small prepared dataset and one whose manifests are empty."""
    root = tmp_path_factory.mktemp('home')
    env = user_env(root)
    for command in (
        ['scripts.make_tiny_package'],
        ['scripts.make_demo_data', str(root / 'raw'), '--classes', 'new', '--per-class', '2'],
        ['scripts.prepare_dataset', str(root / 'raw'), '--name', 'small'],
    ):
        proc = subprocess.run([sys.executable, '-m', *command], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ('train', 'valid'):
        (root / 'egs' / 'empty' / split).mkdir(parents=True)
        with gzip.open(root / 'egs' / 'empty' / split / 'data.jsonl.gz', 'wt'):
            pass
    preset = (root / 'config' / 'dataset' / 'small.yaml').read_text().replace('small', 'empty')
    (root / 'config' / 'dataset' / 'empty.yaml').write_text(preset)
    return root


def user_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith('AUDIOGEN_')}
    env.update(AUDIOGEN_HOME=str(root), HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    return env


@pytest.mark.slow
@pytest.mark.parametrize(
    'overrides, expected',
    [
        ('optim.lrr=1', "Unknown config key 'optim.lrr'"),
        ('dataset=smal', 'Unknown preset dataset=smal'),
        ('', 'No dataset chosen'),
        ('dataset=empty', 'lists no clip'),
        ('dataset=small pretrained=/nowhere/pkg', "Pretrained package not found: '/nowhere/pkg'"),
        ('dataset=small transformer_lm.dim=32', 'transformer_lm.dim: 32 in the config, 64 in the package'),
        ('dataset=small schedule.cosine.warmup=1000', 'schedule.cosine.warmup=1000 must be below'),
    ],
)
def test_a_refused_run_leaves_nothing_and_exits_2(home, overrides, expected):
    command = [sys.executable, '-m', 'dora', 'run', 'solver=audiogen/tiny', *overrides.split()]
    proc = subprocess.run(command, cwd=ROOT, env=user_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert '\x1b[' not in proc.stderr  # not a terminal: no colour codes
    assert not list((home / 'outputs' / 'xps').glob('*')) if (home / 'outputs' / 'xps').exists() else True
    tensorboard = home / 'outputs' / 'tensorboard'
    assert not (tensorboard.exists() and list(tensorboard.iterdir()))


def record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord('flashy.solver', logging.INFO, __file__, 1, msg, args, None)


def test_audiocraft_empty_and_repeated_lines_are_dropped():
    from solvers.training.logs import PlainFormatter, QuietFilter

    quiet = QuietFilter()
    kept = [
        r.getMessage()
        for r in (
            record('Model hash: %s', 'before-loading'),
            record('Initializing EMA on the model with decay = %s every %d updates', 0.9, 5),
            record('Base memory usage, with model, grad and optim: %.2f GB', 0.0045),
            record('Restoring weights and history.'),
            record('Ignoring keys when loading best %r', []),
            record('Re-initializing EMA from best state'),
            record('Initializing EMA on the model with decay = %s every %d updates', 0.9, 5),
            record('Model hash: %s', 'after-loading'),
            record('Base memory usage, with model, grad and optim: %.2f GB', 29.4),
        )
        if quiet.filter(r)
    ]
    assert kept == [
        'Initializing EMA on the model with decay = 0.9 every 5 updates',
        'Restoring weights and history.',
        'Re-initializing EMA from best state',
        'Model hash: after-loading',
        'Base memory usage, with model, grad and optim: 29.40 GB',
    ]
    line = PlainFormatter().format(record('\x1b[1mTrain Summary | Epoch 1\x1b[0m'))
    assert line.endswith('] - Train Summary | Epoch 1') and '\x1b' not in line
