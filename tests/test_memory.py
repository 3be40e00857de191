"""The memory planner (solvers/training/memory.py, scripts/plan_memory.py) and what training does when a step runs out
of memory.

Counts are checked against real builds of the same config, activations against autograd's saved tensors of a real
training forward; the medium-size figures are in docs/benchmarks.md (benchmarks/bench_memory.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import ROOT, subprocess_env

from scripts import plan_memory
from solvers import project
from solvers.errors import AudiogenError
from solvers.models import adapters, checkpoint_io
from solvers.training import memory

TINY = ['solver=audiogen/tiny']


def _built_counts(cfg) -> tuple[int, int]:
    from audiocraft.models import builders

    cfg.device = 'cpu'
    lm = builders.get_lm_model(cfg)
    if adapters.enabled(cfg):
        adapters.inject_lora(lm, cfg.adapter)
    return sum(p.numel() for p in lm.parameters()), sum(p.numel() for p in lm.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    'extra', [[], ['adapter=lora'], ['adapter=lora', 'adapter.targets=[self_qkv,cross_qkv]'], ['freeze.first_layers=1']]
)
def test_planner_counts_equal_the_built_model(extra):
    cfg = project.compose([*TINY, *extra])
    counts = memory.count(cfg)
    total, trainable = _built_counts(cfg)
    if cfg.freeze.first_layers:
        lm = memory.build_on_meta(cfg)
        assert counts.trainable == sum(p.numel() for p in lm.parameters() if p.requires_grad) < total
    else:
        assert (counts.lm, counts.trainable) == (total, trainable)
    assert counts.t5 == 0  # the tiny model's text conditioner is a lookup table inside the LM


@pytest.mark.parametrize('checkpointing', ['none', 'torch'])
@pytest.mark.parametrize('adapter', ['none', 'lora'])
def test_planned_activations_match_what_autograd_saves(checkpointing, adapter):
    """With LoRA, the rebuilt fused q/k/v weights and the dropout copies count too (medium: +4.1 GB at 8 x 10 s)."""
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    import bench_memory

    overrides = [
        'transformer_lm.dim=128',
        'transformer_lm.num_layers=3',
        f'transformer_lm.checkpointing={checkpointing}',
        'dataset.segment_duration=1.0',
        'dataset.batch_size=2',
        f'adapter={adapter}',
    ]
    cfg, lm = bench_memory._lm(overrides)
    if adapters.enabled(cfg):
        adapters.inject_lora(lm, cfg.adapter)
        lm.train()
    measured = bench_memory.measured_bytes(cfg, lm, 2, 50)
    planned = memory.activation_bytes(cfg, 2, peak=False) + memory.lora_fused_weight_bytes(cfg, peak=False)
    assert planned == pytest.approx(measured, rel=0.15)
    assert memory.activation_bytes(cfg, 2) > memory.activation_bytes(cfg, 2, peak=False)


def test_levers_make_a_plan_fit_and_keep_the_effective_batch():
    # The tiny LM (with medium's codec size) "on a GPU" of 1.12 GB: the CUDA context and the codec take 1.07 GB, so
    # only smaller micro-batches help.
    overrides = [*TINY, 'device=cuda', 'dataset.batch_size=8', 'dataset.segment_duration=10']
    assert not memory.plan(project.compose(overrides), 1.12).fits
    fitted = memory.make_it_fit(overrides, 1.12, project.compose)
    assert fitted is not None and fitted.fits
    cfg = project.compose(fitted.overrides)
    assert cfg.dataset.batch_size * cfg.optim.grad_accum_steps == 8 and cfg.dataset.batch_size < 8
    assert memory.make_it_fit(overrides, 1.0, project.compose) is None  # below context + codec: nothing fits


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m scripts.plan_memory ARGS` as a user types it, in a new interpreter."""
    return subprocess.run(
        [sys.executable, '-m', 'scripts.plan_memory', *args],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    """The same command line through the CLI's ``main`` in this process (no second audiocraft import, ~7 s)."""
    capsys.readouterr()
    code = plan_memory.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_memory_cli_answers_in_lines_and_exit_codes(capsys):
    bad = _plan_cli('solver=audiogen/tiny', 'optim.lrr=1')  # the entry point, and a start-up with nothing else to say
    assert bad.returncode == 2 and bad.stderr.count('\n') == 1 and 'optim.lr' in bad.stderr, bad.stderr
    code, out, err = _plan(capsys, 'solver=audiogen/tiny', '--gpu-gb', '24')
    assert code == 0, err
    assert 'fits in 24 GB' in out and 'activations (8 x 10 s)' in out
    code, _, err = _plan(capsys, 'solver=audiogen/tiny', '--gpu-gb', '0')
    assert code == 2 and err.count('\n') == 1 and '--gpu-gb must be > 0' in err, err


@pytest.mark.slow
def test_medium_on_24_gb_needs_lora_and_checkpointing(capsys):
    """The README's single-GPU advice, as the planner computes it for medium's real architecture."""
    code, out, err = _plan(capsys, 'solver=audiogen/train', '--gpu-gb', '24')
    assert code == 3, out + err
    assert 'LM 1,839.1M (1,839.1M trainable)' in out, out
    assert 'add: adapter=lora transformer_lm.checkpointing=torch' in out, out
    code, out, err = _plan(
        capsys, 'solver=audiogen/train', 'adapter=lora', 'transformer_lm.checkpointing=torch', '--gpu-gb', '24'
    )
    assert code == 0 and 'fits in 24 GB' in out, out + err


def test_out_of_memory_in_training_says_what_fits_and_keeps_the_checkpoint(in_xp, demo_overrides, monkeypatch):
    solver = in_xp(demo_overrides + ['optim.epochs=2', 'optim.updates_per_epoch=2', 'generate.prompts=[]'])
    real_step = solver.run_step

    def step(idx, batch, metrics):
        if solver.is_training and solver.epoch == 2:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
        return real_step(idx, batch, metrics)

    monkeypatch.setattr(solver, 'run_step', step)
    with pytest.raises(AudiogenError) as caught:
        solver.run()
    message = str(caught.value)
    assert message.startswith('Out of GPU memory in update 1 of epoch 2 (CUDA out of memory.')
    assert 'The planner expected' in message and 'total' in message
    assert 'Re-run with' in message and 'holds the last checkpoint' in message
    state = checkpoint_io.safe_load(solver.checkpoint_path())
    assert len(state['history']) == 1  # epoch 1, whole; nothing of epoch 2
