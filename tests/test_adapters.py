"""LoRA adapters, freezing and the other memory levers, on the tiny package (same custom attention as medium)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from helpers import in_stage, one_batch

from solvers.errors import AudiogenError
from solvers.models import adapters, package

# warmup 0: the first update already moves the weights (the cosine warmup starts at lr 0).
LORA = ['adapter=lora', 'schedule.cosine.warmup=0']


def plain_lm(pkg) -> torch.nn.Module:
    """The package's LM as plain audiocraft builds it (no adapters), in eval mode."""
    from solvers.models.lm import build_lm_model

    cfg = package.lm_config(str(pkg))
    cfg.device, cfg.dtype = 'cpu', 'float32'
    lm = build_lm_model(cfg)
    lm.load_state_dict(package.lm_state(str(pkg)))
    return lm.eval()


def logits(lm, solver, audio, infos) -> torch.Tensor:
    """Eval-mode logits of ``lm`` on a batch prepared by the solver (no CFG dropout: the model is in eval mode)."""
    with torch.no_grad():
        solver.model.eval()
        provider = solver.model.condition_provider
        conditions = provider(provider.tokenize([info.to_condition_attributes() for info in infos]))
        tokens, _ = solver.compression_model.encode(audio.to(solver.device))
        lm.eval()
        return lm.compute_predictions(tokens, [], conditions).logits


def serialized_size(state) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def test_lora_starts_equal_to_the_base_and_only_adapters_train(in_xp, demo_overrides, tiny_package):
    solver = in_xp(demo_overrides + LORA)
    solver.restore()
    audio, infos = one_batch(solver, 4)
    # The tiny stand-in runs medium's attention path: the fused q/k/v Parameter is adapted through peft.
    assert solver.cfg.transformer_lm.memory_efficient
    wrapped = type(solver.model.transformer.layers[0].self_attn).__name__
    assert wrapped == 'ParamWrapper', wrapped
    # Before the first step the adapted model computes exactly what the base model computes.
    assert torch.allclose(
        logits(solver.model, solver, audio, infos),
        logits(plain_lm(tiny_package), solver, audio, infos),
        rtol=0,
        atol=0,
        equal_nan=True,
    )
    before = {k: v.clone() for k, v in solver.model.state_dict().items()}
    in_stage(solver, 'train', lambda: solver.run_step(0, [(audio, infos)], {}))
    after = solver.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all('.lora_' in k for k in changed), sorted(changed)[:5]
    # q/k/v, out_proj and the FFN all have adapters that moved (lora_B starts at zero).
    for part in ('self_attn.lora_B', 'cross_attention.lora_B', 'out_proj.lora_B', 'linear1.lora_B', 'linear2.lora_B'):
        assert any(part in k for k in changed), part
    # Only adapter parameters reach the optimizer, the EMA and the checkpoint.
    optimized = {id(p) for group in solver.optimizer.param_groups for p in group['params']}
    assert optimized == {id(p) for p in solver.adapter.parameters()}
    assert set(solver.ema.state_dict()['state']['model']) == set(solver.adapter.state_dict())
    state = solver.state_dict()
    assert set(state['model']) == set(solver.adapter.state_dict()) and state['adapter_layout']
    assert all('.lora_' in k for k in state['best_state']['model'])


def test_lora_checkpoint_is_a_small_fraction_of_a_full_one(in_xp, demo_overrides):
    full = in_xp(demo_overrides)
    full.restore()
    full_size = serialized_size(full.state_dict())
    lora = in_xp(demo_overrides + LORA + ['adapter.rank=2'])
    lora.restore()
    lora_size = serialized_size(lora.state_dict())
    assert lora_size < 0.2 * full_size, (lora_size, full_size)


def test_dropout_applies_to_linear_targets_and_qkv_keeps_its_own_adapter(in_xp, demo_overrides):
    solver = in_xp(demo_overrides + LORA + ['adapter.dropout=0.1'])
    layer = solver.model.transformer.layers[0]
    assert set(layer.self_attn.lora_A) == {adapters.PARAM_ADAPTER}  # the fused q/k/v: no dropout in peft
    assert isinstance(layer.linear1.lora_dropout[adapters.MODULE_ADAPTER], torch.nn.Dropout)
    assert layer.linear1.lora_dropout[adapters.MODULE_ADAPTER].p == 0.1


def test_merged_state_equals_the_adapter_model(in_xp, demo_overrides, tiny_package):
    """merge_state (W += scaling B A, no model build) gives the same logits as peft's unmerged forward."""
    solver = in_xp(
        demo_overrides + LORA + ['adapter.targets=[self_qkv,cross_qkv,self_out,cross_out,ffn,heads,text_proj]']
    )
    solver.restore()
    torch.manual_seed(0)
    with torch.no_grad():
        for param in solver.adapter.parameters():
            param.normal_(0, 0.05)  # non-zero A and B: a trained adapter
    audio, infos = one_batch(solver, 3)
    expected = logits(solver.model, solver, audio, infos)
    merged = adapters.merge_state(
        package.lm_state(str(tiny_package)), solver.adapter.state_dict(), solver.adapter_layout
    )
    lm = plain_lm(tiny_package)
    lm.load_state_dict(merged)
    assert torch.allclose(logits(lm, solver, audio, infos), expected, atol=1e-5, equal_nan=True)
    assert not torch.allclose(logits(plain_lm(tiny_package), solver, audio, infos), expected, atol=1e-3, equal_nan=True)


def test_freezing_keeps_the_chosen_parts(in_xp, demo_overrides):
    solver = in_xp(
        demo_overrides
        + ['schedule.cosine.warmup=0', 'freeze.first_layers=1', 'freeze.embeddings=true', 'freeze.conditioner=true']
    )
    solver.restore()
    before = {k: v.clone() for k, v in solver.model.state_dict().items()}
    audio, infos = one_batch(solver, 4)
    in_stage(solver, 'train', lambda: solver.run_step(0, [(audio, infos)], {}))
    after = solver.model.state_dict()
    frozen = ('transformer.layers.0.', 'emb.', 'condition_provider.conditioners.description.output_proj.')
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    assert not any(key.startswith(frozen) for key in moved), sorted(moved)
    # Everything else trains (norm_cross gets no gradient here: one condition token makes cross-attention
    # independent of its query).
    assert {k for k in before if not k.startswith(frozen) and 'norm_cross' not in k} == moved - {
        k for k in moved if 'norm_cross' in k
    }
    optimized = sum(p.numel() for g in solver.optimizer.param_groups for p in g['params'])
    assert optimized == adapters.count(solver.model)[0]


def test_activation_checkpointing_gives_the_same_gradients(in_xp, demo_overrides):
    grads = []
    for mode in ('none', 'torch'):
        torch.manual_seed(0)  # the same random LoRA A matrices in both runs
        solver = in_xp(
            demo_overrides
            + LORA
            + [
                f'transformer_lm.checkpointing={mode}',
                'classifier_free_guidance.training_dropout=0',
                'adapter.dropout=0',
            ]
        )
        solver.restore()
        audio, infos = one_batch(solver, 4)
        captured = {}
        step = solver.optimizer.step

        def spy(*args, captured=captured, solver=solver, step=step, **kwargs):
            captured.update({n: p.grad.clone() for n, p in solver.adapter.named_parameters()})
            return step(*args, **kwargs)

        solver.optimizer.step = spy
        in_stage(solver, 'train', lambda s=solver, b=[(audio, infos)]: s.run_step(0, b, {}))
        grads.append(captured)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_eight_bit_adamw_steps_and_keeps_8_bit_moments(in_xp, demo_overrides):
    solver = in_xp(demo_overrides + LORA + ['optim.optimizer=adamw8bit', 'adapter.rank=64'])
    solver.restore()
    audio, infos = one_batch(solver, 4)
    metrics = in_stage(solver, 'train', lambda: solver.run_step(0, [(audio, infos)], {}))
    assert metrics['skipped'] == 0
    moments = [v for state in solver.optimizer.state.values() for k, v in state.items() if k == 'state1']
    assert moments and any(m.dtype == torch.uint8 for m in moments)


@pytest.mark.parametrize(
    'override, message',
    [
        ('fsdp.use=true', 'fsdp.use=true is not supported'),
        ('optim.eager_sync=true', 'optim.eager_sync=true all-reduces gradients during the backward'),
        ('adapter.targets=[qkv]', "adapter.targets=['qkv']: choose among"),
        ('adapter.rank=0', 'adapter.rank=0 must be a positive integer'),
    ],
)
def test_settings_that_cant_be_honoured_are_refused_by_name(in_xp, demo_overrides, override, message):
    extra = LORA if override.startswith('adapter') else ['optim.grad_accum_steps=2']
    with pytest.raises(AudiogenError, match=message.replace('[', r'\[').replace(']', r'\]')):
        in_xp(demo_overrides + extra + [override])


def test_lora_over_the_non_custom_attention_is_refused_for_qkv(in_xp, demo_overrides, tmp_path):
    from solvers.demo.tiny import build_tiny_package

    pkg = build_tiny_package(tmp_path / 'plain_mha', overrides=('transformer_lm.memory_efficient=false',))
    with pytest.raises(AudiogenError, match='transformer_lm.memory_efficient=true'):
        in_xp(demo_overrides + LORA + [f'pretrained={pkg}', 'transformer_lm.memory_efficient=false'])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_lora_step_on_cuda_with_the_base_in_half_precision(in_xp, demo_overrides, dtype):
    solver = in_xp(
        demo_overrides
        + LORA
        + [
            'device=cuda',
            'autocast=true',
            f'autocast_dtype={dtype}',
            f'adapter.base_dtype={dtype}',
            'optim.ema.device=cpu',
            'optim.optimizer=adamw8bit',
        ]
    )
    solver.restore()
    frozen = [p for p in solver.model.parameters() if not p.requires_grad and p.is_floating_point()]
    assert frozen and all(p.dtype == getattr(torch, dtype) for p in frozen)
    assert all(p.dtype == torch.float32 for p in solver.adapter.parameters())
    audio, infos = one_batch(solver, 4)
    metrics = in_stage(solver, 'train', lambda: solver.run_step(0, [(audio, infos)], {}))
    assert torch.isfinite(metrics['ce'])
    assert all(v.device.type == 'cpu' for v in solver.ema.state_dict()['state']['model'].values())


# ---------------------------------------------------------------------------------------------------- a real LoRA XP
@pytest.fixture(scope='session')
def lora_xp(tmp_path_factory, demo_overrides) -> dict:
    """A LoRA fine-tune of the tiny package through `dora run ... adapter=lora`."""
    from helpers import run_dora

    outputs = tmp_path_factory.mktemp('lora_outputs')
    run_dora(demo_overrides + ['adapter=lora'], outputs)
    (folder,) = list((outputs / 'xps').iterdir())
    return {'folder': folder, 'outputs': outputs}


@pytest.mark.slow
def test_lora_run_checkpoints_megabytes_and_exports_both_ways(lora_xp, trained_xp, tmp_path, monkeypatch):
    from audiocraft.models import AudioGen
    from audiocraft.modules.conditioners import ConditioningAttributes

    from scripts import export as export_cli
    from scripts import generate as generate_cli
    from solvers import train
    from solvers.models import export

    folder = lora_xp['folder']
    assert (folder / 'checkpoint.th').stat().st_size < 0.5 * (trained_xp['folder'] / 'checkpoint.th').stat().st_size
    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(lora_xp['outputs']))
    monkeypatch.setattr(train.main.dora, 'dir', lora_xp['outputs'])
    sig = folder.name

    # Without --merge: the adapters alone (a fraction of the package), loaded over their base by generate.
    assert export_cli.main([sig, str(tmp_path / 'adapters')]) == 0
    assert (tmp_path / 'adapters' / package.ADAPTER_FILE).is_file()
    assert not (tmp_path / 'adapters' / package.LM_FILE).exists()
    lm_bytes = (Path(package.base_of(str(tmp_path / 'adapters'))) / package.LM_FILE).stat().st_size
    assert (tmp_path / 'adapters' / package.ADAPTER_FILE).stat().st_size < 0.5 * lm_bytes
    assert (
        generate_cli.main(
            [
                'a dog barking',
                '--model',
                str(tmp_path / 'adapters'),
                '--batch_size',
                '2',
                '--duration',
                '0.5',
                '--out',
                str(tmp_path / 'out'),
                '--no-progress',
            ]
        )
        == 0
    )
    assert len(list((tmp_path / 'out').rglob('*.wav'))) == 2

    # --merge: a standard package that plain audiocraft loads, with the greedy tokens of the adapter model.
    merged = export.export_xp(sig, tmp_path / 'merged', merge=True)
    model = AudioGen.get_pretrained(str(merged), device='cpu')
    model.set_generation_params(use_sampling=False, duration=1.0, cfg_coef=3.0)
    prompts = ['a dog barking', 'an emergency siren wailing']
    _, merged_tokens = model.generate(prompts, return_tokens=True)
    solver = train.get_solver_from_sig(sig)  # the best adapters over the base, unmerged (peft's forward)
    solver.model.eval()
    attributes = [ConditioningAttributes(text={'description': p}) for p in prompts]
    solver_tokens = solver.model.generate(
        None, attributes, max_gen_len=merged_tokens.shape[-1], use_sampling=False, cfg_coef=3.0
    )
    assert torch.equal(merged_tokens, solver_tokens)
    # The adapter export and the XP signature load the same merged weights as the --merge package.
    for spec in (str(tmp_path / 'adapters'), sig):
        from solvers.generation import generate as generation

        other = generation.load_model(generation.resolve_model(spec), 'cpu')
        for key, value in model.lm.state_dict().items():
            assert torch.equal(other.lm.state_dict()[key], value), (spec, key)


def test_freezing_is_refused_with_lora():
    from solvers import project

    cfg = project.compose(['solver=audiogen/tiny', 'adapter=lora', 'freeze.first_layers=1'])
    with pytest.raises(adapters.AdapterError, match=r'freeze\.first_layers=1 .* adapter=lora already freezes'):
        adapters.check_settings(cfg)
