"""The local SLURM (scripts/slurm_local.sh) runs submitit jobs and requeues them; `solvers/training/slurm.py` maps
presets.

The `slurm`-marked tests submit real jobs to partition `local` and skip, with the reason shown by `pytest -ra`, when no
such SLURM answers; set AUDIOGEN_REQUIRE_SLURM=1 (CI does) to make them fail instead. The mapping tests need no SLURM.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import cloudpickle
import pytest
import submitit
from dora.conf import SlurmConfig, update_from_hydra
from dora.shep import Shepherd
from helpers import SLURM_START_HINT
from omegaconf import OmegaConf

from solvers.training.slurm import PRESET_DIR, SlurmConfigError, hand_over_to_submitit, slurm_parameters, slurm_preset

# Jobs unpickle this module's functions and classes; it is imported by file path under pytest, not by a module name
# the job's python could import, so send them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _executor(folder: Path, partition: str, **params: tp.Any) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster='slurm')
    executor.update_parameters(
        **{
            'slurm_partition': partition,
            'nodes': 1,
            'tasks_per_node': 1,
            'cpus_per_task': 1,
            'mem_gb': 1,
            'timeout_min': 5,
            **params,
        }
    )
    return executor


def _wait(job: submitit.Job, timeout: float) -> tp.Any:
    """The job's result, failing with its log instead of hanging when it doesn't finish in time."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f'job {job.job_id} not done after {timeout:.0f} s; its log:\n{(job.stdout() or "")[-3000:]}')
        time.sleep(0.5)
    return job.result()


def _wait_for_file(path: Path, job: submitit.Job, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f'job {job.job_id} did not start within {timeout:.0f} s (squeue state: {job.state})')
        time.sleep(0.2)


def _final_state(job: submitit.Job, timeout: float = 20) -> str:
    """The job's state in sacct once it is final: slurmctld reports job ends to slurmdbd a moment after they happen."""
    deadline = time.monotonic() + timeout
    while True:
        state = job.watcher.get_state(job.job_id, mode='force')
        if job.watcher.is_done(job.job_id, mode='cache') or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def _job_facts() -> dict[str, tp.Any]:
    return {
        key: os.environ.get(f'SLURM_{key.upper()}')
        for key in ('job_id', 'job_partition', 'cpus_per_task', 'mem_per_node', 'restart_count')
    } | {'uid': os.getuid()}


def _requeue_and_exit(submitits: tp.Callable[[int, tp.Any], tp.Any], signum: int, frame: tp.Any) -> None:
    hand_over_to_submitit(submitits, signum)
    raise SystemExit(128 + signum)


class _Counter(submitit.helpers.Checkpointable):
    """Counts up while it runs; on its first run it waits to be requeued, later runs return at once.

    submitit pickles this object again when the job is preempted (USR2), so `progress` survives a checkpointed requeue;
    a plain `scontrol requeue` kills the job and the rerun starts from the object as first submitted.
    """

    def __init__(self, started: str):
        self.started = started
        self.progress = 0

    def __call__(self) -> tuple[int, int]:
        # USR2 as the solver takes it (solvers/training/solver.py): submitit requeues, a requeue that SIGTERMs
        # scontrol counts.
        submitits = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, functools.partial(_requeue_and_exit, submitits))
        restarts = int(os.environ.get('SLURM_RESTART_COUNT', '0'))
        with open(self.started, 'a') as f:
            f.write(f'{restarts}\n')
        while restarts == 0 and self.progress < 3000:  # about 5 min: the test requeues it long before
            self.progress += 1
            time.sleep(0.1)
        return restarts, self.progress


# ---- on the local SLURM ----


@pytest.mark.slurm
def test_submitit_job_runs_and_returns(local_slurm, tmp_path):
    job = _executor(tmp_path, local_slurm).submit(_job_facts)
    facts = _wait(job, timeout=60)
    assert facts['job_id'] == job.job_id and facts['job_partition'] == local_slurm
    assert facts['cpus_per_task'] == '1' and facts['mem_per_node'] == '1024' and facts['uid'] == os.getuid()
    # sacct answers (slurmdbd), so submitit and dora see the real state of finished jobs.
    assert _final_state(job) == 'COMPLETED'


@pytest.mark.slurm
def test_scontrol_requeue_reruns_the_job(local_slurm, tmp_path):
    started = tmp_path / 'started.txt'
    job = _executor(tmp_path, local_slurm).submit(_Counter(str(started)))
    _wait_for_file(started, job)
    subprocess.run(['scontrol', 'requeue', job.job_id], check=True, timeout=30)
    restarts, progress = _wait(job, timeout=60)
    assert restarts == 1 and progress == 0  # killed and rerun from the submitted object
    assert started.read_text().split() == ['0', '1']
    assert _final_state(job) == 'COMPLETED'


@pytest.mark.slurm
def test_preemption_signal_checkpoints_and_requeues(local_slurm, tmp_path, monkeypatch):
    """What a preemption does: SIGTERM, then USR2, on which submitit checkpoints the callable and requeues it.

    To requeue the job SLURM ends it with SIGTERM, which reaches `scontrol requeue` too when it has not exited yet (a
    loaded node). The job's scontrol here lingers after its answer, so that SIGTERM always stops it: the job must count
    as requeued all the same, as the solver's hand-over (solvers/training/slurm.py) makes it.
    """
    slow_bin = tmp_path / 'bin'
    slow_bin.mkdir()
    scontrol = slow_bin / 'scontrol'
    scontrol.write_text(f'#!/bin/sh\n{shutil.which("scontrol")} "$@" || exit $?\nsleep 20\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv('PATH', f'{slow_bin}{os.pathsep}{os.environ["PATH"]}')  # sbatch hands the job this PATH
    started = tmp_path / 'started.txt'
    job = _executor(tmp_path, local_slurm).submit(_Counter(str(started)))
    _wait_for_file(started, job)
    time.sleep(1)  # let it make progress worth keeping
    job._interrupt()
    restarts, progress = _wait(job, timeout=60)
    assert restarts == 1 and progress > 0  # the rerun continued from the checkpointed object
    assert 'stopped scontrol first' in (job.stdout() or '')


@pytest.mark.slurm
def test_dora_executor_from_local_preset_runs(local_slurm, tmp_path):
    """The sbatch script Dora writes from slurm/local (its mem, cpus and gres mapping) is one SLURM accepts."""
    slurm = SlurmConfig()
    update_from_hydra(slurm, OmegaConf.create(slurm_preset('local', cpus=1, mem_gb=1)))
    executor = Shepherd._get_submitit_executor(tp.cast(Shepherd, None), 'audiogen_test', tmp_path, slurm)
    job = executor.submit(_job_facts)
    facts = _wait(job, timeout=60)
    assert facts['job_partition'] == local_slurm and facts['cpus_per_task'] == '1' and facts['mem_per_node'] == '1024'


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_signal_requeues_before_the_kill(local_slurm, tmp_path):
    """SLURM sends USR2 `signal_delay_s` before the time limit (up to ~30 s late); submitit checkpoints and requeues.

    The signal comes 60-90 s after the job starts: submitit installs its handler once the job's python has imported
    it, which on a loaded machine (5x slower) takes seconds, and a USR2 before that would kill the job instead.
    """
    started = tmp_path / 'started.txt'
    job = _executor(tmp_path, local_slurm, timeout_min=3, slurm_signal_delay_s=120).submit(_Counter(str(started)))
    restarts, progress = _wait(job, timeout=420)
    assert restarts == 1 and progress > 0
    assert 'timed-out' in (job.stdout() or '')


# ---- the solver's hand-over to submitit on USR2 (no SLURM needed) ----


def _submitit_handler(returncode: int, cmd: list[str]) -> tp.Callable[[int, tp.Any], None]:
    def handler(signum: int, frame: tp.Any) -> None:
        raise subprocess.CalledProcessError(returncode, cmd)

    return handler


def test_a_requeue_whose_sigterm_stops_scontrol_counts_as_requeued(caplog):
    """SLURM ends a job with SIGTERM to requeue it; when that stops `scontrol requeue` first, the job was requeued."""
    with caplog.at_level('INFO', logger='submitit'):
        hand_over_to_submitit(_submitit_handler(-signal.SIGTERM, ['scontrol', 'requeue', '7']), signal.SIGUSR2)
    assert 'Requeued job 7' in caplog.text


@pytest.mark.parametrize(
    'returncode, cmd',
    [(1, ['scontrol', 'requeue', '7']), (-signal.SIGKILL, ['scontrol', 'requeue', '7']), (-signal.SIGTERM, ['sbatch'])],
)
def test_other_requeue_failures_still_fail_the_job(returncode, cmd):
    with pytest.raises(subprocess.CalledProcessError):
        hand_over_to_submitit(_submitit_handler(returncode, cmd), signal.SIGUSR2)


# ---- mapping presets to Dora's SlurmConfig (no SLURM needed) ----


def _slurm(**values: tp.Any) -> dict[str, tp.Any]:
    base = OmegaConf.load(PRESET_DIR / 'local.yaml')
    for key, value in values.items():
        base[key] = value
    out = OmegaConf.to_container(slurm_parameters(base))
    assert isinstance(out, dict)
    return out


def _sbatch(params: dict[str, tp.Any], tmp_path: Path) -> str:
    """The sbatch script Dora's Shepherd would submit for these parameters (submitit needs SLURM's binaries)."""
    if shutil.which('srun') is None:
        if os.environ.get('AUDIOGEN_REQUIRE_SLURM') == '1':
            pytest.fail(f'AUDIOGEN_REQUIRE_SLURM=1 but srun is not installed: {SLURM_START_HINT}')
        pytest.skip(f'submitit builds sbatch scripts only where srun is installed: {SLURM_START_HINT}')
    slurm = SlurmConfig()
    update_from_hydra(slurm, OmegaConf.create(params))
    executor = Shepherd._get_submitit_executor(tp.cast(Shepherd, None), 'xp', tmp_path, slurm)
    return executor._make_submission_file_text('python job.py', 'uid')


def test_cpu_only_job_maps_mem_gb_and_cpus(tmp_path):
    params = _slurm(mem_gb=3, cpus=2)
    assert 'mem_gb' not in params and 'cpus' not in params
    assert (params['gpus'], params['mem_per_gpu'], params['cpus_per_gpu']) == (0, 3, 2)
    script = _sbatch(params, tmp_path)
    assert '--mem=3GB' in script and '--cpus-per-task=2' in script and '--ntasks-per-node=1' in script
    assert '--partition=local' in script and 'gres' not in script
    assert '--constraint' not in script and '--exclude' not in script  # null/empty means no flag


def test_gpu_job_scales_memory_per_gpu(tmp_path):
    params = slurm_preset('cluster', partition='gpu', gpus=2, mem_per_gpu=64.0)
    assert (params['mem_per_gpu'], params['cpus_per_gpu']) == (64, 8)
    script = _sbatch(params, tmp_path)
    assert '--gres=gpu:2' in script and '--mem=128GB' in script and '--ntasks-per-node=2' in script
    assert '--cpus-per-task=8' in script and '--time=1440' in script and 'source .venv/bin/activate' in script


def test_every_preset_maps_to_dora_keys():
    for preset in sorted(PRESET_DIR.glob('*.yaml')):
        params = slurm_preset(preset.stem, partition='p')
        update_from_hydra(SlurmConfig(), OmegaConf.create(params))  # raises on a key Dora doesn't know


def test_mapping_keeps_the_key_set_dora_compares():
    """Dora compares each XP's config with the mapped base key by key: mapping may drop keys, never add one."""
    presets = {path.stem: OmegaConf.load(path) for path in PRESET_DIR.glob('*.yaml')}
    local = presets['local']
    assert set(slurm_parameters(local).keys()) == set(local.keys()) - {'mem_gb', 'cpus'}
    for name, preset in presets.items():  # one key set, so `slurm.<key>=` overrides work with every preset
        assert set(preset.keys()) == set(local.keys()), name


@pytest.mark.parametrize(
    'values, message',
    [
        ({'partition': '???'}, 'slurm.partition: is not set'),
        ({'partition': ''}, 'slurm.partition'),
        ({'gpus': -1}, 'slurm.gpus'),
        ({'gpus': 12, 'mem_gb': None, 'cpus': None}, 'multiple of 8'),
        ({'gpus': True}, 'slurm.gpus'),
        ({'mem_gb': 2.5}, 'whole number of GB'),
        ({'mem_gb': 0}, 'slurm.mem_gb'),
        ({'cpus': 0}, 'slurm.cpus'),
        ({'mem_per_gpu': 8}, 'set slurm.mem_gb for a CPU-only job'),
        ({'gpus': 1, 'mem_per_gpu': 8}, 'slurm.mem_gb: is 4 but applies to CPU-only jobs'),
        ({'time': 0}, 'slurm.time'),
        ({'setup': 'module load cuda'}, 'list of shell lines'),
        ({'constraint': 3}, 'slurm.constraint'),
        ({'gpu': 1}, 'unknown key(s) gpu'),
    ],
)
def test_nonsense_values_get_clear_errors(values, message):
    with pytest.raises(SlurmConfigError) as info:
        _slurm(**values)
    assert message in str(info.value)


def test_a_preset_without_per_gpu_keys_is_refused():
    with pytest.raises(SlurmConfigError, match='slurm.mem_per_gpu: is missing'):
        slurm_parameters(OmegaConf.create({'partition': 'p', 'gpus': 0, 'mem_gb': 2, 'cpus_per_gpu': None}))


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(SlurmConfigError, match='presets: cluster, local'):
        slurm_preset('nope')


def test_slurm_keys_leave_the_signature_alone(tmp_path):
    from solvers import train

    train.main.dora.dir = tmp_path
    base = ['solver=audiogen/demo']
    sig = train.main.get_xp(base).sig
    for override in ['slurm.mem_gb=8', 'slurm.cpus=1', 'slurm.time=5', 'slurm.partition=other', 'slurm.gpus=1']:
        assert train.main.get_xp(base + [override]).sig == sig, override
