"""Layers 3 and 4: the demo solver end to end through `dora run`, and a re-run that resumes."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import soundfile
import torch
from conftest import ROOT, run_dora, subprocess_env

from solvers import audio_io


def history(folder):
    return json.loads((folder / 'history.json').read_text())


def test_dora_run_trains_and_logs(trained_xp):
    folder = trained_xp['folder']
    epochs = history(folder)
    assert len(epochs) == 2
    for epoch in epochs:
        for stage in ('train', 'valid'):
            # ppl is averaged per update, so by Jensen it is at least exp(mean ce).
            assert math.isfinite(epoch[stage]['ce']) and epoch[stage]['ppl'] >= math.exp(epoch[stage]['ce']) * 0.999
        for key in ('lr', 'grad_norm', 'tokens_per_s', 'mem_gb'):
            assert epoch['train'][key] > 0, key
    assert epochs[1]['train']['ce'] < epochs[0]['train']['ce']
    assert (folder / 'checkpoint.th').is_file()
    state = torch.load(folder / 'checkpoint.th', weights_only=True)  # no pickle allowlist needed for our own files
    for key in ('model', 'optimizer', 'lr_scheduler', 'ema', 'best_state', 'history'):
        assert key in state, key
    assert isinstance(state['xp.cfg'], str)


def test_samples_are_written_at_minus_14_lufs(trained_xp):
    folder = trained_xp['folder'] / 'samples'
    for epoch in ('epoch_001', 'epoch_002'):
        files = sorted((folder / epoch).glob('*.wav'))
        assert len(files) == 4, epoch
        for path in files:
            wav, sr = soundfile.read(path, dtype='float32')
            assert sr == 16000 and wav.ndim == 1 and len(wav) == 16000
            tensor = torch.from_numpy(wav)
            assert torch.isfinite(tensor).all() and tensor.abs().max() < 1.0
            assert abs(audio_io.loudness(tensor, sr) + 14.0) <= 1.0, path


def test_tensorboard_holds_scalars_and_audio(trained_xp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = list((trained_xp['folder'] / 'tensorboard').rglob('events.out.tfevents.*'))
    assert runs
    scalars, audio = set(), set()
    for run in {path.parent for path in runs}:
        acc = EventAccumulator(str(run), size_guidance={'scalars': 0, 'audio': 0})
        acc.Reload()
        scalars |= set(acc.Tags()['scalars'])
        audio |= set(acc.Tags()['audio'])
    for tag in ('train/ce', 'train/ppl', 'valid/ce', 'valid/ppl', 'train/lr', 'train/grad_norm',
                'train/tokens_per_s', 'train/mem_gb', 'train_update/ce', 'train_update/lr', 'train_update/grad_norm'):
        assert tag in scalars, (tag, sorted(scalars))
    assert any(tag.startswith('samples') for tag in audio), sorted(audio)


@pytest.mark.slow
def test_rerun_resumes_after_a_kill(tmp_path, demo_overrides):
    """Kill a run after its first epoch checkpoint, re-run the same command: history continues from epoch 2."""
    outputs = tmp_path / 'outputs'
    args = demo_overrides + ['optim.epochs=3']
    proc = subprocess.Popen([sys.executable, '-m', 'dora', 'run', *args], cwd=ROOT, env=subprocess_env(outputs),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            found = list(outputs.glob('xps/*/history.json'))
            if found and len(history(found[0].parent)) >= 1 and (found[0].parent / 'checkpoint.th').exists():
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    folder = found[0].parent
    first = history(folder)
    assert 1 <= len(first) < 3, "the kill should land before the run finished"
    saved = torch.load(folder / 'checkpoint.th', weights_only=True)
    assert len(saved['history']) == len(first)

    # The checkpoint restores exactly: the rebuilt solver holds the saved weights.
    from solvers import train
    train.main.dora.dir = outputs
    solver = train.get_solver_from_xp(train.main.get_xp_from_sig(folder.name), load_best=False, ignore_state_keys=())
    for key, value in solver.model.state_dict().items():
        assert torch.equal(value, saved['model'][key]), key
    assert solver.epoch == len(first) + 1

    proc = run_dora(args, outputs)
    assert 'Loading existing checkpoint' in proc.stderr + proc.stdout
    final = history(folder)
    assert len(final) == 3 and final[:len(first)] == first
