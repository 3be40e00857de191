"""Layers 3 and 4: the demo solver end to end through `dora run`, and the checkpoint a re-run resumes from."""

from __future__ import annotations

import json
import math

import soundfile
import torch

from solvers.generation import audio_io


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


def test_tensorboard_is_one_readable_run_with_curves_first(trained_xp):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = trained_xp['folder']
    runs = {path.parent for path in (folder / 'tensorboard').rglob('events.out.tfevents.*')}
    assert runs == {folder / 'tensorboard'}, 'one run per XP: no per-launch hparams runs'
    # The index outputs/tensorboard/<dataset>_<sig> names the run after the data; its dataset here is 'tiny'.
    link = trained_xp['outputs'] / 'tensorboard' / f'tiny_{folder.name}'
    assert link.is_symlink() and link.resolve() == (folder / 'tensorboard').resolve()
    acc = EventAccumulator(str(link), size_guidance={'scalars': 0, 'audio': 0})
    acc.Reload()
    scalars, audio = set(acc.Tags()['scalars']), set(acc.Tags()['audio'])
    for tag in (
        'ce/train',
        'ce/valid',
        'ppl/train',
        'ppl/valid',
        'ce/train_epoch',
        'train/lr',
        'train/grad_norm',
        'train/tokens_per_s',
        'train/mem_gb',
    ):
        assert tag in scalars, (tag, sorted(scalars))
    assert not any(tag.endswith('duration') for tag in scalars), sorted(scalars)
    # Groups sort alphabetically in TensorBoard: the ce and ppl curves come first.
    groups = sorted({tag.split('/')[0] for tag in scalars})
    assert groups[:2] == ['ce', 'ppl'], groups
    # Per-update train points and per-epoch valid points share the update axis (4 updates per epoch here).
    assert [e.step for e in acc.Scalars('ce/valid')] == [4, 8]
    assert [e.step for e in acc.Scalars('ce/train')] == list(range(1, 9))
    assert any(tag.startswith('samples/') for tag in audio), sorted(audio)


def test_the_last_checkpoint_restores_exactly(trained_xp, monkeypatch):
    """The solver rebuilt from the XP's last checkpoint holds its weights and goes on at the next epoch. (Killing a
    run and re-running the same command is `test_first_hour`; bitwise-exact resume is `test_checkpoints`.)"""
    from solvers import train

    folder = trained_xp['folder']
    saved = torch.load(folder / 'checkpoint.th', weights_only=True)
    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(trained_xp['outputs']))
    monkeypatch.setattr(train.main.dora, 'dir', trained_xp['outputs'])
    solver = train.get_solver_from_xp(train.main.get_xp_from_sig(folder.name), load_best=False, ignore_state_keys=())
    for key, value in solver.model.state_dict().items():
        assert torch.equal(value, saved['model'][key]), key
    assert solver.epoch == len(history(folder)) + 1
