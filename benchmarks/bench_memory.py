"""Calibrate and check the memory planner (solvers/training/memory.py) against measured training steps.

``calibrate``: builds small random LMs with the custom attention that medium uses (fused in_proj_weight, SDPA), runs
one training forward (delay pattern, cross-entropy as the solver computes it) and counts the bytes autograd saves for
the backward (its saved tensors, each storage once), with and without activation checkpointing. Varying the layer
count and the codebook size separates the per-layer cost (in multiples of D per token) from the logits' cost (per token
and bin), which is what ``memory.ACTIVATION_MODEL`` holds. Prints measured vs planned for every config.

``medium``: the planner's parameter counts for medium's exact architecture (built on the meta device), full and LoRA,
against a real build of the same LM on the CPU (random weights, T5 replaced by a lookup table of its width).

    python benchmarks/bench_memory.py calibrate
    python benchmarks/bench_memory.py medium
"""

from __future__ import annotations

import argparse
import sys
import time
import typing as tp
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from solvers import project  # noqa: E402
from solvers.training import memory

TINY = ['solver=audiogen/tiny', 'transformer_lm.hidden_scale=4', 'transformer_lm.dropout=0.0']


def _lm(overrides: list[str]) -> tuple[tp.Any, tp.Any]:
    from audiocraft.models import builders

    cfg = project.compose([*TINY, *overrides])
    cfg.device = 'cpu'
    torch.manual_seed(0)
    return cfg, builders.get_lm_model(cfg).train()


def measured_bytes(cfg: tp.Any, lm: tp.Any, batch: int, frames: int) -> int:
    """Saved-tensor bytes of one training forward of ``batch`` clips of ``frames`` codec frames."""
    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft.solvers.musicgen import MusicGenSolver

    codes = torch.randint(0, int(cfg.transformer_lm.card), (batch, int(cfg.transformer_lm.n_q), frames))
    attributes = [ConditioningAttributes(text={'description': f'sound {i}'}) for i in range(batch)]

    def step() -> torch.Tensor:
        tokenized = lm.condition_provider.tokenize(attributes)
        condition_tensors = lm.condition_provider(tokenized)
        out = lm.compute_predictions(codes, [], condition_tensors)
        ce, _ = MusicGenSolver._compute_cross_entropy(None, out.logits, codes, out.mask)  # type: ignore[arg-type]
        return ce

    return memory.measure_activation_bytes(step, exclude=list(lm.parameters()))


def run_calibrate(args: argparse.Namespace) -> int:
    print('| dim | layers | card | checkpointing | batch x frames | measured MB | planned MB | planned/measured |')
    print('|---|---|---|---|---|---|---|---|')
    worst = 0.0
    for dim, layers, card in ((64, 2, 256), (64, 4, 256), (128, 4, 256), (128, 4, 1024), (256, 2, 1024)):
        for checkpointing in ('none', 'torch'):
            overrides = [
                f'transformer_lm.dim={dim}',
                f'transformer_lm.num_layers={layers}',
                f'transformer_lm.card={card}',
                f'transformer_lm.checkpointing={checkpointing}',
                f'dataset.segment_duration={args.seconds}',
                f'dataset.batch_size={args.batch}',
            ]
            cfg, lm = _lm(overrides)
            frames = int(args.seconds * 50)
            got = measured_bytes(cfg, lm, args.batch, frames)
            planned = memory.activation_bytes(cfg, args.batch, peak=False)
            worst = max(worst, abs(planned / got - 1))
            print(
                f'| {dim} | {layers} | {card} | {checkpointing} | {args.batch} x {frames} | {got / 1e6:.1f} | '
                f'{planned / 1e6:.1f} | {planned / got:.2f} |',
                flush=True,
            )
    print(f'\nlargest planner error: {worst:.0%}')
    cfg, lm = _lm(['transformer_lm.dim=128', 'transformer_lm.num_layers=4', 'transformer_lm.card=1024'])
    fp32 = measured_bytes(cfg, lm, args.batch, int(args.seconds * 50))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bf16 = measured_bytes(cfg, lm, args.batch, int(args.seconds * 50))
    print(f'bf16 autocast (CPU) / fp32 saved bytes: {bf16 / fp32:.2f} (planner: {memory.AUTOCAST_ACTIVATION_RATIO})')
    return 0


def run_medium(args: argparse.Namespace) -> int:
    from audiocraft.models import builders

    from solvers.models import adapters

    for adapter in ('none', 'lora'):
        cfg = project.compose(['solver=audiogen/train', f'adapter={adapter}'])
        begin = time.perf_counter()
        counts = memory.count(cfg)
        planned_s = time.perf_counter() - begin
        real = project.compose(
            [
                'solver=audiogen/train',
                f'adapter={adapter}',
                'device=cpu',
                'conditioners.description.model=lut',
                'conditioners.description.lut.n_bins=1',
                'conditioners.description.lut.dim=1024',
                'conditioners.description.lut.tokenizer=noop',
            ]
        )
        begin = time.perf_counter()
        lm = builders.get_lm_model(real)
        if adapter == 'lora':
            adapters.inject_lora(lm, real.adapter)
        built_s = time.perf_counter() - begin
        total = sum(p.numel() for p in lm.parameters()) - 1024
        trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
        trainable -= 1024 if lm.condition_provider.conditioners['description'].embed.weight.requires_grad else 0
        print(
            f'adapter={adapter}: planner LM {counts.lm:,} ({counts.trainable:,} trainable) in {planned_s:.1f} s; '
            f'built on CPU {total:,} ({trainable:,} trainable) in {built_s:.1f} s; '
            f'{"equal" if (total, trainable) == (counts.lm, counts.trainable) else "DIFFERENT"}',
            flush=True,
        )
        del lm
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='mode', required=True)
    cal = sub.add_parser('calibrate', help='activation bytes: measured vs planned')
    cal.add_argument('--batch', type=int, default=2)
    cal.add_argument('--seconds', type=float, default=2.0)
    sub.add_parser('medium', help="parameter counts at medium's architecture: planner vs a real CPU build")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return run_calibrate(args) if args.mode == 'calibrate' else run_medium(args)


if __name__ == '__main__':
    sys.exit(main())
