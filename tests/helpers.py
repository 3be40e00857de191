"""Helpers shared by the tests: commands as a user types them, batches and stages of an in-process solver, fake XPs.

Fixtures live in conftest.py; what a test calls directly lives here (tests import this module, never conftest).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import typing as tp
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FAKE_SIG = 'fa4e0001'
SLURM_PARTITION = 'local'
SLURM_START_HINT = 'start it as root with `scripts/slurm_local.sh install && scripts/slurm_local.sh start`'
T = tp.TypeVar('T')


# ---------------------------------------------------------------------------------------------------- commands
def subprocess_env(outputs: Path | None = None) -> dict[str, str]:
    """Environment for CLI subprocesses: offline, quiet, XPs under ``outputs``."""
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', PYTHONWARNINGS='ignore')
    if outputs is not None:
        env['AUDIOGEN_OUTPUTS'] = str(outputs)
    return env


def run_dora(
    args: tp.Sequence[str], outputs: Path, check: bool = True, timeout: float = 600, command: str = 'run'
) -> subprocess.CompletedProcess:
    """`python -m dora <command> <args>` from the project root, as a user would run it."""
    proc = subprocess.run(
        [sys.executable, '-m', 'dora', command, *args],
        cwd=ROOT,
        env=subprocess_env(outputs),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f'dora {command} {" ".join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}')
    return proc


def start_dora(args: tp.Sequence[str], outputs: Path, stderr: int | None = subprocess.PIPE) -> subprocess.Popen:
    """`python -m dora run <args>` in the background, in its own process group (a terminal's job), stdout discarded."""
    return subprocess.Popen(
        [sys.executable, '-m', 'dora', 'run', *args],
        cwd=ROOT,
        env=subprocess_env(outputs),
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def slurm_problem() -> str | None:
    """Why the local SLURM can't take jobs now, or None when partition `local` has a usable node."""
    if shutil.which('sinfo') is None:
        return f'SLURM is not installed (no sinfo): {SLURM_START_HINT}'
    try:
        command = ['sinfo', '-h', '-p', SLURM_PARTITION, '-o', '%T']
        proc = subprocess.run(command, capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return f'sinfo did not answer within 15 s: {SLURM_START_HINT}'
    if proc.returncode != 0:
        return f'slurmctld does not answer ({proc.stderr.strip()[:200]}): {SLURM_START_HINT}'
    states = proc.stdout.split()
    if not states:
        return f'SLURM has no partition {SLURM_PARTITION!r}: {SLURM_START_HINT}'
    if not {'idle', 'mixed', 'allocated', 'completing'} & set(states):
        return f'partition {SLURM_PARTITION!r} has no usable node (states: {", ".join(states)}): {SLURM_START_HINT}'
    return None


# ---------------------------------------------------------------------------------------------------- solvers
def in_stage(solver: tp.Any, name: str, fn: tp.Callable[[], T]) -> T:
    """``fn()`` inside flashy's ``run_stage(name)``, as the epoch loop runs a stage (what ``is_training`` and the
    formatters look at); returns what ``fn`` returned. flashy runs a stage once per epoch: put all of a test's
    steps of one stage in one ``fn``."""
    result: list[T] = []

    def body() -> dict:
        result.append(fn())
        return {}

    solver.run_stage(name, body)
    return result[0]


def one_batch(solver: tp.Any, size: int) -> tuple[torch.Tensor, list]:
    """A fixed batch of `size` clips from the valid loader (deterministic order, no shuffling; passes over the
    valid clips again when there are fewer than `size`)."""
    audios, infos = [], []
    while len(infos) < size:
        for audio, info in solver.dataloaders['valid']:
            audios.append(audio)
            infos.extend(info)
    return torch.cat(audios)[:size], infos[:size]


def ckpt_load(path: Path) -> dict:
    """A checkpoint as the project reads it (``weights_only``), on the CPU."""
    return torch.load(path, weights_only=True, map_location='cpu')


def make_fake_xp(outputs: Path, pkg: Path | str, sig: str = FAKE_SIG, ema: bool = True) -> Path:
    """An XP folder as the solver leaves it: checkpoint.th with xp.cfg (YAML), best_state, ema, model, history.

    The three weight sets are the package's LM plus different offsets, so a test can tell which one was taken.
    """
    from omegaconf import OmegaConf

    from solvers.demo.tiny import tiny_lm_config
    from solvers.models import package

    cfg = tiny_lm_config((f'pretrained={pkg}',))
    base = package.lm_state(str(pkg))

    def shifted(offset: float) -> dict:
        return {k: v + offset if v.is_floating_point() else v.clone() for k, v in base.items()}

    state = {
        'xp.cfg': OmegaConf.to_yaml(cfg),
        'xp.sig': sig,
        'history': [{'valid': {'ce': 5.0}}] * 2,
        'best_state': {'model': shifted(0.01)},
        'fsdp_best_state': {},
        'model': shifted(0.03),
        'ema': {'state': {'model': shifted(0.02)}, 'count': 4} if ema else None,
    }
    folder = outputs / 'xps' / sig
    folder.mkdir(parents=True)
    torch.save(state, folder / 'checkpoint.th')
    return folder


def command_argv(command: str) -> list[str]:
    """A printed command line as this interpreter runs it: `python`, `dora` and the `audiogen-*` console commands are
    the venv's; anything else (`make`) runs as written."""
    words = shlex.split(command, comments=True)
    if words[0] == 'python':
        return [sys.executable, *words[1:]]
    if words[0] == 'dora':
        return [sys.executable, '-m', 'dora', *words[1:]]
    if words[0].startswith('audiogen-'):
        return [str(Path(sys.executable).parent / words[0]), *words[1:]]
    return words
