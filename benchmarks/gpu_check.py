"""One command that checks every GPU claim of the README and docs in a few minutes, with no download.

``make gpu-check`` (this script) on one CUDA GPU runs, in order:

1. the ``gpu``-marked tests (``pytest -m gpu``);
2. one bf16 and one fp16 training step (after an untimed first step) of a random-weight LM with exactly
   ``config/model/audiogen_medium.yaml``'s architecture (T5-large replaced by a lookup table of its width, 1024),
   full fine-tune and LoRA, at the README's recipes (8 clips x 10 s; LoRA with ``transformer_lm.checkpointing=torch``,
   the 24 GB row), each with its peak memory beside the planner's figure for the same overrides (the parts this
   process holds: no T5, codec or EMA; and the whole run's);
3. the token cache's update beside the uncached one: one full fine-tune step (bf16 on the GPU) of the same LM at
   the same clips, its tokens encoded from audio by a random codec of medium's codec shape
   (``benchmarks/bench_training.MEDIUM_CODEC``) in the step, against the same tokens read as int16 and moved to the
   device (what ``token_cache=true`` hands the solver);
4. LM decoding with audiocraft's loop (``stock``) against ours (``fast``, and ``graph``: CUDA graphs) at
   25 variations x 10 s, with whether the tokens are identical and the share of the memory-bandwidth roofline
   (bytes a decode step must read / the GPU's bandwidth, against the measured time).

It writes ``gpu_check.json`` and ``gpu_check.md`` (a table to paste into docs/benchmarks.md) to
``<outputs>/gpu_check/<stamp>/`` and prints the table. On a machine without CUDA it stops with one line.

``make gpu-check-smoke`` (``--smoke``) runs the same code on the CPU at tiny shapes (a 2-layer LM, 2 clips x 1 s,
float32 and bfloat16 steps, 2 variations x 0.5 s): what CI runs so that this script can't rot. Its figures mean nothing.

    python benchmarks/gpu_check.py [--bandwidth 3350] [--out DIR]
    python benchmarks/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks import bench_generate, bench_training  # noqa: E402
from solvers import project  # noqa: E402
from solvers.training import memory  # noqa: E402

GB = memory.GB
# A 2-layer, 64-wide LM over medium's 4 x 2048 codebooks: every code path of the real run, in seconds on a CPU.
SMOKE_ARCH = (
    'transformer_lm.dim=64',
    'transformer_lm.num_heads=2',
    'transformer_lm.num_layers=2',
    'conditioners.description.lut.dim=64',
)
# The training recipes checked (name, overrides): README's 80 GB row and its 24 GB row.
RECIPES = (
    ('full', ('solver=audiogen/train',)),
    ('lora', ('solver=audiogen/train', 'adapter=lora', 'transformer_lm.checkpointing=torch')),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--smoke', action='store_true', help='tiny shapes on the CPU (what CI runs)')
    parser.add_argument(
        '--bandwidth', type=float, default=3350.0, help="the GPU's memory bandwidth in GB/s (H100 SXM: 3350)"
    )
    parser.add_argument('--out', type=Path, help='output folder (default: <outputs>/gpu_check/<stamp>)')
    args = parser.parse_args(argv)
    args.device = 'cpu' if args.smoke else 'cuda'
    args.dtypes = ('float32', 'bfloat16') if args.smoke else ('bfloat16', 'float16')
    args.batch, args.seconds = (2, 1.0) if args.smoke else (8, 10.0)
    args.variations, args.duration = (2, 0.5) if args.smoke else (25, 10.0)
    args.arch = SMOKE_ARCH if args.smoke else ()
    return args


def run_gpu_tests(smoke: bool) -> dict:
    """``pytest -m gpu`` in a new process (on the CPU they collect and skip: the smoke mode checks just that)."""
    command = [sys.executable, '-m', 'pytest', '-m', 'gpu', '-q', '-n', '0', '-p', 'no:cacheprovider']
    begin = time.perf_counter()
    proc = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or [''])[-1]
    print(f'gpu tests: {summary} ({time.perf_counter() - begin:.0f} s)', flush=True)
    if proc.returncode not in (0, 5) or (not smoke and 'passed' not in summary):
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep='\n', file=sys.stderr)
    return {'command': ' '.join(command[1:]), 'returncode': proc.returncode, 'summary': summary}


def build_lm(cfg: tp.Any, device: str, lora: bool) -> tuple[tp.Any, list[torch.nn.Parameter]]:
    """The configured LM with random weights, LoRA set up as the solver sets it up when ``lora``."""
    from solvers.models import adapters, lm

    torch.manual_seed(0)
    model = lm.build_lm_model(cfg, device=device)
    conditioner = model.condition_provider.conditioners['description']
    conditioner.tokenizer = bench_generate.word_tokenizer(conditioner.embed.num_embeddings)
    if lora:
        adapters.check_settings(cfg)
        adapters.inject_lora(model, cfg.adapter)
        adapters.hold_base_in(model, cfg.adapter.base_dtype, device)
    return model.train(), [p for p in model.parameters() if p.requires_grad]


def training_step(args: argparse.Namespace, name: str, recipe: tuple[str, ...], dtype: str) -> dict:
    """Two updates of one recipe in one dtype: the second timed, the peak memory of both, the planner beside."""
    from solvers.training.optim import build_optimizer

    cuda = args.device == 'cuda'
    overrides = [
        *recipe,
        f'device={args.device}',
        f'dataset.batch_size={args.batch}',
        f'dataset.segment_duration={args.seconds:g}',
        f'autocast={str(dtype != "float32").lower()}',
        *([f'autocast_dtype={dtype}'] if dtype != 'float32' else []),
        *(['adapter.base_dtype=float32'] if name == 'lora' and dtype == 'float32' else []),
        *args.arch,
    ]
    cfg = project.compose([*overrides, *bench_training.LUT_FOR_T5])
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, params = build_lm(cfg, args.device, lora=name == 'lora')
    optimizer = build_optimizer(model, cfg.optim)
    amp = bench_training.DTYPES[dtype]
    autocast = torch.autocast(args.device, dtype=amp) if amp else torch.autocast(args.device, enabled=False)
    scaler = torch.amp.GradScaler('cuda') if amp is torch.float16 else None
    frames = round(args.seconds * 50)
    codes = torch.randint(0, int(cfg.transformer_lm.card), (args.batch, int(cfg.transformer_lm.n_q), frames))
    codes = codes.to(args.device)
    times, ces = [], []
    for _ in range(2):
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        ces.append(bench_training.train_step(model, optimizer, params, codes, autocast, scaler, 1.0))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated() if cuda else bench_training.rss_peak()
    plan = memory.plan(project.compose(overrides), 80.0, overrides)
    # What this process holds: no T5, no codec, no EMA (the steps don't build them), no CUDA context on the CPU.
    absent = ('text encoder', 'codec', 'EMA') + (() if cuda else ('CUDA',))
    in_process = sum(size for part, size, _ in plan.components if not part.startswith(absent))
    del model, optimizer, params
    return {
        'recipe': name,
        'dtype': dtype,
        'overrides': overrides,
        'clips': f'{args.batch} x {args.seconds:g} s',
        'step_s': times[1],
        'first_step_s': times[0],
        'ce': ces,
        'finite': all(c == c and abs(c) != float('inf') for c in ces),
        'peak_gb': peak / GB,
        'peak_measured_as': 'torch.cuda.max_memory_allocated' if cuda else 'peak RSS of the process (ru_maxrss)',
        'planned_gb': plan.total / GB,
        'planned_in_process_gb': in_process / GB,
    }


def token_cache_step(args: argparse.Namespace) -> dict:
    """One update with the codec in it (audio batch) and one from cached int16 tokens, the same LM, after an untimed
    update of each; the codec encodes in fp32 under ``no_grad``, as the solver's ``_prepare_tokens_and_attributes``."""
    from solvers.training.optim import build_optimizer

    cuda, dtype = args.device == 'cuda', args.dtypes[0]
    overrides = ['solver=audiogen/train', f'device={args.device}', *args.arch, *bench_training.LUT_FOR_T5]
    cfg = project.compose(overrides)
    model, params = build_lm(cfg, args.device, lora=False)
    optimizer = build_optimizer(model, cfg.optim)
    amp = bench_training.DTYPES[dtype]
    autocast = torch.autocast(args.device, dtype=amp) if amp else torch.autocast(args.device, enabled=False)
    codec = random_codec(bench_training.MEDIUM_CODEC, args.device)
    audio = 0.1 * torch.randn(args.batch, 1, int(args.seconds * 16000), device=args.device)
    with torch.no_grad():
        cached = codec.encode(audio)[0].to(torch.int16).cpu()  # what the cache's shards hold

    def update(arm: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        if arm == 'uncached':
            with torch.no_grad():
                codes = codec.encode(audio)[0]
        else:
            codes = cached.to(args.device, non_blocking=True).long()
        bench_training.train_step(model, optimizer, params, codes, autocast, None, 1.0)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    for arm in ('uncached', 'cached'):
        update(arm)  # untimed: first-call allocations
    times = {arm: update(arm) for arm in ('uncached', 'cached')}
    return {
        'clips': f'{args.batch} x {args.seconds:g} s',
        'dtype': dtype,
        'uncached_s': times['uncached'],
        'cached_s': times['cached'],
        'ratio': times['cached'] / times['uncached'],
    }


def decoding(args: argparse.Namespace) -> dict:
    """stock vs fast (vs graph on CUDA) at ``variations x duration``, the roofline share of each."""
    from omegaconf import OmegaConf

    from solvers.demo import tiny
    from solvers.generation import generate as generation
    from solvers.models import lm as lm_builder

    cfg = project.compose(['solver=audiogen/train', f'device={args.device}', *args.arch, *bench_training.LUT_FOR_T5])
    torch.manual_seed(0)
    dtype = 'float32' if args.smoke else 'float16'  # what audiocraft's loader gives on a GPU
    lm = lm_builder.build_lm_model(cfg, device=args.device, dtype=dtype).eval()
    conditioner = lm.condition_provider.conditioners['description']
    conditioner.tokenizer = bench_generate.word_tokenizer(conditioner.embed.num_embeddings)
    OmegaConf.set_struct(cfg, False)
    cfg.dataset.segment_duration = 10.0
    lm.cfg = cfg
    codec = random_codec(tiny.TINY_CODEC, args.device)
    model = generation.build_audiogen('random-medium', codec, lm)
    if not args.smoke:
        from audiocraft.utils.autocast import TorchAutocast

        model.autocast = TorchAutocast(enabled=True, device_type='cuda', dtype=torch.float16)
    decoders = ['stock', 'fast', 'graph'] if args.device == 'cuda' else ['stock', 'fast']
    params = generation.GenerationParams(duration=args.duration)
    sync = torch.cuda.synchronize if args.device == 'cuda' else (lambda: None)
    row = bench_generate.time_decoders(model, bench_generate.PROMPTS[0], args.variations, params, decoders, 2, sync)
    frames = int(args.duration * model.frame_rate)
    weights, kv = bench_generate.lm_bytes_per_step(model, args.variations, frames)
    roofline_s = (weights + kv) / (args.bandwidth * 1e9) * (frames + 3)
    return {
        'clips': f'{args.variations} x {args.duration:g} s',
        'seconds': row['median'],
        'identical_to_stock': row['identical'],
        'roofline_s': roofline_s,
        'roofline_share': {d: roofline_s / s for d, s in row['median'].items()},
        'bandwidth_gb_s': args.bandwidth,
    }


def random_codec(codec_cfg: dict, device: str) -> tp.Any:
    """A random codec of the given config (decoding time is the LM's; the codec only turns tokens into audio)."""
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    return builders.get_compression_model(OmegaConf.create(codec_cfg)).to(device).eval()


def markdown(result: dict) -> str:
    """The table to paste into docs/benchmarks.md."""
    lines = [
        f'gpu-check on {result["device"]} ({result["stamp"]}, torch {result["torch"]}){" — SMOKE" * result["smoke"]}',
        '',
        f'gpu tests: {result["gpu_tests"]["summary"]}',
        '',
        '| recipe | dtype | clips | step (s) | peak (GB) | planned, same parts (GB) | planned, whole run (GB) '
        '| ce finite |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for s in result['training']:
        lines.append(
            f'| {s["recipe"]} | {s["dtype"]} | {s["clips"]} | {s["step_s"]:.2f} | {s["peak_gb"]:.1f} | '
            f'{s["planned_in_process_gb"]:.1f} | {s["planned_gb"]:.1f} | {"yes" if s["finite"] else "NO"} |'
        )
    t = result['token_cache']
    lines += [
        '',
        f'| token cache ({t["clips"]}, {t["dtype"]}) | uncached update (s) | cached update (s) | cached/uncached |',
        '|---|---|---|---|',
        f'| full fine-tune | {t["uncached_s"]:.2f} | {t["cached_s"]:.2f} | {t["ratio"]:.2f} |',
    ]
    d = result['decoding']
    lines += ['', f'| decoder ({d["clips"]}) | s | tokens = stock | share of roofline |', '|---|---|---|---|']
    for name, seconds in d['seconds'].items():
        same = 'yes' if d['identical_to_stock'][name] else 'no'
        lines.append(f'| {name} | {seconds:.2f} | {same} | {d["roofline_share"][name]:.0%} |')
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print('gpu-check needs a CUDA GPU and none is visible here; `make gpu-check-smoke` runs it on the CPU.')
        return 2
    stamp = datetime.datetime.now().strftime('%Y-%m-%d_%H-%M-%S')
    out = args.out or project.outputs_dir() / 'gpu_check' / stamp
    device = torch.cuda.get_device_name() if args.device == 'cuda' else f'CPU ({os.cpu_count()} cores)'
    result: dict[str, tp.Any] = {'device': device, 'stamp': stamp, 'torch': torch.__version__, 'smoke': args.smoke}
    result['gpu_tests'] = run_gpu_tests(args.smoke)
    result['training'] = []
    for name, recipe in RECIPES:
        for dtype in args.dtypes:
            step = training_step(args, name, recipe, dtype)
            print(f'{name} {dtype}: {step["step_s"]:.2f} s/step, peak {step["peak_gb"]:.1f} GB', flush=True)
            result['training'].append(step)
    result['token_cache'] = token_cache_step(args)
    print(f'token cache: {result["token_cache"]["ratio"]:.2f} of the uncached update', flush=True)
    result['decoding'] = decoding(args)
    from solvers import atomic

    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / 'gpu_check.json', result)
    table = markdown(result)
    atomic.write_text(out / 'gpu_check.md', table)
    print(f'\n{table}\nwritten: {out / "gpu_check.json"}, {out / "gpu_check.md"}')
    failed = result['gpu_tests']['returncode'] not in (0, 5) or not all(s['finite'] for s in result['training'])
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
