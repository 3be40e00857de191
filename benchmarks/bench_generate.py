"""Benchmark: our generation against stock audiocraft, same model, same settings, same batches, in one run.

Two modes. Both run their arms in this process, interleaved (the order alternates every repetition), after an
untimed warm-up of each arm, and report the median of the repetitions:

    python benchmarks/bench_generate.py decode [--models tiny small large] [--tokens 5 20] [--batch 1 25]
                                               [--threads 1 2] [--duration 5] [--repeats 3] [--sampling]
    python benchmarks/bench_generate.py decode --model facebook/audiogen-medium --device cuda --dtype bfloat16 \\
                                               --batch 25 --duration 10 --decoders stock fast graph
    python benchmarks/bench_generate.py cli [--size tiny|small] [--prompts 2] [--variations 4] [--duration 5] ...

decode: LM token generation, ``ClipwiseAudioGen._generate_tokens`` (audiocraft's own loop, sliding window included)
    with ``decoder=stock`` (audiocraft's ``LMModel.generate``) against ``decoder=fast``
    (:mod:`solvers.generation.fastgen`) and,
    on CUDA, ``decoder=graph``, on one shared model instance, under the same per-item seeded sampler. Every timed run's
    tokens are compared with stock's: the table says whether they were identical. Greedy decoding (argmax) unless
    ``--sampling`` (top-k 250, temperature 1, per-item seeds). CFG 3 everywhere, so the LM batch is 2 x the items.
    Models are built in memory with random weights (no download): ``tiny`` (2 x 64, the stand-in), ``small``
    (8 x 512), ``large`` (24 x 1024, 16 heads); all with a lookup-table text conditioner of T5-large's width (1024,
    projected to the LM width) whose tokenizer maps each word to one token, so the prompts below give conditions of
    exactly ``--tokens`` tokens. ``--model`` takes a real package or HF id instead (its own text encoder).
cli: the previous benchmark, scripts/generate.py end to end (load, sample, decode, loudness, writes) against
    ``AudioGen.get_pretrained`` + ``AudioGen.generate`` (no files), and ``generation.run`` against
    ``AudioGen.generate`` on one loaded model.

Units: a token here is one frame of the codec (all 4 codebooks, 20 ms of audio) of one item; tokens/s = items x
frames / wall seconds. RTF = wall seconds / seconds of audio produced (lower is faster). Ratio = stock / ours.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import statistics
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
PROMPTS = [
    'dog barking',
    'sirens of an emergency vehicle',
    'rain on a tin roof',
    'a door slamming shut',
    'footsteps on gravel',
    'wind howling through trees',
    'a crowd applauding',
    'glass shattering',
]
# Prompts of exactly 5 and 20 words: with the word tokenizer below, conditions of 5 and 20 tokens (T5 gives ~1.2
# pieces per word plus </s>: similar lengths for the real model).
WORD_PROMPTS = {
    5: 'a dog barks near traffic',
    20: 'heavy rain falls on a tin roof while thunder rolls in the distance and a dog barks near the door',
}
SIZES = {'tiny': (), 'small': ('transformer_lm.dim=512', 'transformer_lm.num_heads=8', 'transformer_lm.num_layers=8')}
DECODE_SIZES = {
    'tiny': ('conditioners.description.lut.dim=1024',),
    'small': (
        'transformer_lm.dim=512',
        'transformer_lm.num_heads=8',
        'transformer_lm.num_layers=8',
        'conditioners.description.lut.dim=1024',
    ),
    'large': (
        'transformer_lm.dim=1024',
        'transformer_lm.num_heads=16',
        'transformer_lm.num_layers=24',
        'conditioners.description.lut.dim=1024',
    ),
}


# ---------------------------------------------------------------------------------------------------- decode
def word_tokenizer(n_bins: int) -> tp.Any:
    """An audiocraft ``Tokenizer`` with one token per whitespace-separated word (hashed into ``n_bins``).

    audiocraft's own ``whitespace`` tokenizer needs a spaCy model that isn't on PyPI; this one needs nothing.
    """
    import torch
    from audiocraft.modules.conditioners import Tokenizer, hash_trick, length_to_mask

    class WordTokenizer(Tokenizer):
        def __call__(self, texts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
            words = [[] if text is None else text.split() for text in texts]
            lengths = torch.tensor([len(w) for w in words], dtype=torch.int)
            tokens = torch.zeros(len(texts), max(1, int(lengths.max())), dtype=torch.long)
            for i, row in enumerate(words):
                tokens[i, : len(row)] = torch.tensor([hash_trick(w, n_bins) for w in row], dtype=torch.long)
            return tokens, length_to_mask(lengths, max_len=tokens.shape[1]).int()

    return WordTokenizer()


def build_random_model(size: str, device: str) -> tp.Any:
    """A ``ClipwiseAudioGen`` around a random LM of ``size`` and the tiny codec, in memory (10 s window)."""
    import torch
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    from solvers.demo import tiny
    from solvers.generation import generate as generation

    torch.manual_seed(0)
    cfg = tiny.tiny_lm_config(DECODE_SIZES[size])
    lm = builders.get_lm_model(cfg).to(device).eval()
    conditioner = lm.condition_provider.conditioners['description']
    conditioner.tokenizer = word_tokenizer(conditioner.embed.num_embeddings)
    OmegaConf.set_struct(cfg, False)
    cfg.dataset.segment_duration = 10.0
    lm.cfg = cfg
    codec = builders.get_compression_model(OmegaConf.create(tiny.TINY_CODEC)).to(device).eval()
    return generation.build_audiogen(f'random-{size}', codec, lm)


def lm_bytes_per_step(model: tp.Any, items: int, frames: int) -> tuple[int, int]:
    """Bytes a decode step must read: the LM's transformer + heads weights, and its KV cache at mid-generation."""
    lm = model.lm
    weights = sum(
        p.numel() * p.element_size() for name, p in lm.named_parameters() if not name.startswith('condition_provider.')
    )
    layer = lm.transformer.layers[0]
    elem = next(iter(lm.parameters())).element_size()
    kv = 2 * len(lm.transformer.layers) * (2 * items) * layer.self_attn.embed_dim * (frames // 2) * elem
    return weights, kv


def run_decode(args: argparse.Namespace) -> int:
    """The decode benchmark: a Markdown table of stock vs ours (and graph on CUDA)."""
    import torch

    from solvers.generation import generate as generation

    device = args.device
    decoders = args.decoders or (['stock', 'fast', 'graph'] if device.startswith('cuda') else ['stock', 'fast'])
    params = generation.GenerationParams(
        duration=args.duration, top_k=250 if args.sampling else 0, temperature=1.0 if args.sampling else 0.0
    )
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    rows = []
    print(
        f'device {device}; {args.duration:g} s clips; {"top-k 250 sampling" if args.sampling else "greedy"}, '
        f'CFG 3; median of {args.repeats} after a warm-up; arms: {", ".join(decoders)}',
        flush=True,
    )
    for size in (args.model and [args.model]) or args.models:
        if args.model:
            source = generation.resolve_model(args.model)
            model = generation.load_model(source, device, dtype=args.dtype)
        else:
            model = build_random_model(size, device)
        frames = int(args.duration * model.frame_rate)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for tokens in args.tokens:
                prompt = WORD_PROMPTS[tokens]
                for batch in args.batch:
                    row = time_decoders(
                        model,
                        prompt,
                        batch,
                        params,
                        decoders,
                        args.repeats,
                        sync,
                        profile=args.profile and batch == max(args.batch),
                    )
                    row.update(model=size, threads=threads, tokens=tokens, batch=batch, frames=frames)
                    rows.append(row)
                    print_row(row, decoders, args.duration, header=len(rows) == 1)
        if device.startswith('cuda'):
            weights, kv = lm_bytes_per_step(model, max(args.batch), frames)
            bandwidth = args.bandwidth * 1e9
            print(
                f'\nroofline for {size} at batch {max(args.batch)} x CFG: weights {weights / 1e9:.2f} GB + KV cache '
                f'{kv / 1e9:.2f} GB (mid-clip) per step / {args.bandwidth:g} GB/s = '
                f'{(weights + kv) / bandwidth * 1e3:.2f} ms per step, '
                f'{(weights + kv) / bandwidth * (frames + 3):.2f} s per batch'
            )
        del model
    return 0


def time_decoders(
    model: tp.Any,
    prompt: str,
    batch: int,
    params: tp.Any,
    decoders: list[str],
    repeats: int,
    sync: tp.Callable[[], None],
    profile: bool = False,
) -> dict:
    """Median wall seconds of ``_generate_tokens`` per decoder, and whether every run's tokens equal stock's."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    from solvers.generation import generate as generation

    attributes = [ConditioningAttributes(text={'description': prompt}) for _ in range(batch)]
    seeds = list(range(batch))

    def once(decoder: str, duration: float | None = None) -> tuple[float, tp.Any]:
        model.decoder = decoder
        (params if duration is None else dataclasses.replace(params, duration=duration)).apply(model)
        sync()
        begin = time.perf_counter()
        with generation.PerItemSampler(seeds):
            tokens = model._generate_tokens(attributes, None)
        sync()
        return time.perf_counter() - begin, tokens.cpu()

    for decoder in decoders:  # warm-up: first-call allocations, lazy imports, CUDA graph capture
        once(decoder, min(params.duration, 0.5) if decoder != 'graph' else None)
    times: dict[str, list[float]] = {d: [] for d in decoders}
    reference = None  # stock's tokens from the first repetition (stock runs first there)
    identical = {d: True for d in decoders}
    for r in range(repeats):
        for decoder in decoders if r % 2 == 0 else decoders[::-1]:
            seconds, tokens = once(decoder)
            times[decoder].append(seconds)
            reference = tokens if reference is None else reference
            identical[decoder] &= tokens.shape == reference.shape and bool((tokens == reference).all())
    if profile:
        for decoder in decoders:
            print_profile(lambda: once(decoder), decoder)  # noqa: B023 (called at once)
    model.decoder = 'fast'
    return {'median': {d: statistics.median(v) for d, v in times.items()}, 'range': times, 'identical': identical}


def print_profile(fn: tp.Callable[[], tp.Any], decoder: str, rows: int = 14) -> None:
    """Where one run's time goes: torch's profiler, operators by self time, and the share outside operators."""
    from torch.profiler import ProfilerActivity, profile

    begin = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - begin
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(
        f'\nprofile of one {decoder} run: {wall:.2f} s wall (profiled), {total:.2f} s in torch operators, '
        f'{max(0.0, wall - total):.2f} s elsewhere (Python, sampling bookkeeping, profiler overhead)'
    )
    print('| operator | self s | share | calls |\n|---|---|---|---|')
    for e in events[:rows]:
        print(f'| {e.key} | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / 1e6 / wall:.0%} | {e.count} |')


def print_row(row: dict, decoders: list[str], duration: float, header: bool) -> None:
    """One Markdown line: seconds per arm, ratio to stock, tokens/s and RTF of each non-stock arm."""
    others = [d for d in decoders if d != 'stock']
    if header:
        cols = (
            ['model', 'threads', 'prompt tokens', 'batch', 'stock s']
            + [f'{d} {k}' for d in others for k in ('s', 'ratio', 'tok/s', 'RTF', 'same tokens')]
            + ['stock tok/s']
        )
        print('\n| ' + ' | '.join(cols) + ' |\n|' + '---|' * len(cols), flush=True)
    med = row['median']
    items_frames = row['batch'] * row['frames']
    audio = row['batch'] * duration
    cells = [row['model'], row['threads'], row['tokens'], row['batch'], f'{med["stock"]:.2f}']
    for d in others:
        cells += [
            f'{med[d]:.2f}',
            f'{med["stock"] / med[d]:.2f}',
            f'{items_frames / med[d]:.0f}',
            f'{med[d] / audio:.3f}',
            'yes' if row['identical'][d] else 'NO',
        ]
    cells.append(f'{items_frames / med["stock"]:.0f}')
    spread = '; '.join(f'{d} {min(v):.2f}-{max(v):.2f}' for d, v in row['range'].items())
    print('| ' + ' | '.join(str(c) for c in cells) + f' |  <!-- {spread} -->', flush=True)


# ---------------------------------------------------------------------------------------------------- cli
def run_cli(args: argparse.Namespace) -> int:
    """scripts/generate.py (end to end) and generation.run against stock AudioGen, as before."""
    import torch

    from scripts import generate as generate_cli
    from solvers.generation import generate as generation

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix='bench_generate_'))
    if args.model:
        model_ref = args.model
    else:
        from solvers.demo.tiny import build_tiny_package

        model_ref = str(build_tiny_package(tmp / 'pkg', seed=0, overrides=SIZES[args.size]))
    prompts = PROMPTS[: args.prompts]
    seeds = list(range(args.variations))
    audio_seconds = len(prompts) * len(seeds) * args.duration
    cli_args = [
        *prompts,
        '--model',
        model_ref,
        '--batch_size',
        str(args.variations),
        '--duration',
        str(args.duration),
        '--max-batch',
        str(args.max_batch),
        '--device',
        args.device,
        '--no-progress',
    ]
    params = generation.GenerationParams(duration=args.duration)
    counter = iter(range(10**6))

    def sync() -> None:
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()

    def stock_generate(model: tp.Any) -> None:
        params.apply(model)  # same settings as ours: top_k 250, cfg 3, same extend_stride
        items = [generation.Item(p, s) for p in prompts for s in seeds]
        batches = generation.plan_batches(items, args.max_batch, key=lambda p: generation.conditioning_shape(model, p))
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
    stock_model = generation.load_model(source, args.device, decoder='stock')

    def ours_gen() -> None:
        cfg = generation.RunConfig(
            prompts=list(prompts),
            seeds=seeds,
            params=params,
            out=tmp / f'gen{next(counter)}',
            max_batch=args.max_batch,
            progress=False,
        )
        generation.run(shared, source, cfg, args.device)
        sync()

    def stock_gen() -> None:
        stock_generate(stock_model)

    arms = {'end to end': (ours_e2e, stock_e2e), 'generation only': (ours_gen, stock_gen)}
    times: dict[tuple[str, str], list[float]] = {}
    for name, (ours, stock) in arms.items():
        ours(), stock()  # warm-up: first-call allocations, lazy imports
        for r in range(args.repeats):
            for label, fn in (('ours', ours), ('stock', stock))[:: 1 if r % 2 == 0 else -1]:
                begin = time.perf_counter()
                fn()
                times.setdefault((name, label), []).append(time.perf_counter() - begin)

    print(
        f'\nmodel: {model_ref if args.model else f"tiny package, --size {args.size}"}; device {args.device}, '
        f'{args.threads} thread(s); {len(prompts)} prompts x {len(seeds)} variations x {args.duration:g} s '
        f'= {audio_seconds:g} s of audio per run; max batch {args.max_batch}; median of {args.repeats}'
    )
    print('\n| measure | ours (s) | stock (s) | ours RTF | stock RTF | ratio stock/ours |')
    print('|---|---|---|---|---|---|')
    for name in arms:
        ours_t, stock_t = (statistics.median(times[(name, label)]) for label in ('ours', 'stock'))
        print(
            f'| {name} | {ours_t:.2f} | {stock_t:.2f} | {ours_t / audio_seconds:.3f} | '
            f'{stock_t / audio_seconds:.3f} | {stock_t / ours_t:.2f} |'
        )
    spread = {k: f'{min(v):.2f}-{max(v):.2f}' for k, v in times.items()}
    print(f'\nranges (min-max s): {spread}')
    return 0


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Parse the mode and its options, run it, print Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest='mode', required=True)
    dec = modes.add_parser('decode', help='LM decoding: fast (and graph) against stock')
    dec.add_argument('--models', nargs='+', choices=sorted(DECODE_SIZES), default=['tiny', 'small', 'large'])
    dec.add_argument('--model', help='a package dir or HF id instead of the random --models')
    dec.add_argument(
        '--tokens',
        nargs='+',
        type=int,
        choices=sorted(WORD_PROMPTS),
        default=[5, 20],
        help='words (= condition tokens for the random models) per prompt',
    )
    dec.add_argument('--batch', nargs='+', type=int, default=[1, 25], help='variations of the prompt per batch')
    dec.add_argument('--threads', nargs='+', type=int, default=[1, 2], help='torch CPU threads')
    dec.add_argument('--duration', type=float, default=5.0, help='seconds per clip (beyond 10 s: sliding window)')
    dec.add_argument('--repeats', type=int, default=3)
    dec.add_argument('--sampling', action='store_true', help='top-k 250 with per-item seeds instead of greedy')
    dec.add_argument('--profile', action='store_true', help='profile one run of each decoder at the largest batch')
    dec.add_argument(
        '--decoders',
        nargs='+',
        choices=('stock', 'fast', 'graph'),
        help='arms (default: stock fast, plus graph on CUDA); stock must be first',
    )
    dec.add_argument('--device', default='cpu')
    dec.add_argument('--dtype', default='auto', help='for --model: auto, float32, float16, bfloat16')
    dec.add_argument(
        '--bandwidth',
        type=float,
        default=4800,
        help='GPU memory bandwidth in GB/s for the roofline (H200: 4800, H100 SXM: 3350, A100 80GB: 2039)',
    )
    cli = modes.add_parser('cli', help='scripts/generate.py end to end against AudioGen.generate')
    cli.add_argument('--model', help='a package dir or HF id (default: build a tiny package of --size)')
    cli.add_argument('--size', choices=sorted(SIZES), default='tiny')
    cli.add_argument('--prompts', type=int, default=2, help='number of prompts (at most 8)')
    cli.add_argument('--variations', type=int, default=4, help='seeds per prompt')
    cli.add_argument('--duration', type=float, default=5.0)
    cli.add_argument('--max-batch', type=int, default=8)
    cli.add_argument('--repeats', type=int, default=5)
    cli.add_argument('--threads', type=int, default=1, help='torch CPU threads (1 keeps timings stable)')
    cli.add_argument('--device', default='cpu')
    args = parser.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from solvers.project import quiet_dependencies

    quiet_dependencies()
    if args.mode == 'decode':
        if args.decoders and args.decoders[0] != 'stock':
            parser.error('--decoders: stock must come first (the reference for the ratios and the token check)')
        return run_decode(args)
    return run_cli(args)


if __name__ == '__main__':
    sys.exit(main())
