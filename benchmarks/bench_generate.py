"""Benchmark: scripts/generate.py against calling audiocraft's AudioGen.generate directly, same model and settings.

Both arms run in this process, interleaved, several repetitions each, after one untimed warm-up of each:

    python benchmarks/bench_generate.py [--size tiny|small] [--prompts 2] [--variations 4] [--duration 5]
                                        [--max-batch 8] [--repeats 5] [--threads 1] [--device cpu]

- end to end (what a user waits for, minus interpreter start and imports):
    ours:  scripts.generate.main([...]) in-process: resolve + load the package, per-item seeded sampling, clip-wise
           decoding, loudness normalisation, WAV + JSON sidecar writes.
    stock: AudioGen.get_pretrained(package) + set_generation_params + AudioGen.generate over the same batches
           (no files written).
- generation only (model already loaded, one shared model instance):
    ours:  solvers.generation.run(model, ...) (sampling, decoding, normalisation and writes)
    stock: AudioGen.generate over the same batches.

Real-time factor (RTF) = wall seconds / seconds of audio produced (lower is faster). The ratio is ours / stock
(goal: <= 1.05). The model is a freshly built tiny package (``--size small`` makes the LM 8 layers x 512 wide so the
LM dominates as it does for the medium model); the real target is facebook/audiogen-medium on a GPU
(``--model facebook/audiogen-medium --device cuda``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
PROMPTS = ['dog barking', 'sirens of an emergency vehicle', 'rain on a tin roof', 'a door slamming shut',
           'footsteps on gravel', 'wind howling through trees', 'a crowd applauding', 'glass shattering']
SIZES = {'tiny': (), 'small': ('transformer_lm.dim=512', 'transformer_lm.num_heads=8', 'transformer_lm.num_layers=8')}


def main(argv: list[str] | None = None) -> int:
    """Run both arms and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', help='a package dir or HF id (default: build a tiny package of --size)')
    parser.add_argument('--size', choices=sorted(SIZES), default='tiny')
    parser.add_argument('--prompts', type=int, default=2, help='number of prompts (at most 8)')
    parser.add_argument('--variations', type=int, default=4, help='seeds per prompt')
    parser.add_argument('--duration', type=float, default=5.0)
    parser.add_argument('--max-batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (1 keeps timings stable)')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    import torch

    from scripts import generate as generate_cli
    from solvers import generation

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix='bench_generate_'))
    if args.model:
        model_ref = args.model
    else:
        from solvers.tiny import build_tiny_package
        model_ref = str(build_tiny_package(tmp / 'pkg', seed=0, overrides=SIZES[args.size]))
    prompts = PROMPTS[:args.prompts]
    seeds = list(range(args.variations))
    audio_seconds = len(prompts) * len(seeds) * args.duration
    cli_args = [*prompts, '--model', model_ref, '--batch_size', str(args.variations), '--duration',
                str(args.duration), '--max-batch', str(args.max_batch), '--device', args.device, '--no-progress']
    params = generation.GenerationParams(duration=args.duration)
    counter = iter(range(10 ** 6))

    def sync() -> None:
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()

    def stock_generate(model) -> None:
        params.apply(model)  # same settings as ours: top_k 250, cfg 3, same extend_stride
        items = [generation.Item(p, s) for p in prompts for s in seeds]
        batches = generation.plan_batches(items, args.max_batch,
                                          key=lambda p: generation.conditioning_shape(model, p))
        for batch in batches:
            model.generate([i.prompt for i in batch])
        sync()

    def ours_e2e() -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # the CLI's summary lines
            assert generate_cli.main([*cli_args, '--out', str(tmp / f'e2e{next(counter)}')]) == 0
        sync()

    def stock_e2e() -> None:
        from audiocraft.models import AudioGen
        stock_generate(AudioGen.get_pretrained(model_ref, device=args.device))

    source = generation.resolve_model(model_ref)
    shared = generation.load_model(source, args.device)

    def ours_gen() -> None:
        cfg = generation.RunConfig(prompts=list(prompts), seeds=seeds, params=params, out=tmp / f'gen{next(counter)}',
                                   max_batch=args.max_batch, progress=False)
        generation.run(shared, source, cfg, args.device)
        sync()

    def stock_gen() -> None:
        stock_generate(shared)

    arms = {'end to end': (ours_e2e, stock_e2e), 'generation only': (ours_gen, stock_gen)}
    times: dict[tuple[str, str], list[float]] = {}
    for name, (ours, stock) in arms.items():
        ours(), stock()  # warm-up: first-call allocations, lazy imports
        for _ in range(args.repeats):
            for label, fn in (('ours', ours), ('stock', stock)):
                begin = time.perf_counter()
                fn()
                times.setdefault((name, label), []).append(time.perf_counter() - begin)

    print(f"\nmodel: {model_ref if args.model else f'tiny package, --size {args.size}'}; device {args.device}, "
          f"{args.threads} thread(s); {len(prompts)} prompts x {len(seeds)} variations x {args.duration:g} s "
          f"= {audio_seconds:g} s of audio per run; max batch {args.max_batch}; median of {args.repeats}")
    print("\n| measure | ours (s) | stock (s) | ours RTF | stock RTF | ratio ours/stock |")
    print("|---|---|---|---|---|---|")
    for name in arms:
        ours_t, stock_t = (statistics.median(times[(name, label)]) for label in ('ours', 'stock'))
        print(f"| {name} | {ours_t:.2f} | {stock_t:.2f} | {ours_t / audio_seconds:.3f} | "
              f"{stock_t / audio_seconds:.3f} | {ours_t / stock_t:.3f} |")
    spread = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in times.items()}
    print(f"\nranges (min-max s): {spread}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
