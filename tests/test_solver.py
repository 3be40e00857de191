"""Layer 2: the solver's hooks on a tiny model, in-process."""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import pytest
import torch

from solvers import package
from solvers.tiny import build_tiny_package


@contextmanager
def stage(solver, name: str):
    """Run code as if inside flashy's `run_stage(name)` (what `is_training` and the formatters look at)."""
    solver._current_stage = name
    try:
        yield
    finally:
        solver._current_stage = None


def one_batch(solver, size: int):
    """A fixed batch of `size` clips from the valid loader (deterministic order, no shuffling)."""
    audios, infos = [], []
    for audio, info in solver.dataloaders['valid']:
        audios.append(audio)
        infos.extend(info)
        if len(infos) >= size:
            break
    return torch.cat(audios)[:size], infos[:size]


def snapshot(solver) -> dict:
    return copy.deepcopy({'model': solver.model.state_dict(), 'optimizer': solver.optimizer.state_dict(),
                          'lr_scheduler': solver.lr_scheduler.state_dict()})


def restore(solver, state: dict) -> None:
    solver.model.load_state_dict(state['model'])
    solver.optimizer.load_state_dict(state['optimizer'])
    solver.lr_scheduler.load_state_dict(state['lr_scheduler'])


def test_training_starts_from_the_package_weights(in_xp, demo_overrides, tiny_package):
    solver = in_xp(demo_overrides)
    expected = package.lm_state(str(tiny_package))
    before = {k: v.clone() for k, v in solver.model.state_dict().items()}
    assert any(not torch.equal(before[k], expected[k]) for k in expected), "the LM should start random before restore"
    solver.restore()
    for key, value in solver.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # The EMA starts from the same weights.
    for key, value in solver.ema.state_dict()['state']['model'].items():
        assert torch.equal(value, expected[key].to(value)), key


def test_gradient_accumulation_matches_a_larger_batch(in_xp, demo_overrides):
    overrides = demo_overrides + ['classifier_free_guidance.training_dropout=0', 'optim.max_norm=0',
                                  'schedule.cosine.warmup=0']
    solver = in_xp(overrides)
    solver.restore()
    audio, infos = one_batch(solver, 8)
    initial = snapshot(solver)
    with stage(solver, 'train'):
        solver.run_step(0, [(audio[:4], infos[:4]), (audio[4:], infos[4:])], {})
        accumulated = copy.deepcopy(solver.model.state_dict())
        restore(solver, initial)
        solver.run_step(0, [(audio, infos)], {})
        full = solver.model.state_dict()
    moved = 0
    for key, value in full.items():
        torch.testing.assert_close(accumulated[key], value, rtol=0, atol=1e-5, msg=key)
        moved += int(not torch.equal(value, initial['model'][key]))
    assert moved > 0, "the step should have changed the weights"


def test_clipping_bounds_the_norm(in_xp, demo_overrides):
    solver = in_xp(demo_overrides + ['optim.max_norm=0.01'])
    solver.restore()
    seen = []
    step = solver.optimizer.step

    def spy(*args, **kwargs):
        grads = [p.grad for p in solver.model.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(*args, **kwargs)

    solver.optimizer.step = spy
    with stage(solver, 'train'):
        metrics = solver.run_step(0, [one_batch(solver, 4)], {})
    assert float(metrics['grad_norm']) > 0.01  # the norm before clipping is reported
    assert seen and seen[0] <= 0.01 * (1 + 1e-4)


def test_ema_follows_its_decay(in_xp, demo_overrides):
    solver = in_xp(demo_overrides + ['optim.ema.decay=0.9'])
    solver.restore()
    ema, decay = solver.ema, 0.9
    name = 'condition_provider.conditioners.description.embed.weight'
    params = dict(solver.model.named_parameters())
    expected = ema.state_dict()['state']['model'][name].clone()
    count = ema.count
    for value in (1.0, -2.0, 0.5):
        with torch.no_grad():
            params[name].fill_(value)
        ema.step()
        count = count * decay + 1  # audiocraft's unbiased EMA: weight 1/count for the new value
        expected = expected * (1 - 1 / count) + value / count
        torch.testing.assert_close(ema.state_dict()['state']['model'][name], expected)
    # A step skipped by the non-finite guard leaves the EMA untouched.
    solver._bad_steps = 1
    with torch.no_grad():
        params[name].fill_(100.0)
    ema.step()
    torch.testing.assert_close(ema.state_dict()['state']['model'][name], expected)


def test_non_finite_gradients_skip_the_step(in_xp, demo_overrides):
    solver = in_xp(demo_overrides)
    solver.restore()
    batch = one_batch(solver, 4)
    weights = copy.deepcopy(solver.model.state_dict())
    lr_epoch = solver.lr_scheduler.last_epoch
    hook = solver.model.linears[0].weight.register_hook(lambda grad: grad * float('nan'))
    with stage(solver, 'train'):
        metrics = solver.run_step(0, [batch], {})
    hook.remove()
    assert metrics['skipped'] == 1
    for key, value in solver.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert solver.lr_scheduler.last_epoch == lr_epoch and not solver.optimizer.state
    with stage(solver, 'train'):
        assert solver.run_step(1, [batch], {})['skipped'] == 0
    assert solver.lr_scheduler.last_epoch == lr_epoch + 1


def test_mismatched_package_names_the_key(in_xp, demo_overrides, tmp_path):
    bad = build_tiny_package(tmp_path / 'bad', overrides=('transformer_lm.num_layers=3', 'transformer_lm.dim=32'))
    overrides = [o for o in demo_overrides if not o.startswith('pretrained=')] + [f'pretrained={bad}']
    with pytest.raises(package.PackageError) as err:
        in_xp(overrides)
    message = str(err.value)
    assert 'transformer_lm.num_layers: 2 in the config, 3 in the package' in message
    assert 'transformer_lm.dim: 64 in the config, 32 in the package' in message


def test_missing_package_is_explained(in_xp, demo_overrides, tmp_path):
    overrides = [o for o in demo_overrides if not o.startswith('pretrained=')]
    with pytest.raises(package.PackageError, match='Pretrained package not found'):
        in_xp(overrides + [f'pretrained={tmp_path}/nope'])
    with pytest.raises(package.PackageError, match='HF_HUB_OFFLINE'):
        in_xp(overrides + ['pretrained=facebook/audiogen-medium'])


def test_samples_are_minus_14_lufs(in_xp, demo_overrides):
    from solvers import audio_io
    solver = in_xp(demo_overrides)
    solver.restore()
    with stage(solver, 'generate'):
        metrics = solver.generate()
    files = sorted((solver.folder / 'samples' / 'epoch_001').glob('*.wav'))
    assert len(files) == len(solver.cfg.generate.prompts)
    assert math.isclose(metrics['lufs'], -14.0, abs_tol=1.0)
    import soundfile
    for path in files:
        wav, sr = soundfile.read(path, dtype='float32')
        assert sr == 16000 and abs(len(wav) / sr - solver.cfg.generate.duration) < 0.05
        assert abs(audio_io.loudness(torch.from_numpy(wav), sr) + 14.0) <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_mixed_precision_step_on_cuda(in_xp, demo_overrides, dtype):
    solver = in_xp(demo_overrides + ['device=cuda', 'autocast=true', f'autocast_dtype={dtype}'])
    solver.restore()
    assert solver.cfg.autocast and (solver.scaler is not None) == (solver.cfg.autocast_dtype == 'float16')
    with stage(solver, 'train'):
        metrics = solver.run_step(0, [one_batch(solver, 4)], {})
    assert math.isfinite(float(metrics['ce'])) and metrics['mem_gb'] > 0
