"""Issue 5: checkpoints that never lose work, exact resume, the divergence guard and data parallel."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import in_stage, one_batch, run_dora, start_dora

from solvers import atomic
from solvers.errors import AudiogenError
from solvers.models import checkpoint_io
from solvers.training import checkpoints as ckpt

TIMING_KEYS = {'duration', 'tokens_per_s', 'mem_gb', 'rtf'}


def xp_folder(outputs: Path) -> Path:
    folders = list((outputs / 'xps').iterdir())
    assert len(folders) == 1
    return folders[0]


def comparable_history(history: list) -> list:
    """The metrics history without wall-clock-dependent values."""
    return [
        {stage: {k: v for k, v in metrics.items() if k not in TIMING_KEYS} for stage, metrics in epoch.items()}
        for epoch in history
    ]


def assert_same_training_state(a: dict, b: dict) -> None:
    for part in ('model', 'best_state'):
        flat_a, flat_b = _flatten(a[part]), _flatten(b[part])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            assert torch.equal(flat_a[key], flat_b[key]), (part, key)
    for key, value in _flatten(a['ema']).items():
        other = _flatten(b['ema'])[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, ('ema', key)
    for key, value in _flatten(a['optimizer']).items():
        other = _flatten(b['optimizer'])[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, ('optimizer', key)
    assert a['lr_scheduler'] == b['lr_scheduler']
    assert comparable_history(a['history']) == comparable_history(b['history'])


def _flatten(tree, prefix=''):
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flatten(value, f'{prefix}{key}/'))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            out.update(_flatten(value, f'{prefix}{i}/'))
    else:
        out[prefix] = tree
    return out


# ---------------------------------------------------------------- units
def test_atomic_save_leaves_the_previous_checkpoint_on_a_crash(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.th'
    atomic.save_torch({'model': torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 half a zip')
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        atomic.save_torch({'model': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint_io.safe_load(path)['model'], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint.th']


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payloads_are_refused_and_never_run(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'checkpoint.th'
    torch.save({'model': {}, 'evil': _Payload(str(marker))}, path)
    with pytest.raises(checkpoint_io.CheckpointError, match='Refusing to load .*checkpoint.th'):
        checkpoint_io.safe_load(path)
    assert not marker.exists()


def test_stock_audiocraft_checkpoints_with_a_pickled_config_load(tmp_path):
    from omegaconf import OmegaConf

    path = tmp_path / 'checkpoint.th'
    torch.save({'xp.cfg': OmegaConf.create({'a': 1, 'b': [1, 'x']}), 'model': {'w': torch.ones(1)}}, path)
    assert checkpoint_io.safe_load(path)['xp.cfg'].b[1] == 'x'


def test_rng_state_round_trips():
    rng = ckpt.RNGState()
    state = rng.state_dict()
    first = (random.random(), torch.rand(2), __import__('numpy').random.rand())
    rng.load_state_dict(state)
    again = (random.random(), torch.rand(2), __import__('numpy').random.rand())
    assert first[0] == again[0] and torch.equal(first[1], again[1]) and first[2] == again[2]


def test_divergence_guard_stops_with_the_last_good_checkpoint(in_xp, demo_overrides):
    solver = in_xp(demo_overrides + ['optim.max_bad_steps=2'])
    solver.restore()
    batch = one_batch(solver, 4)
    hook = solver.model.linears[0].weight.register_hook(lambda grad: grad * float('inf'))

    def two_bad_steps() -> None:
        solver.run_step(0, [batch], {})
        with pytest.raises(AudiogenError, match=r'2 consecutive non-finite steps.*update 2.*checkpoint\.th'):
            solver.run_step(1, [batch], {})

    in_stage(solver, 'train', two_bad_steps)
    hook.remove()


# ---------------------------------------------------------------- through dora run
@pytest.fixture(scope='module')
def short_run(demo_overrides):
    """3 epochs with epoch checkpoints every epoch, keeping 2."""
    return demo_overrides + [
        'optim.epochs=3',
        'optim.updates_per_epoch=2',
        'checkpoint.save_every=1',
        'checkpoint.keep_last=2',
        'generate.every=100',
        'generate.prompts=[a dog barking]',
    ]


@pytest.mark.slow
def test_retention_corruption_strictness_and_stale_files(in_xp, short_run, caplog):
    """In-process (the resume policy is solvers/training/resume.py; `dora run` resumes are the tests below)."""
    from solvers.training import resume

    caplog.set_level('INFO')
    solver = in_xp(short_run)
    solver.run()
    folder = solver.folder
    names = sorted(p.name for p in folder.glob('checkpoint*'))
    assert names == ['checkpoint.th', 'checkpoint_2.th', 'checkpoint_3.th', 'checkpoint_best.th']
    assert set(checkpoint_io.safe_load(folder / 'checkpoint_best.th')) >= {'best_state', 'xp.cfg', 'history'}

    # A truncated last checkpoint: resume falls back to the newest epoch checkpoint, with a warning.
    last = folder / 'checkpoint.th'
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])
    (folder / 'checkpoint.th.x1y2.tmp').write_bytes(b'left by a crash')
    again = in_xp(short_run)  # the re-run: same command, same XP
    again.restore()
    assert len(again.history) == 3
    assert 'unreadable' in caplog.text and 'Resuming from' in caplog.text and 'checkpoint_3.th' in caplog.text
    assert 'Removed 1 temporary file' in caplog.text and not (folder / 'checkpoint.th.x1y2.tmp').exists()

    # Nothing loadable: a clear error naming the files, never a silent restart from scratch.
    for path in folder.glob('checkpoint*.th'):
        path.write_bytes(b'garbage')
    with pytest.raises(checkpoint_io.CheckpointError, match=r'No loadable checkpoint(.|\n)*checkpoint_3\.th'):
        resume.load_resume_state(resume.CheckpointFiles(folder), again.stateful.sources, [], ema=True)


@pytest.mark.slow
def test_missing_state_fails_loudly_unless_reset(in_xp, short_run, caplog):
    """In-process: a re-run's restore, as `dora run` does it (solvers/train.py builds the solver, then runs it)."""
    caplog.set_level('INFO')
    args = [o for o in short_run if not o.startswith('optim.epochs')] + ['optim.epochs=1', 'schedule.cosine.warmup=1']
    solver = in_xp(args)
    solver.run()
    folder = solver.folder
    for path in folder.glob('checkpoint_[0-9]*.th'):
        path.unlink()
    state = checkpoint_io.safe_load(folder / 'checkpoint.th')
    del state['optimizer']
    torch.save(state, folder / 'checkpoint.th')
    with pytest.raises(checkpoint_io.CheckpointError, match=r'lacks optimizer.*checkpoint\.reset=\[optimizer\]'):
        in_xp(args).restore()
    caplog.clear()
    in_xp(args + ['checkpoint.reset=[optimizer]']).restore()
    assert 'Loading existing checkpoint' in caplog.text


def _run_killed(args: list[str], outputs: Path, kill_at: int) -> None:
    """Start `dora run`, SIGKILL it once `kill_at` step/epoch checkpoints were written, then re-run to the end."""
    proc = start_dora(args, outputs)
    seen, deadline = 0, time.time() + 300
    try:
        marks = set()
        while proc.poll() is None and time.time() < deadline:
            for path in outputs.glob('xps/*/checkpoint*.th'):
                stamp = (path.name, path.stat().st_mtime_ns)
                if stamp not in marks:
                    marks.add(stamp)
                    seen += 1
            if seen >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
    run_dora(args, outputs)


@pytest.fixture(scope='module')
def resume_args(demo_overrides):
    return demo_overrides + [
        'optim.epochs=2',
        'optim.updates_per_epoch=6',
        'checkpoint.save_every_updates=2',
        'generate.every=100',
        'generate.prompts=[a dog barking]',
        'generate.duration=0.5',
    ]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, resume_args) -> dict:
    """The reference: the same run without interruption (data order doesn't depend on dataset.num_workers)."""
    outputs = tmp_path_factory.mktemp('straight')
    run_dora(resume_args + ['dataset.num_workers=0'], outputs)
    return checkpoint_io.safe_load(xp_folder(outputs) / 'checkpoint.th')


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path, resume_args, uninterrupted):
    """SIGKILL at a random step/epoch checkpoint, re-run: bitwise the same weights, EMA, optimizer and history.

    With loader workers (forkserver, the default): the kill takes them down too, and the re-run's loader resumes the
    data order mid-epoch. Without workers, the same kill and resume is `test_exact_resume_after_sigkill_with_lora`."""
    kill_at = random.Random(2).randint(1, 5)  # among the 6 step/epoch checkpoint writes of the run
    _run_killed(resume_args + ['dataset.num_workers=2'], tmp_path / 'killed', kill_at)
    resumed = checkpoint_io.safe_load(xp_folder(tmp_path / 'killed') / 'checkpoint.th')
    assert len(resumed['history']) == 2
    assert_same_training_state(uninterrupted, resumed)


@pytest.mark.slow
def test_two_process_data_parallel_matches_one(tmp_path, demo_overrides):
    args = demo_overrides + [
        'optim.epochs=1',
        'optim.updates_per_epoch=3',
        'dataset.train.shuffle=false',
        'classifier_free_guidance.training_dropout=0',
        'generate.every=100',
        'generate.prompts=[]',
        'optim.ema.use=false',
    ]
    run_dora(args, tmp_path / 'one')
    proc = run_dora(['-d', '--ddp_workers', '2', *args], tmp_path / 'two', timeout=600)
    assert 'world_size is 2' in proc.stderr + proc.stdout or (tmp_path / 'two').exists()
    one = checkpoint_io.safe_load(xp_folder(tmp_path / 'one') / 'checkpoint.th')['model']
    two = checkpoint_io.safe_load(xp_folder(tmp_path / 'two') / 'checkpoint.th')['model']
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-5, worst  # same global batch; only the all-reduce summation order differs
    history = json.loads((xp_folder(tmp_path / 'two') / 'history.json').read_text())
    assert len(history) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    'signum, workers',
    [(signal.SIGTERM, 0), (signal.SIGINT, 2)],
    ids=['sigterm', 'ctrl-c-with-loader-workers'],
)
def test_preemption_signal_checkpoints_then_resume_is_exact(tmp_path, resume_args, uninterrupted, signum, workers):
    """SLURM's SIGTERM (scontrol requeue, preemption), submitit's SIGUSR2 (pre-timeout) or a user's Ctrl-C (SIGINT):
    the run writes a step checkpoint at the next update and exits without a traceback; the re-run ends exactly where
    an uninterrupted run does. A terminal's Ctrl-C reaches the whole foreground process group, so with loader workers
    (forkserver, the default) the signal goes to the group, the workers and the main process included. SIGUSR2 takes
    the same handler as SIGTERM; SLURM sends a real one in test_grids (the preempted XP is requeued and resumes)."""
    outputs = tmp_path / 'outputs'
    args = resume_args + [f'dataset.num_workers={workers}', 'checkpoint.save_every_updates=null']
    proc = start_dora(args, outputs)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        logs = list(outputs.glob('xps/*/solver.log.0'))
        if logs and 'Train | Epoch 1 | 2/6' in logs[0].read_text():
            break
        time.sleep(0.02)
    if workers:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum and 'Traceback' not in err, err[-3000:]
    folder = xp_folder(outputs)
    assert 'checkpointing at the next update' in (folder / 'solver.log.0').read_text()
    assert (folder / 'checkpoint_step.th').exists() or (folder / 'checkpoint.th').exists()
    run_dora(args, outputs)
    assert_same_training_state(uninterrupted, checkpoint_io.safe_load(folder / 'checkpoint.th'))


@pytest.mark.slow
def test_exact_resume_after_sigkill_with_lora(tmp_path, resume_args):
    """The same guarantee for a LoRA run: the adapters, their EMA, optimizer and history resume bitwise."""
    args = resume_args + ['adapter=lora', 'dataset.num_workers=0']
    run_dora(args, tmp_path / 'straight')
    reference = checkpoint_io.safe_load(xp_folder(tmp_path / 'straight') / 'checkpoint.th')
    assert reference['model'] and all('.lora_' in key for key in reference['model'])
    _run_killed(args, tmp_path / 'killed', random.Random(7).randint(1, 5))
    resumed = checkpoint_io.safe_load(xp_folder(tmp_path / 'killed') / 'checkpoint.th')
    assert len(resumed['history']) == 2
    assert_same_training_state(reference, resumed)
    assert resumed['adapter_layout'] == reference['adapter_layout']
