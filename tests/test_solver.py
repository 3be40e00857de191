"""Layer 2: the solver's hooks on a tiny model, in-process."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import ckpt_load, in_stage, one_batch

from solvers.demo.tiny import build_tiny_package
from solvers.models import package


def snapshot(solver) -> dict:
    return copy.deepcopy(
        {
            'model': solver.model.state_dict(),
            'optimizer': solver.optimizer.state_dict(),
            'lr_scheduler': solver.lr_scheduler.state_dict(),
        }
    )


def restore(solver, state: dict) -> None:
    solver.model.load_state_dict(state['model'])
    solver.optimizer.load_state_dict(state['optimizer'])
    solver.lr_scheduler.load_state_dict(state['lr_scheduler'])


def test_training_starts_from_the_package_weights(in_xp, demo_overrides, tiny_package, monkeypatch):
    reads: list[str] = []
    original = package.load_file
    monkeypatch.setattr(package, 'load_file', lambda pkg, name: reads.append(name) or original(pkg, name))
    solver = in_xp(demo_overrides)
    solver.restore()  # the package's LM file is read once for the config and the initial weights
    assert sorted(reads) == sorted([package.LM_FILE, package.COMPRESSION_FILE])
    solver = in_xp(demo_overrides)
    expected = package.lm_state(str(tiny_package))
    before = {k: v.clone() for k, v in solver.model.state_dict().items()}
    assert any(not torch.equal(before[k], expected[k]) for k in expected), 'the LM should start random before restore'
    solver.restore()
    for key, value in solver.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # The EMA starts from the same weights.
    for key, value in solver.ema.state_dict()['state']['model'].items():
        assert torch.equal(value, expected[key].to(value)), key


def test_gradient_accumulation_matches_a_larger_batch(in_xp, demo_overrides):
    """2 micro-batches of 4 give the optimizer the gradient of one batch of 8 (compared before AdamW, whose
    per-parameter normalisation would amplify float rounding of near-zero gradients)."""
    overrides = demo_overrides + [
        'classifier_free_guidance.training_dropout=0',
        'optim.max_norm=0',
        'schedule.cosine.warmup=0',
    ]
    solver = in_xp(overrides)
    solver.restore()
    audio, infos = one_batch(solver, 8)
    initial = snapshot(solver)
    grads: list[dict] = []
    step = solver.optimizer.step

    def spy(*args, **kwargs):
        grads.append({n: p.grad.clone() for n, p in solver.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    solver.optimizer.step = spy

    def accumulated_then_whole() -> dict:
        solver.run_step(0, [(audio[:4], infos[:4]), (audio[4:], infos[4:])], {})
        accumulated = copy.deepcopy(solver.model.state_dict())
        restore(solver, initial)
        solver.run_step(0, [(audio, infos)], {})
        return accumulated

    accumulated = in_stage(solver, 'train', accumulated_then_whole)
    assert len(grads) == 2 and grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-4, atol=1e-7)
    assert any(not torch.equal(accumulated[k], initial['model'][k]) for k in accumulated), 'the step moved nothing'


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
    batch = one_batch(solver, 4)
    metrics = in_stage(solver, 'train', lambda: solver.run_step(0, [batch], {}))
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
    solver.guard.skip(torch.tensor(float('nan')), 'epoch 1 update 1', solver.checkpoint_path())
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
    seen = {}

    def bad_then_good() -> None:
        hook = solver.model.linears[0].weight.register_hook(lambda grad: grad * float('nan'))
        seen['bad'] = solver.run_step(0, [batch], {})
        hook.remove()
        seen['weights'] = copy.deepcopy(solver.model.state_dict())
        seen['lr_epoch'], seen['moments'] = solver.lr_scheduler.last_epoch, dict(solver.optimizer.state)
        seen['good'] = solver.run_step(1, [batch], {})

    in_stage(solver, 'train', bad_then_good)
    assert seen['bad']['skipped'] == 1
    for key, value in seen['weights'].items():
        assert torch.equal(value, weights[key]), key
    assert seen['lr_epoch'] == lr_epoch and not seen['moments']
    assert seen['good']['skipped'] == 0
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
    from solvers.generation import audio_io

    solver = in_xp(demo_overrides)
    solver.restore()
    metrics = in_stage(solver, 'generate', solver.generate)
    files = sorted((solver.folder / 'samples' / 'epoch_001').glob('*.wav'))
    assert len(files) == len(solver.sample_prompts()) == solver.cfg.generate.prompts_from_dataset
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
    batch = one_batch(solver, 4)
    metrics = in_stage(solver, 'train', lambda: solver.run_step(0, [batch], {}))
    assert math.isfinite(float(metrics['ce'])) and metrics['mem_gb'] > 0


def test_valid_reads_every_clip_once_without_num_samples(in_xp, demo_overrides, tiny_dataset):
    """Prepared presets leave dataset.valid.num_samples null: valid must read one segment of each valid clip."""
    from audiocraft.utils.utils import get_dataset_from_loader

    from solvers import data as dataprep

    solver = in_xp(demo_overrides)
    assert solver.cfg.dataset.valid.num_samples == len(dataprep.read_manifest(tiny_dataset['valid']))
    dataset = get_dataset_from_loader(solver.dataloaders['valid'])
    paths = [info.meta.path for _, info in (dataset[i] for i in range(len(dataset)))]
    assert sorted(paths) == sorted(m.path for m in dataset.meta)  # each clip exactly once


def test_a_failed_valid_stage_keeps_the_epochs_training(in_xp, demo_overrides, monkeypatch):
    overrides = demo_overrides + ['optim.epochs=1', 'generate.prompts=[]']
    solver = in_xp(overrides)

    def broken_valid():
        raise RuntimeError('valid broke')

    monkeypatch.setattr(solver, 'valid', broken_valid)
    with pytest.raises(RuntimeError, match='valid broke'):
        solver.run()
    step = ckpt_load(solver.folder / 'checkpoint_step.th')
    assert step['position']['update'] == solver.train_updates_per_epoch and step['history'] == []
    trained = {k: v.clone() for k, v in solver.model.state_dict().items()}

    again = in_xp(overrides)  # the re-run: same command, same XP
    steps = []
    run_step = again.run_step
    monkeypatch.setattr(again, 'run_step', lambda *a: steps.append(again.current_stage) or run_step(*a))
    again.run()
    assert 'train' not in steps and 'valid' in steps  # no update repeated: straight to the stage that failed
    assert len(again.history) == 1 and not (again.folder / 'checkpoint_step.th').exists()
    saved = ckpt_load(again.folder / 'checkpoint.th')
    for key, value in trained.items():
        assert torch.equal(saved['model'][key], value), key


def test_ema_moves_after_the_first_update_even_in_a_short_run(in_xp, demo_overrides):
    solver = in_xp(demo_overrides + ['optim.ema.updates=1000', 'optim.epochs=1', 'generate.prompts=[]'])
    solver.run()
    ema = solver.ema.state_dict()['state']['model']
    base = package.lm_state(solver.package)
    assert any(not torch.equal(ema[k], base[k].to(ema[k])) for k in ema), 'the EMA must not equal the base weights'


def test_a_full_disk_stops_with_what_was_kept(in_xp, demo_overrides, monkeypatch):
    import errno

    from solvers import atomic
    from solvers.models import checkpoint_io

    solver = in_xp(demo_overrides + ['optim.epochs=2', 'generate.prompts=[]'])
    solver.run_epoch()
    solver.commit()  # epoch 1 saved normally

    def full(state, path):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(atomic, 'save_torch', full)
    solver.run_epoch()
    with pytest.raises(checkpoint_io.CheckpointError) as err:
        solver.commit()
    message = str(err.value)
    assert 'is full' in message and 'checkpoint.th is intact and holds 1 completed epoch' in message
    assert 're-run the same command' in message
    assert len(ckpt_load(solver.folder / 'checkpoint.th')['history']) == 1


def test_samples_default_to_the_datasets_captions(in_xp, demo_overrides, tiny_dataset):
    from solvers import data as dataprep

    solver = in_xp(demo_overrides + ['generate.prompts=null'])
    prompts = solver.sample_prompts()
    captions = dataprep.manifest_captions(tiny_dataset['valid'], 10) + dataprep.manifest_captions(
        tiny_dataset['train'], 10
    )
    assert len(prompts) == solver.cfg.generate.prompts_from_dataset and set(prompts) <= set(captions)
    assert in_xp(demo_overrides + ['generate.prompts=[]']).sample_prompts() == []


def test_model_from_package_takes_the_architecture_of_any_package(in_xp, demo_overrides, tmp_path):
    odd = build_tiny_package(
        tmp_path / 'odd',
        overrides=('transformer_lm.num_layers=3', 'transformer_lm.dim=32', 'transformer_lm.num_heads=2'),
    )
    overrides = [o for o in demo_overrides if not o.startswith('pretrained=')]
    with pytest.raises(package.PackageError, match=f'model=from_package pretrained={odd}'):
        in_xp(overrides + [f'pretrained={odd}'])  # the tiny preset is checked against the package...
    solver = in_xp(overrides + ['model=from_package', f'pretrained={odd}'])  # ...from_package adopts it
    assert (solver.cfg.transformer_lm.num_layers, solver.cfg.transformer_lm.dim) == (3, 32)
    solver.restore()
    for key, value in package.lm_state(str(odd)).items():
        assert torch.equal(solver.model.state_dict()[key], value), key
