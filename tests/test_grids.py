"""The Dora grids of solvers/grids/: their expansion (`dora grid --dry_run`, no SLURM), and on the local SLURM the demo
grid end to end and a demo XP that is preempted (USR2), requeued (`scontrol requeue`, SIGTERM) and still finishes.

The `slurm`-marked tests use the local SLURM of scripts/slurm_local.sh through conftest's `local_slurm`
fixture: they skip with the reason shown by `pytest -ra` when it is not up, and fail instead with
AUDIOGEN_REQUIRE_SLURM=1. Jobs are small (1-2 CPUs, 2-4 GB) and at most two run at once.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import time
import typing as tp
from pathlib import Path

import pytest
from helpers import run_dora

from solvers.grids import demo as demo_grid
from solvers.grids import finetune as finetune_grid
from solvers.grids._explorers import AudioGenExplorer

SCHEDULED = re.compile(r'Scheduled job (\d+) for sheep ([0-9a-f]{8})/')
FINAL_STATES = ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'OUT_OF_MEMORY', 'NODE_FAIL', 'PREEMPTED')


def _dora(command: str, args: tp.Sequence[str], outputs: Path, env: dict[str, str], timeout: float = 120) -> str:
    """`python -m dora <command> <args>` through conftest's run_dora with extra environment; stdout + stderr."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        proc = run_dora(list(args), outputs, command=command, timeout=timeout)
    return proc.stdout + proc.stderr


def _demo_env(package: Path, dataset: dict[str, Path]) -> dict[str, str]:
    return {
        'AUDIOGEN_DEMO_PRETRAINED': str(package),
        'AUDIOGEN_DEMO_TRAIN': str(dataset['train']),
        'AUDIOGEN_DEMO_VALID': str(dataset['valid']),
    }


def _argvs(outputs: Path) -> dict[str, list[str]]:
    """The argv Dora stored for each XP (`--init` writes it without submitting), by signature."""
    return {p.parent.name: json.loads(p.read_text()) for p in (outputs / 'xps').glob('*/.argv.json')}


def _override(argv: list[str], key: str) -> str:
    values = [arg.split('=', 1)[1].strip('"') for arg in argv if arg.split('=', 1)[0] == key]
    assert len(values) == 1, (key, argv)
    return values[0]


# ---- grid expansion, no SLURM needed ----


def test_demo_grid_dry_run_expands_to_two_lrs(tmp_path, tiny_package, tiny_dataset):
    paths = {'package': tiny_package, 'train': tiny_dataset['train'], 'valid': tiny_dataset['valid']}
    env = _demo_env(tiny_package, tiny_dataset)
    out = _dora('grid', ['demo', '--dry_run', '--init', '--no_monitoring'], tmp_path / 'outputs', env)
    assert 'Scheduled job' not in out
    argvs = _argvs(tmp_path / 'outputs')
    assert len(argvs) == 2
    for sig, argv in argvs.items():
        assert argv[0] == 'solver=audiogen/demo' and sig in out
        assert _override(argv, 'pretrained') == str(paths['package'])
        assert _override(argv, 'datasource.train') == str(paths['train'])
        assert _override(argv, 'datasource.valid') == str(paths['valid'])
        assert (_override(argv, 'optim.epochs'), _override(argv, 'optim.updates_per_epoch')) == ('2', '5')
        assert not (tmp_path / 'outputs' / 'xps' / sig / 'job.pkl').exists()  # nothing was submitted
    assert sorted(float(_override(argv, 'optim.lr')) for argv in argvs.values()) == sorted(demo_grid.LRS)


def _prepared_preset(home: Path, name: str = 'demo') -> Path:
    """A dataset preset as prepare_dataset writes it, under the data root ``home`` ($AUDIOGEN_HOME)."""
    preset = home / 'config' / 'dataset' / f'{name}.yaml'
    preset.parent.mkdir(parents=True, exist_ok=True)
    preset.write_text(f'# @package __global__\ndatasource:\n  train: egs/{name}/train\n  valid: egs/{name}/valid\n')
    return preset


def test_finetune_grid_dry_run_expands_lr_by_effective_batch(tmp_path):
    _prepared_preset(tmp_path / 'home')
    env = {'AUDIOGEN_DATASET': 'demo', 'AUDIOGEN_PARTITION': 'gpu', 'AUDIOGEN_HOME': str(tmp_path / 'home')}
    out = _dora('grid', ['finetune', '--dry_run', '--init', '--no_monitoring'], tmp_path / 'outputs', env)
    assert 'Scheduled job' not in out
    argvs = _argvs(tmp_path / 'outputs')
    assert len(argvs) == 9
    pairs = set()
    for argv in argvs.values():
        assert argv[:2] == ['solver=audiogen/train', 'dataset=demo']
        assert _override(argv, 'dataset.batch_size') == str(finetune_grid.BATCH_SIZE)
        pairs.add((float(_override(argv, 'optim.lr')), int(_override(argv, 'optim.grad_accum_steps'))))
    assert pairs == set(itertools.product(finetune_grid.LRS, finetune_grid.GRAD_ACCUM_STEPS))


class _Recorder:
    """Stands in for Dora's Launcher: records the SLURM settings and the XPs an explorer asks for."""

    def __init__(self):
        self.slurm: dict[str, tp.Any] = {}
        self.xps: list[tuple] = []

    def slurm_(self, **kwargs: tp.Any) -> _Recorder:
        self.slurm.update(kwargs)
        return self

    def bind_(self, *args: tp.Any, **kwargs: tp.Any) -> _Recorder:
        return self

    def __call__(self, *args: tp.Any, **kwargs: tp.Any) -> None:
        self.xps.append(args)


def test_finetune_grid_schedules_on_the_cluster_preset(monkeypatch, tmp_path):
    _prepared_preset(tmp_path)
    monkeypatch.setenv('AUDIOGEN_HOME', str(tmp_path))
    monkeypatch.setenv('AUDIOGEN_DATASET', 'demo')
    monkeypatch.setenv('AUDIOGEN_PARTITION', 'a100')
    launcher = _Recorder()
    finetune_grid.explorer(tp.cast(tp.Any, launcher))
    assert len(launcher.xps) == 9
    assert launcher.slurm['partition'] == 'a100' and launcher.slurm['gpus'] == 1
    assert launcher.slurm['mem_per_gpu'] == 64 and launcher.slurm['time'] == 1440  # config/slurm/cluster.yaml


@pytest.mark.parametrize(
    'env, message',
    [
        ({'AUDIOGEN_PARTITION': 'gpu'}, 'AUDIOGEN_DATASET is not set'),
        ({'AUDIOGEN_DATASET': 'no_such_set', 'AUDIOGEN_PARTITION': 'gpu'}, 'no_such_set.yaml does not exist'),
        ({'AUDIOGEN_DATASET': 'demo'}, 'AUDIOGEN_PARTITION is not set'),
    ],
)
def test_finetune_grid_says_which_variable_is_missing(monkeypatch, tmp_path, env, message):
    _prepared_preset(tmp_path)
    monkeypatch.setenv('AUDIOGEN_HOME', str(tmp_path))
    for key in ('AUDIOGEN_DATASET', 'AUDIOGEN_PARTITION'):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match=message):
        finetune_grid.explorer(tp.cast(tp.Any, _Recorder()))


def test_demo_grid_names_a_missing_path(monkeypatch, tmp_path):
    monkeypatch.setenv('AUDIOGEN_DEMO_PRETRAINED', str(tmp_path / 'missing'))
    with pytest.raises(SystemExit, match=r'AUDIOGEN_DEMO_PRETRAINED=.*missing does not exist'):
        demo_grid.explorer(tp.cast(tp.Any, _Recorder()))


def test_explorer_reports_last_epoch_and_best_valid_ce():
    history = [
        {'train': {'ce': 5.0, 'ppl': 150.0}, 'valid': {'ce': 4.0, 'ppl': 60.0}},
        {'train': {'ce': 3.0, 'ppl': 20.0}, 'valid': {'ce': 4.5, 'ppl': 90.0}, 'generate': {'rtf': 1.0}},
    ]
    row = AudioGenExplorer(lambda launcher: None).process_history(history)
    assert row == {'train': {'epoch': 2, 'ce': 3.0, 'ppl': 20.0}, 'valid': {'ce': 4.5, 'ppl': 90.0, 'best_ce': 4.0}}
    assert AudioGenExplorer(lambda launcher: None).process_history([]) == {'train': {'epoch': 0}, 'valid': {}}


# ---- on the local SLURM ----


def _sacct(job_ids: tp.Iterable[str], duplicates: bool = False) -> list[tuple[str, str]]:
    """(job id, state) per job from sacct; with ``duplicates`` one row per run of a requeued job, oldest first."""
    args = ['sacct', '-n', '-X', '-P', '-o', 'JobID,State', '-j', ','.join(job_ids)]
    proc = subprocess.run(
        args + (['--duplicates'] if duplicates else []), capture_output=True, text=True, timeout=30, check=True
    )
    return [tuple(line.split('|', 1)) for line in proc.stdout.split()]  # type: ignore[misc]


def _cancel(job_ids: tp.Iterable[str]) -> None:
    subprocess.run(['scancel', *job_ids], capture_output=True, timeout=30)


def _wait(
    condition: tp.Callable[[], bool],
    timeout: float,
    what: str,
    job_ids: tp.Sequence[str],
    logs: tp.Sequence[Path] = (),
    interval: float = 0.5,
) -> float:
    """Poll ``condition`` every ``interval`` s; on timeout cancel the jobs and fail with their states and logs' ends."""
    begin = time.monotonic()
    while not condition():
        if time.monotonic() - begin > timeout:
            states = _sacct(job_ids)
            _cancel(job_ids)
            tails = '\n'.join(
                f'--- {log}:\n' + (log.read_text()[-3000:] if log.exists() else '(missing)') for log in logs
            )
            pytest.fail(f'{what}: not after {timeout:.0f} s (sacct: {states})\n{tails}')
        time.sleep(interval)
    return time.monotonic() - begin


def _done(job_ids: tp.Sequence[str]) -> bool:
    states = dict(_sacct(job_ids))
    return all(states.get(job, '').split(' ')[0] in FINAL_STATES for job in job_ids)


@pytest.fixture(scope='module')
def demo_grid_run(local_slurm, tiny_package, tiny_dataset, tmp_path_factory) -> dict[str, tp.Any]:
    """`dora grid demo` submitted to the local SLURM and watched by `dora grid demo` until both XPs are done."""
    outputs = tmp_path_factory.mktemp('grid_outputs')
    env = _demo_env(tiny_package, tiny_dataset)
    begin = time.monotonic()
    submitted = _dora('grid', ['demo', '--no_monitoring'], outputs, env)
    jobs = dict((sig, job) for job, sig in SCHEDULED.findall(submitted))
    try:
        queued = subprocess.run(
            ['squeue', '-h', '-p', local_slurm, '-o', '%i'], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
        # Monitoring (`-i` is in minutes) refreshes the table every 3 s and returns once every XP is done.
        monitored = _dora('grid', ['demo', '-i', '0.05'], outputs, env, timeout=900)
        _wait(lambda: _done(list(jobs.values())), 30, 'sacct shows the grid finished', list(jobs.values()))
        turnaround = time.monotonic() - begin
        again = _dora('grid', ['demo', '--no_monitoring'], outputs, env)
    except BaseException:
        _cancel(jobs.values())
        raise
    return {
        'outputs': outputs,
        'jobs': jobs,
        'submitted': submitted,
        'queued': queued,
        'monitored': monitored,
        'again': again,
        'turnaround': turnaround,
    }


@pytest.mark.slurm
@pytest.mark.slow
def test_demo_grid_runs_every_xp_to_completion(demo_grid_run):
    jobs = demo_grid_run['jobs']
    assert len(jobs) == len(demo_grid.LRS)
    # Submitted for real: each job was in the local partition's queue right after `dora grid`.
    assert set(jobs.values()) <= set(demo_grid_run['queued']), demo_grid_run['queued']
    states = dict(_sacct(jobs.values()))
    assert set(jobs.values()) <= set(states) and all(state == 'COMPLETED' for state in states.values()), states
    for sig in jobs:
        folder = demo_grid_run['outputs'] / 'xps' / sig
        history = json.loads((folder / 'history.json').read_text())
        assert 1 <= len(history) <= 2 and all('ce' in epoch['valid'] for epoch in history)
        assert (folder / 'checkpoint.th').is_file() and (folder / 'checkpoint_best.th').is_file()
        assert len(list((folder / 'samples' / f'epoch_{len(history):03d}').glob('*.wav'))) == 4
        assert (demo_grid_run['outputs'] / 'grids' / 'demo' / sig).resolve() == folder.resolve()
    print(f'demo grid: {len(jobs)} XPs submitted and finished in {demo_grid_run["turnaround"]:.0f} s')


@pytest.mark.slurm
@pytest.mark.slow
def test_demo_grid_table_shows_metrics(demo_grid_run):
    table = demo_grid_run['again']
    assert re.search(r'train\s.*valid', table) and re.search(r'epoch\s+ce\s+ppl\s*\|\s*ce\s+ppl\s+best', table)
    for sig, job in demo_grid_run['jobs'].items():
        history = json.loads((demo_grid_run['outputs'] / 'xps' / sig / 'history.json').read_text())
        row = next(line for line in table.splitlines() if sig in line)
        assert 'COM' in row and f' {job} ' in row, row
        # The row shows the epochs done and the last epoch's train and valid ce as history.json holds them.
        assert f'{history[-1]["train"]["ce"]:.3f}' in row and f'{history[-1]["valid"]["ce"]:.3f}' in row, row
        assert re.search(rf'\|\s+{len(history)}\s', row), row
    assert 'Monitoring Grid demo' in demo_grid_run['monitored'] and 'COM' in demo_grid_run['monitored']


@pytest.mark.slurm
@pytest.mark.slow
def test_demo_grid_does_not_resubmit_finished_xps(demo_grid_run):
    jobs = demo_grid_run['jobs']
    for output in (demo_grid_run['monitored'], demo_grid_run['again']):
        assert 'Scheduled job' not in output
    names = subprocess.run(
        ['sacct', '-n', '-X', '-P', '-S', 'now-1hours', '-o', 'JobID,JobName'],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    for sig, job in jobs.items():
        assert [row.split('|')[0] for row in names if row.endswith(f'_{sig}')] == [job], sig  # one job per XP


UPDATES = 12  # per epoch of the preempted XP: a signal sent at the first update leaves 11 to reach a boundary
# What the solver logs once per load of a checkpoint (a mid-epoch resume also logs "Resuming epoch N at update U of
# M." when its training loop starts: not counted).
RESUMED = re.compile(
    r'Resuming epoch (\d+) at update (\d+) from '
    r'|Loading existing checkpoint: \S+checkpoint(_\d+)?\.th'
)


def _preempted_xp_overrides(package: Path, dataset: dict[str, Path]) -> list[str]:
    """A demo XP with 2 epochs of UPDATES updates, each logged, and cheap otherwise: small batches, no samples
    (generation on a busy CPU costs more than this training), no loader processes (they restart at every stage, which
    took minutes on a busy 2-core machine; resuming with workers is tested in test_checkpoints)."""
    return [
        'solver=audiogen/demo',
        f'pretrained={package}',
        f'datasource.train={dataset["train"]}',
        f'datasource.valid={dataset["valid"]}',
        'optim.epochs=2',
        f'optim.updates_per_epoch={UPDATES}',
        f'logging.log_updates={UPDATES}',
        'schedule.cosine.warmup=2',
        'dataset.batch_size=4',
        'generate.prompts=[]',
        'dataset.num_workers=0',
    ]


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_xp_is_requeued_resumes_and_finishes(local_slurm, tiny_package, tiny_dataset, tmp_path):
    """USR2 (submitit's pre-timeout signal) in epoch 1, then `scontrol requeue` (SIGTERM) in epoch 2: each time the
    solver checkpoints at the next update and the job is requeued; the reruns resume and the XP finishes.

    Each signal is sent at the first logged update of the epoch, so the solver normally writes a step checkpoint and
    the rerun resumes mid-epoch. On a machine fast enough to finish the epoch before the signal lands, it stops at the
    epoch checkpoint instead and the rerun loads that: both are resumes, and the test prints which happened.
    """
    outputs = tmp_path / 'outputs'
    launched = _dora('launch', ['--no_tail', *_preempted_xp_overrides(tiny_package, tiny_dataset)], outputs, {})
    ((job, sig),) = SCHEDULED.findall(launched)
    folder = outputs / 'xps' / sig
    log = folder / 'solver.log.0'
    logs = [log, folder / 'submitit' / f'{job}_0_log.out']

    def text() -> str:
        return log.read_text() if log.exists() else ''

    def training(epoch: int) -> tp.Callable[[], bool]:
        # The first update of the epoch that is actually trained (a resumed epoch replays earlier ones unlogged).
        return lambda: re.search(rf'Train \| Epoch {epoch} \| \d+/{UPDATES} .*\| ce ', text()) is not None

    def resumed(count: int) -> tp.Callable[[], bool]:
        return lambda: len(RESUMED.findall(text())) >= count

    try:
        _wait(training(1), 300, 'the job trains', [job], logs, interval=0.1)
        subprocess.run(['scancel', '--signal=USR2', job], check=True, timeout=30)
        usr2_to_resume = _wait(resumed(1), 300, 'the job is requeued after USR2 and resumes', [job], logs)
        _wait(training(2), 300, 'the requeued job trains epoch 2', [job], logs, interval=0.1)
        begin = time.monotonic()
        subprocess.run(['scontrol', 'requeue', job], check=True, timeout=30)
        _wait(resumed(2), 300, 'the job is requeued after SIGTERM and resumes', [job], logs)
        _wait(lambda: _done([job]), 400, 'the job finishes', [job], logs)
        requeue_to_finish = time.monotonic() - begin
    except BaseException:
        _cancel([job])
        raise
    log_text = text()
    assert 'Received SIGUSR2' in log_text and f'Requeued job {job}' in log_text  # submitit requeued it
    assert 'Received SIGTERM' in log_text
    assert log_text.count('New XP: initialising the LM') == 1  # never restarted from the package
    resumes = [m.group(0) for m in RESUMED.finditer(log_text)]
    assert len(resumes) == 2, resumes
    runs = _sacct([job], duplicates=True)
    assert [state for _, state in runs] == ['REQUEUED', 'REQUEUED', 'COMPLETED'], runs
    history = json.loads((folder / 'history.json').read_text())
    assert len(history) == 2 and all('ce' in epoch['train'] and 'ce' in epoch['valid'] for epoch in history)
    assert not (folder / 'checkpoint_step.th').exists()  # the last epoch checkpoint replaced it
    print(
        f'USR2 to resumed: {usr2_to_resume:.0f} s; scontrol requeue to COMPLETED: {requeue_to_finish:.0f} s; '
        f'resumes: {resumes}'
    )
