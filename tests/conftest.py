"""Shared fixtures: a tiny pretrained package, a tiny prepared dataset, and `dora run` as a subprocess.

Everything is built offline in temporary folders; XP folders go to a temporary AUDIOGEN_OUTPUTS.
"""

from __future__ import annotations

import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
from helpers import ROOT, run_dora, slurm_problem, subprocess_env

os.environ['HF_HUB_OFFLINE'] = '1'  # no test may reach the hub
os.environ['TRANSFORMERS_OFFLINE'] = '1'
# `make test` runs the tests on parallel pytest-xdist workers, each starting torch processes with their configured
# threads: OpenMP threads that spin while another process holds the core turn a millisecond step into a second.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
# Session fixtures that run a whole XP: their users share one xdist worker rather than each worker running it.
SHARED_RUNS = ('trained_xp',)
# Work units (xdist groups or single tests) that take longest, handed out first, longest first: the SLURM tests
# (~240 s, mostly waiting for jobs), the demo (~130 s) and the first hour (~85 s) of a 2-core machine's ~8 min.
# Started late, any one of them is what the suite waits for at its end while the other worker idles.
LONGEST_FIRST = (
    'slurm',
    'tests/test_demo.py::test_make_demo_learns_the_new_classes',
    'tests/test_first_hour.py::test_prepare_train_resume_export_generate_on_a_cpu',
    'tests/test_docs_walk.py::test_walk_the_docs_on_a_cpu',
)


# The SLURM tests that spend their time waiting for SLURM's timers (a requeue, a time limit's signal), hardly using
# the CPU: they run first in their group, while the demo and the first-hour test (the next two units) use the cores.
SLURM_WAITING_FIRST = 'tests/test_slurm_local.py::'


def _xdist_group(item: pytest.Item) -> str | None:
    """The worker group of a test under ``--dist loadgroup``: SLURM, or a costly fixture it shares with others.

    Shared fixtures are those of a test file (module or session scope) and :data:`SHARED_RUNS`; the conftest's
    session fixtures (a tiny package, a tiny dataset) are cheap enough to build on each worker.
    """
    if item.get_closest_marker('slurm') or 'local_slurm' in item.fixturenames:
        return 'slurm'  # one local SLURM node: its tests run one at a time, in order
    infos = getattr(item, '_fixtureinfo', None)
    defs = infos.name2fixturedefs if infos is not None else {}
    for name in sorted(item.fixturenames):
        fixturedef = defs[name][-1] if defs.get(name) else None
        if name in SHARED_RUNS:
            return name
        if fixturedef is not None and fixturedef.scope in ('module', 'session') and fixturedef.baseid.endswith('.py'):
            return f'{fixturedef.baseid}::{name}'
    return None


@pytest.hookimpl(tryfirst=True)  # instead of pytest-xdist's one worker per core
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: one worker per core, plus one for the SLURM group, which spends most of its ~4 minutes waiting for
    SLURM's timers (a requeue, a time limit's signal) while the cores run the others' training (2 cores: 3 workers,
    526 s -> 443-458 s). ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still sets the count."""
    if os.environ.get('PYTEST_XDIST_AUTO_NUM_WORKERS'):
        return None  # pytest-xdist's own hook reads it
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    except ImportError:
        cores = os.cpu_count() or 1
    return cores + 1


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's hook, which turns the marks into node id suffixes
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group tests for xdist; under xdist, hand out :data:`LONGEST_FIRST`, then the groups and tests holding slow
    tests, then the rest. pytest-xdist hands the units out in this order (the Makefile turns off its reordering by
    test count), one to each worker, then another whenever a worker has two tests left."""
    groups = {}
    for item in items:
        group = groups[item.nodeid] = _xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    if 'PYTEST_XDIST_WORKER' not in os.environ:
        return  # in one process, the file order keeps each module's fixtures built once
    slow = {groups[i.nodeid] or i.nodeid for i in items if i.get_closest_marker('slow')}

    def rank(item: pytest.Item) -> tuple[int, int, int]:
        unit = groups[item.nodeid] or item.nodeid
        if unit in LONGEST_FIRST:
            # In the SLURM group, the tests that mostly wait for SLURM's timers go first, beside the demo's training.
            return 0, LONGEST_FIRST.index(unit), 0 if item.nodeid.startswith(SLURM_WAITING_FIRST) else 1
        return (1 if unit in slow else 2), 0, 0

    items.sort(key=rank)


@pytest.fixture(scope='session')
def tiny_package(tmp_path_factory) -> Path:
    """A tiny random package in facebook/audiogen-medium's layout."""
    from solvers.demo.tiny import build_tiny_package

    return build_tiny_package(tmp_path_factory.mktemp('pretrained') / 'tiny', seed=0)


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory) -> dict[str, Path]:
    """The demo sounds (3 per class), prepared by scripts/prepare_dataset.py into temporary egs/ and config/."""
    from solvers.demo.synthetic import make_demo_dataset

    base = tmp_path_factory.mktemp('dataset')
    make_demo_dataset(base / 'raw', seed=0, per_class=3)
    command = [
        sys.executable,
        '-m',
        'scripts.prepare_dataset',
        str(base / 'raw'),
        '--name',
        'tiny',
        '--out',
        str(base / 'prep'),
        '--egs-root',
        str(base / 'egs'),
        '--config-root',
        str(base / 'config'),
        '--workers',
        '1',
        '--no-progress',
        '--valid-fraction',
        '0.25',
    ]
    proc = subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {'train': base / 'egs' / 'tiny' / 'train', 'valid': base / 'egs' / 'tiny' / 'valid', 'root': base}


@pytest.fixture(scope='session')
def demo_overrides(tiny_package, tiny_dataset) -> list[str]:
    """Overrides that point the tiny-on-your-data solver at the session's package and dataset, with a very short
    schedule and 2 micro-batches per update (accumulation on the path every test takes)."""
    return [
        'solver=audiogen/tiny',
        f'pretrained={tiny_package}',
        f'datasource.train={tiny_dataset["train"]}',
        f'datasource.valid={tiny_dataset["valid"]}',
        'optim.epochs=2',
        'optim.updates_per_epoch=4',
        'dataset.batch_size=4',
        'dataset.segment_duration=1.0',
        'optim.grad_accum_steps=2',
        'generate.duration=1.0',
        'schedule.cosine.warmup=2',
        'dataset.num_workers=0',
    ]


@pytest.fixture(scope='session')
def trained_xp(tmp_path_factory, demo_overrides) -> dict[str, tp.Any]:
    """One demo fine-tune through `dora run`, shared by the tests that inspect its outputs."""
    outputs = tmp_path_factory.mktemp('outputs')
    proc = run_dora(demo_overrides, outputs)
    folders = list((outputs / 'xps').iterdir())
    assert len(folders) == 1
    return {'folder': folders[0], 'outputs': outputs, 'overrides': demo_overrides, 'log': proc.stderr + proc.stdout}


@pytest.fixture(scope='session')
def local_slurm() -> str:
    """The partition of the local SLURM; skips (or fails with AUDIOGEN_REQUIRE_SLURM=1) when it is not up."""
    from helpers import SLURM_PARTITION

    problem = slurm_problem()
    if problem is not None:
        if os.environ.get('AUDIOGEN_REQUIRE_SLURM') == '1':
            pytest.fail(f'AUDIOGEN_REQUIRE_SLURM=1 but {problem}')
        pytest.skip(problem)
    return SLURM_PARTITION


@pytest.fixture()
def in_xp(tmp_path, monkeypatch):
    """Build a solver in-process for ``overrides``, inside its Dora XP (for unit tests on tiny models)."""
    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(tmp_path / 'outputs'))
    from solvers import train

    built = []

    def build(overrides: tp.Sequence[str]):
        """A new solver; the previous one's XP context is left first (e.g. to rebuild it as a re-run would)."""
        while built:
            built.pop().__exit__(None, None, None)
        train.main.dora.dir = tmp_path / 'outputs'
        xp = train.main.get_xp(list(overrides))
        ctx = xp.enter()
        ctx.__enter__()
        try:
            solver = train.get_solver(xp.cfg)
        except BaseException:
            ctx.__exit__(None, None, None)
            raise
        built.append(ctx)
        return solver

    yield build
    for ctx in built:
        ctx.__exit__(None, None, None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail rather than run grouped tests apart: pytest-xdist marks a group by suffixing node ids with ``@group``."""
    if not getattr(session.config.option, 'loadgroup', False):
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker('xdist_group') and '@' not in i.nodeid]
    if lost:
        message = (
            f'pytest-xdist did not apply xdist_group to {lost[0]} (and {len(lost) - 1} more): this pytest and '
            'pytest-xdist no longer work together for --dist loadgroup; keep the versions uv.lock pins.'
        )
        print(message, file=sys.__stderr__, flush=True)  # a worker's exception reaches the terminal as a traceback
        raise pytest.UsageError(message)
