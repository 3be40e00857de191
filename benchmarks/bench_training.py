"""Training benchmarks at the real size: LoRA steps of medium's architecture, and our solver's per-update overhead.

``medium-lora``: a random-weight LM with exactly ``config/model/audiogen_medium.yaml``'s architecture (composed from
    ``solver=audiogen/train adapter=lora``; T5-large replaced by a lookup table of its output width, 1024, with one
    token per word), LoRA applied as the solver applies it (``adapters.inject_lora`` + ``hold_base_in``, the
    ``adapter=lora`` defaults), then ``--steps`` real training steps: forward with the delay pattern, the solver's
    cross-entropy, backward, grad-norm clipping at ``optim.max_norm``, AdamW (the solver's ``build_optimizer``) over
    the trainable parameters only. Random codes stand in for the codec's tokens (the codec isn't built). Prints the
    parameter counts, the first step and the median of the others, memory (CPU: peak RSS from ``ru_maxrss`` and RSS
    after the build; CUDA: ``torch.cuda.max_memory_allocated``), the size of the adapter checkpoint files written as
    the solver writes them (its atomic torch save of the ``TrainableState``) against a full fp32 state dict, and
    the planner's figures (``memory.plan``) for the same settings beside the measured ones. Step 1 also counts the
    bytes autograd saves for the backward (:class:`SavedBytes`). Not done here: loading pretrained weights and the
    solver's check that LoRA leaves the output unchanged, the LR schedule, the EMA. On the CPU, peak RSS includes what
    glibc's allocator keeps after frees; ``MALLOC_MMAP_THRESHOLD_=1048576`` in the environment returns large blocks
    to the system at once and brings RSS closer to the live tensors.
``overhead``: the per-update time of our solver (``solvers.training.solver.AudioGenFinetuneSolver``) against stock
    audiocraft's ``AudioGenSolver``, built in one process from the same composed config (``solver=audiogen/tiny`` with
    an 8-layer x 512 LM, full fine-tune, fp32, clipping at 1.0, the same EMA cadence), on a small package and a small
    prepared dataset made in a temporary folder. The stock arm's weights are copied from ours. Two measures, each
    after an untimed warm-up of both arms, the arms alternating at every timed unit in ABBA order:
    ``run_step``: ``solver.run_step``, one step per unit, on the same pre-drawn batches (ours takes each as a list
    of one micro-batch);
    ``train stage``: one epoch of ``--updates`` updates per unit through each solver's own ``run_stage('train',
    train)`` (data loading, EMA, progress logging and, for ours, per-update TensorBoard points: what each solver
    does by default). The table gives each arm's median and the median of the paired ratios (the two arms of one
    unit ran back to back): on a machine other jobs share, the paired ratio is the figure to read.
    Shim for stock: ``compression_model_checkpoint=//pretrained/<package dir>`` in its config (stock's own loader for
    exported packages; stock's default, a checkpoint path, can't read a package directory). No code is patched.

    python benchmarks/bench_training.py medium-lora [--steps 3] [--batch 1] [--seconds 2]
    python benchmarks/bench_training.py medium-lora --device cuda --dtype bfloat16 --batch 8 --seconds 10
    python benchmarks/bench_training.py overhead [--updates 5] [--repeats 6] [--batch 4] [--seconds 2] [--threads 2]

Memory is in GB of 1e9 bytes, as the planner prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks import bench_generate  # noqa: E402
from solvers import project  # noqa: E402
from solvers.demo import tiny_codec  # noqa: E402
from solvers.training import memory  # noqa: E402

GB = memory.GB
T5_WIDTH = 1024  # T5-large's d_model: the stand-in lookup table has this output width
LUT_FOR_T5 = (
    'conditioners.description.model=lut',
    'conditioners.description.lut.n_bins=1',
    f'conditioners.description.lut.dim={T5_WIDTH}',
    'conditioners.description.lut.tokenizer=noop',
)
DTYPES = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


# ---------------------------------------------------------------------------------------------------- memory
def rss_now() -> int:
    """The process' resident set now, in bytes (VmRSS)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
    return 0


def rss_peak() -> int:
    """The process' peak resident set so far, in bytes (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SavedBytes:
    """Counts the bytes autograd saves for the backward (each storage once, parameters excluded) during a step.

    The same count as ``memory.measure_activation_bytes`` (which bench_memory's calibration uses), but without
    holding the tensors: that one keeps them alive through the whole backward, which at medium's size would raise
    the step's peak by gigabytes on a 24 GB machine. During the forward autograd frees none of its saved tensors, so
    their storages' addresses are distinct and counting them by address is exact.
    """

    def __init__(self, exclude: tp.Iterable[torch.Tensor]):
        self.skip = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[tuple[int, str], int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.storages[(storage.data_ptr(), str(tensor.device))] = storage.nbytes()
        return tensor

    def hooks(self) -> tp.Any:
        """The context to run the forward in."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


# ---------------------------------------------------------------------------------------------------- medium-lora
def medium_overrides(args: argparse.Namespace) -> list[str]:
    """The training overrides of this run, as `dora run` / the planner take them (the EMA is off: not stepped here)."""
    autocast = args.dtype != 'float32'
    # Without autocast the frozen base must be fp32 too on CUDA (adapter=lora holds it in bf16 there).
    precision = [f'autocast_dtype={args.dtype}'] if autocast else ['adapter.base_dtype=float32']
    return [
        'solver=audiogen/train',
        'adapter=lora',
        f'device={args.device}',
        f'dataset.batch_size={args.batch}',
        f'dataset.segment_duration={args.seconds:g}',
        f'autocast={str(autocast).lower()}',
        *precision,
        'optim.ema.use=false',
        *args.override,
    ]


def build_medium_lora(cfg: tp.Any, device: str) -> tuple[tp.Any, list[torch.nn.Parameter]]:
    """Medium's LM with random weights and the solver's LoRA setup; returns it and its trainable parameters."""
    from solvers.models import adapters, lm

    torch.manual_seed(0)
    model = lm.build_lm_model(cfg).to(device)
    conditioner = model.condition_provider.conditioners['description']
    conditioner.tokenizer = bench_generate.word_tokenizer(conditioner.embed.num_embeddings)
    adapters.check_settings(cfg)
    adapters.inject_lora(model, cfg.adapter)  # as AudioGenFinetuneSolver._build_adapters does, then the base dtype
    adapters.hold_base_in(model, cfg.adapter.base_dtype, device)
    return model.train(), [p for p in model.parameters() if p.requires_grad]


def train_step(
    model: tp.Any,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    codes: torch.Tensor,
    autocast: tp.Any,
    scaler: tp.Any,
    max_norm: float,
    saved: SavedBytes | None = None,
) -> float:
    """One update as the solver's run_step does it for one micro-batch; returns the cross-entropy.

    Args:
        saved: counts the bytes the forward saves for the backward, when given.
    """
    from audiocraft.modules.conditioners import ConditioningAttributes
    from audiocraft.solvers.musicgen import MusicGenSolver

    prompts = bench_generate.PROMPTS
    attributes = [ConditioningAttributes(text={'description': prompts[i % len(prompts)]}) for i in range(len(codes))]
    attributes = model.att_dropout(model.cfg_dropout(attributes))  # the solver's classifier-free-guidance dropout
    tokenized = model.condition_provider.tokenize(attributes)
    with autocast, saved.hooks() if saved is not None else contextlib.nullcontext():
        conditions = model.condition_provider(tokenized)
        output = model.compute_predictions(codes, [], conditions)
        ce, _ = MusicGenSolver._compute_cross_entropy(None, output.logits, codes, output.mask)  # type: ignore
    (scaler.scale(ce) if scaler is not None else ce).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(ce.detach())


def checkpoint_sizes(model: tp.Any, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes of the adapter checkpoints, written as the solver writes them: the best state (the ``TrainableState``
    and the adapter layout), and the adapters with their AdamW moments (what the last checkpoint adds)."""
    from solvers.models import adapters

    try:
        from solvers.atomic import save_torch  # where the solver's checkpoint writes live now
    except ImportError:  # before solvers/atomic.py: the same write in solvers/training/checkpoints.py
        from solvers.training.checkpoints import atomic_save as save_torch  # type: ignore[attr-defined,no-redef]

    state = adapters.TrainableState(model).state_dict()
    layout = adapters.layout(model)
    with tempfile.TemporaryDirectory(prefix='bench_training_') as tmp:
        best, last = Path(tmp) / 'checkpoint_best.th', Path(tmp) / 'checkpoint.th'
        save_torch({'best_state': {'model': state}, 'adapter_layout': layout}, best)
        save_torch({'model': state, 'optimizer': optimizer.state_dict(), 'adapter_layout': layout}, last)
        return best.stat().st_size, last.stat().st_size


def run_medium_lora(args: argparse.Namespace) -> int:
    """Build, step, measure, and print the measured figures beside the planner's."""
    from solvers.training.optim import build_optimizer

    cuda = args.device.startswith('cuda')
    if args.dtype == 'float16' and not cuda:
        raise SystemExit("--dtype float16 needs --device cuda (its grad scaler is CUDA's); use bfloat16 or float32.")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    overrides = medium_overrides(args)
    cfg = project.compose([*overrides, *LUT_FOR_T5])
    frames = round(args.seconds * 50)  # the 16 kHz EnCodec's 50 Hz frames
    print(
        f'medium-lora: {" ".join(overrides)}; {args.batch} x {args.seconds:g} s ({frames} frames); '
        f'{args.dtype}{" autocast" if args.dtype != "float32" else ""} on {args.device}, '
        f'{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}',
        flush=True,
    )
    rss_before = rss_now()
    begin = time.perf_counter()
    model, params = build_medium_lora(cfg, args.device)
    build_s = time.perf_counter() - begin
    sync()
    after_build = torch.cuda.memory_allocated() if cuda else rss_now()
    peak_build = torch.cuda.max_memory_allocated() if cuda else rss_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    total = sum(p.numel() for p in model.parameters()) - T5_WIDTH  # the lookup table's single row isn't medium's
    trainable = sum(p.numel() for p in params)
    print(
        f'built in {build_s:.1f} s: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.2f} %)',
        flush=True,
    )
    optimizer = build_optimizer(model, cfg.optim)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(args.device.split(':')[0], dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler('cuda') if dtype is torch.float16 else None
    codes = torch.randint(
        0, int(cfg.transformer_lm.card), (args.batch, int(cfg.transformer_lm.n_q), frames), device=args.device
    )
    times = []
    saved = SavedBytes(model.parameters()) if args.saved_bytes else None
    for step in range(args.steps):
        sync()
        begin = time.perf_counter()
        ce = train_step(
            model, optimizer, params, codes, autocast, scaler, float(cfg.optim.max_norm), saved if step == 0 else None
        )
        sync()
        times.append(time.perf_counter() - begin)
        print(
            f'  step {step + 1}: {times[-1]:.2f} s, ce {ce:.3f}, peak '
            f'{(torch.cuda.max_memory_allocated() if cuda else rss_peak()) / GB:.2f} GB',
            flush=True,
        )
    peak = torch.cuda.max_memory_allocated() if cuda else rss_peak()
    best_bytes, last_bytes = checkpoint_sizes(model, optimizer)
    measured = {
        'total': total,
        'trainable': trainable,
        'times': times,
        'rss_before': rss_before,
        'after_build': after_build,
        'peak_build': peak_build,
        'peak': peak,
        'saved': saved.total if saved is not None else None,
        'best_bytes': best_bytes,
        'last_bytes': last_bytes,
        'build_s': build_s,
    }
    print_medium_report(args, overrides, cfg, measured)
    return 0


def print_medium_report(args: argparse.Namespace, overrides: list[str], cfg: tp.Any, m: dict) -> None:
    """Markdown tables: steps and memory, checkpoint sizes, and the planner beside the measurement."""
    cuda = args.device.startswith('cuda')
    times = m['times']
    rest = statistics.median(times[1:]) if len(times) > 1 else float('nan')
    tokens = args.batch * round(args.seconds * 50)
    print(f'\nload average {os.getloadavg()[0]:.2f}\n\n| measure | value |\n|---|---|')
    print(f'| parameters (LM, without T5) | {m["total"]:,} |\n| trainable (LoRA) | {m["trainable"]:,} |')
    print(f'| build (random init + LoRA) | {m["build_s"]:.1f} s |\n| step 1 | {times[0]:.2f} s |')
    print(f'| median of steps 2-{len(times)} | {rest:.2f} s ({tokens / rest:.1f} frames/s) |')
    if cuda:
        print(f'| allocated after build | {m["after_build"] / GB:.2f} GB |')
        print(f'| peak allocated during the steps (max_memory_allocated) | {m["peak"] / GB:.2f} GB |')
    else:
        print(f'| RSS before the build (interpreter, torch, audiocraft) | {m["rss_before"] / GB:.2f} GB |')
        print(
            f'| RSS after the build (peak during the build) | {m["after_build"] / GB:.2f} GB '
            f'({m["peak_build"] / GB:.2f} GB) |'
        )
        print(f'| peak RSS after the steps (ru_maxrss) | {m["peak"] / GB:.2f} GB |')
        print(f"| the steps' increment: peak - RSS after the build | {(m['peak'] - m['after_build']) / GB:.2f} GB |")
    if m['saved'] is not None:
        print(f"| saved for the backward by step 1's forward (autograd's saved tensors) | {m['saved'] / GB:.3f} GB |")
    full = m['total'] * 4
    print(f'\n| file | bytes | vs full fp32 state dict ({full:,} B = params x 4) |\n|---|---|---|')
    print(f'| adapter best state (TrainableState + layout) | {m["best_bytes"]:,} | {m["best_bytes"] / full:.2%} |')
    print(f'| adapters + AdamW moments | {m["last_bytes"]:,} | {m["last_bytes"] / full:.2%} |')
    print_planner(args, overrides, cfg, m)


def print_planner(args: argparse.Namespace, overrides: list[str], cfg: tp.Any, m: dict) -> None:
    """The planner's plan for the same overrides (its own T5 config), beside what this process measured."""
    plan_cfg = project.compose(overrides)
    plan = memory.plan(plan_cfg, args.gpu_gb, overrides)
    parts = {name: size for name, size, _ in plan.components}
    print('\n' + memory.format_plan(plan, 'Planner (memory.plan) for ' + ' '.join(overrides)))
    weights = sum(s for n, s in parts.items() if n.startswith('weights'))
    step = sum(s for n, s in parts.items() if n.startswith(('gradients', 'optimizer', 'activations')))
    activations = next(s for n, s in parts.items() if n.startswith('activations'))
    cuda = args.device.startswith('cuda')
    measured_weights = m['after_build'] if cuda else m['after_build'] - m['rss_before']
    print('\n| component | planned GB | measured GB | measured as |\n|---|---|---|---|')
    print(
        f'| LM weights (trainable + frozen) | {weights / GB:.2f} | {measured_weights / GB:.2f} | '
        f'{"allocated after the build" if cuda else "RSS after the build - RSS before"} |'
    )
    print(
        f'| gradients + optimizer + activations | {step / GB:.2f} | {(m["peak"] - m["after_build"]) / GB:.2f} | '
        f'{"max_memory_allocated - allocated after the build" if cuda else "peak RSS - RSS after the build"} |'
    )
    if m['saved'] is not None:
        saved_plan = memory.activation_bytes(plan_cfg, args.batch, peak=False)
        print(
            f'| activations saved at the end of the forward | {saved_plan / GB:.3f} | {m["saved"] / GB:.3f} | '
            "autograd's saved tensors |"
        )
    print(f'| (activations at peak) | {activations / GB:.2f} | | |')
    absent = [n for n in parts if n.startswith(('text encoder', 'codec', 'EMA') + (() if cuda else ('CUDA',)))]
    print(f'\nNot in this process (the planner counts them): {", ".join(absent)}.')


# ---------------------------------------------------------------------------------------------------- overhead
def make_inputs(tmp: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """A small package (8 x 512 LM, the tiny codec) and a prepared dataset; the overrides both solvers get."""
    from solvers.demo.synthetic import make_demo_dataset
    from solvers.demo.tiny import build_tiny_package

    size = bench_generate.SIZES['small']
    pkg = build_tiny_package(tmp / 'pkg', seed=0, overrides=size)
    make_demo_dataset(tmp / 'raw', seed=0, per_class=args.per_class)
    command = [
        sys.executable,
        '-m',
        'scripts.prepare_dataset',
        str(tmp / 'raw'),
        '--name',
        'bench',
        '--out',
        str(tmp / 'prep'),
        '--egs-root',
        str(tmp / 'egs'),
        '--config-root',
        str(tmp / 'config'),
        '--workers',
        '1',
        '--no-progress',
        '--valid-fraction',
        '0.25',
    ]
    subprocess.run(
        command, cwd=PROJECT_ROOT, check=True, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE='1')
    )
    overrides = [
        'solver=audiogen/tiny',
        f'pretrained={pkg}',
        *size,
        f'datasource.train={tmp / "egs" / "bench" / "train"}',
        f'datasource.valid={tmp / "egs" / "bench" / "valid"}',
        f'dataset.batch_size={args.batch}',
        f'dataset.segment_duration={args.seconds:g}',
        'dataset.num_workers=0',
        'optim.grad_accum_steps=1',
        f'optim.updates_per_epoch={args.updates}',
        'optim.epochs=1000',  # a long schedule: the timed updates never reach its end
        f'optim.ema.updates={args.updates}',  # one EMA step per epoch, at the same update in both arms
        'schedule.cosine.warmup=2',
        'logging.level=WARNING',
    ]
    return pkg, overrides


def solver_in_xp(overrides: list[str], outputs: Path) -> tuple[tp.Any, tp.Any]:
    """Our solver built inside its Dora XP (entered, as `dora run` enters it), and the XP's context."""
    from solvers import train

    os.environ['AUDIOGEN_OUTPUTS'] = str(outputs)
    train.main.dora.dir = outputs
    xp = train.main.get_xp(overrides)
    context = xp.enter()
    context.__enter__()
    train.init_seed_and_system(xp.cfg)
    return train.get_solver(xp.cfg), context


def build_arms(pkg: Path, overrides: list[str], outputs: Path) -> tuple[tp.Any, tp.Any, tp.Any]:
    """Both solvers inside one Dora XP, from the same composed config; stock's weights copied from ours."""
    from audiocraft.solvers.audiogen import AudioGenSolver

    ours, context = solver_in_xp(overrides, outputs)
    stock_cfg = copy.deepcopy(ours.cfg)  # after ours resolved data paths, sample counts and precision
    stock_cfg.compression_model_checkpoint = f'//pretrained/{pkg}'
    stock = AudioGenSolver(stock_cfg)
    stock.model.load_state_dict(ours.model.state_dict())
    return ours, stock, context


def time_overhead(ours: tp.Any, stock: tp.Any, args: argparse.Namespace) -> dict[tuple[str, str], list[float]]:
    """Seconds per update of each arm: one value per step (``run_step``) or per epoch (``train stage``).

    The arms alternate at every timed unit in an ABBA order (ours, stock, stock, ours, ...), so load from other
    processes on the machine falls on both alike.
    """
    from audiocraft.utils.utils import get_dataset_from_loader

    loader = ours.dataloaders['train']
    get_dataset_from_loader(loader).current_epoch = 1
    batches = [group[0] for group, _ in zip(loader, range(args.updates))]

    def step(solver: tp.Any, idx: int) -> None:
        solver._current_stage = 'train'  # what flashy's run_stage sets; is_training reads it
        try:
            batch = batches[idx % len(batches)]
            solver.run_step(idx, [batch] if solver is ours else batch, {})
        finally:
            solver._current_stage = None

    def epoch(solver: tp.Any, idx: int) -> None:
        if solver is ours:
            ours.position.reset()  # commit() does this between epochs
        solver._pending_metrics.pop('train', None)  # commit() clears it between epochs
        solver.run_stage('train', solver.train)

    times: dict[tuple[str, str], list[float]] = {}
    for measure, fn, units, per_unit in (
        ('run_step', step, args.repeats * args.updates, 1),
        ('train stage', epoch, args.repeats, args.updates),
    ):
        for solver in (ours, stock):  # warm-up: first-call allocations, optimizer state, lazy imports
            for idx in range(2 if measure == 'run_step' else 1):
                fn(solver, idx)
        for i in range(units):
            for label in ('ours', 'stock') if i % 2 == 0 else ('stock', 'ours'):
                begin = time.perf_counter()
                fn(ours if label == 'ours' else stock, i)
                times.setdefault((measure, label), []).append((time.perf_counter() - begin) / per_unit)
        print(f'  {measure}: {units} timed units per arm done, load average {os.getloadavg()[0]:.2f}', flush=True)
    return times


def run_overhead(args: argparse.Namespace) -> int:
    """Build both arms, time them, print the ratio table."""
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix='bench_training_'))
    begin = time.perf_counter()
    pkg, overrides = make_inputs(tmp, args)
    ours, stock, context = build_arms(pkg, overrides, tmp / 'outputs')
    torch.set_num_threads(args.threads)
    params = sum(p.numel() for p in ours.model.parameters())
    groups = [(len(g['params']), g['lr']) for g in ours.optimizer.param_groups]
    same = groups == [(len(g['params']), g['lr']) for g in stock.optimizer.param_groups]
    print(
        f'overhead: {params / 1e6:.1f} M parameter LM (8 x 512), full fine-tune, fp32 on CPU, {args.threads} '
        f'threads; {args.batch} x {args.seconds:g} s per update; optimizer groups {"equal" if same else "DIFFER"}; '
        f'built in {time.perf_counter() - begin:.0f} s; load average {load_before[0]:.2f}',
        flush=True,
    )
    try:
        times = time_overhead(ours, stock, args)
    finally:
        context.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f'\nload average {os.getloadavg()[0]:.2f}; wall {time.perf_counter() - begin:.0f} s\n\n'
        '| measure | timed units per arm | ours s/update | stock s/update | ours/stock | median of paired ratios | '
        'ours range | stock range |\n|---|---|---|---|---|---|---|---|'
    )
    for measure in ('run_step', 'train stage'):
        ours_t, stock_t = (times[(measure, label)] for label in ('ours', 'stock'))
        paired = statistics.median(o / s for o, s in zip(ours_t, stock_t))
        unit = 'steps' if measure == 'run_step' else f'epochs of {args.updates}'
        print(
            f'| {measure} | {len(ours_t)} {unit} | {statistics.median(ours_t):.3f} | '
            f'{statistics.median(stock_t):.3f} | {statistics.median(ours_t) / statistics.median(stock_t):.3f} | '
            f'{paired:.3f} | {min(ours_t):.3f}-{max(ours_t):.3f} | {min(stock_t):.3f}-{max(stock_t):.3f} |'
        )
    return 0


# ---------------------------------------------------------------------------------------------------- step-budget
# A codec of the shape of audiocraft's published EnCodec models (SEANet with 64 filters, 128 dimensions, 2 LSTM
# layers) at 16 kHz with hops of 320 samples and 4 x 2048 codes: a stand-in for medium's codec, which isn't available
# offline. The demo's tiny codec has 8 filters and no LSTM.
MEDIUM_CODEC = copy.deepcopy(tiny_codec.CODEC_CONFIG)
MEDIUM_CODEC['seanet'].update(dimension=128, n_filters=64, lstm=2)
MEDIUM_CODEC['rvq'].update(bins=2048, dimension=128)
SHAPES: dict[str, tuple[tuple[str, ...], dict | None]] = {
    'demo': ((), None),  # model=tiny: a 2 x 64 LM, the demo's tiny codec
    'medium-narrow': (
        (
            'transformer_lm.dim=512',
            'transformer_lm.num_heads=8',
            'transformer_lm.num_layers=4',
            'transformer_lm.card=2048',
        ),
        MEDIUM_CODEC,
    ),
}
PHASES = ('data', 'codec', 'lm', 'optimizer', 'ema')


def prepare_bench_dataset(tmp: Path, per_class: int) -> tuple[Path, Path]:
    """Synthetic demo clips (1-4 s, every class) prepared by scripts/prepare_dataset.py; the train and valid dirs."""
    from solvers.demo.synthetic import make_demo_dataset

    make_demo_dataset(tmp / 'raw', seed=0, per_class=per_class)
    command = [sys.executable, '-m', 'scripts.prepare_dataset', str(tmp / 'raw'), '--name', 'bench']
    command += ['--out', str(tmp / 'prep'), '--egs-root', str(tmp / 'egs'), '--config-root', str(tmp / 'config')]
    command += ['--workers', '1', '--no-progress', '--valid-fraction', '0.25']
    subprocess.run(
        command, cwd=PROJECT_ROOT, check=True, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE='1')
    )
    return tmp / 'egs' / 'bench' / 'train', tmp / 'egs' / 'bench' / 'valid'


def shape_package(out: Path, shape: str) -> Path:
    """A random package of ``shape``: the tiny package's LM config with the shape's overrides, and its codec."""
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    from solvers.demo import tiny
    from solvers.models import lm, package

    overrides, codec_cfg = SHAPES[shape]
    if codec_cfg is None:
        return tiny.build_tiny_package(out, seed=0, overrides=overrides)
    torch.manual_seed(0)
    lm_cfg = tiny.tiny_lm_config(overrides)
    model = lm.build_lm_model(lm_cfg)
    codec = builders.get_compression_model(OmegaConf.create(codec_cfg))
    OmegaConf.set_struct(lm_cfg, False)
    for key in ('datasource', 'slurm', 'dora'):
        lm_cfg.pop(key, None)
    return package.write(out, lm_cfg, model.state_dict(), OmegaConf.create(codec_cfg), codec.state_dict())


class Clock:
    """Seconds per phase of the current update (``with clock('lm'): ...``), kept per update."""

    def __init__(self) -> None:
        self.updates: list[dict[str, float]] = []

    def new_update(self) -> None:
        self.updates.append(dict.fromkeys(PHASES, 0.0))

    @contextlib.contextmanager
    def __call__(self, phase: str) -> tp.Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.updates[-1][phase] += time.perf_counter() - begin

    def timed(self, fn: tp.Callable, phase: str) -> tp.Callable:
        """``fn``, its time counted in ``phase``."""

        def wrapper(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
            with self(phase):
                return fn(*args, **kwargs)

        return wrapper


def epochs_of_batches(solver: tp.Any) -> tp.Iterator[list]:
    """The train loader's updates, epoch after epoch; each epoch's order seeded by its number (equal in both arms)."""
    from audiocraft.utils.utils import get_dataset_from_loader

    epoch = 1
    while True:
        get_dataset_from_loader(solver.dataloaders['train'].loader).current_epoch = epoch
        torch.manual_seed(epoch)  # the sampler draws its order when the next line starts iterating
        yield from solver.dataloaders['train']
        epoch += 1


def timed_update(solver: tp.Any, batches: tp.Iterator[list], clock: Clock, idx: int) -> float:
    """One update as the solver's ``run_step`` + ``_train_update`` do it, each phase timed; returns its ce. The
    codec's encode is timed by a wrapper (:func:`build_budget_arms`) and taken out of the LM's share."""
    from solvers.training import optim

    clock.new_update()
    with clock('data'):
        batch = next(batches)
    begin = time.perf_counter()
    ce, _, _ = solver._accumulate(batch)
    clock.updates[-1]['lm'] += time.perf_counter() - begin - clock.updates[-1]['codec']
    parts = (solver.optimizer, solver.trainable_params, solver.cfg.optim.max_norm, solver.scaler, solver.lr_scheduler)
    with clock('optimizer'):
        optim.apply_update(*parts, solver.guard, ce)
    if solver.ema is not None and optim.ema_due(1, idx, solver.train_updates_per_epoch, solver.cfg.optim.ema.updates):
        with clock('ema'):
            solver.ema.step()
    return float(ce)


def build_budget_arms(overrides: list[str], outputs: Path) -> tuple[dict[str, tp.Any], tp.Any, float]:
    """The uncached and cached solvers of one XP (equal weights), the XP context, and the cache's build seconds."""
    from solvers.training import token_cache
    from solvers.training.solver import AudioGenFinetuneSolver

    plain, context = solver_in_xp(overrides, outputs)
    cached_cfg = copy.deepcopy(plain.cfg)
    cached_cfg.token_cache = True
    begin = time.perf_counter()
    token_cache.build_for_config(cached_cfg, plain.compression_model, progress=False)
    build_s = time.perf_counter() - begin
    cached = AudioGenFinetuneSolver(cached_cfg)
    cached.model.load_state_dict(plain.model.state_dict())
    for solver in (plain, cached):
        solver.model.train()
    return {'uncached': plain, 'cached': cached}, context, build_s


def loader_clips_per_s(solver: tp.Any, workers: int, batches: int) -> float:
    """Clips/s of the train loader alone with ``workers`` processes (a fresh epoch, worker start-up included)."""
    loader = solver.dataloaders['train'].loader
    timed = torch.utils.data.DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=loader.sampler,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        multiprocessing_context='forkserver' if workers else None,
    )
    begin, clips = time.perf_counter(), 0
    for n, (items, _) in enumerate(timed):
        clips += len(items)
        if n + 1 >= batches:
            break
    return clips / (time.perf_counter() - begin)


def budget_overrides(shape: str, pkg: Path, data: tuple[Path, Path], args: argparse.Namespace) -> list[str]:
    """The demo preset on the benchmark's package and data: 4 s segments, 8 clips per micro-batch, the demo's
    2 micro-batches per update and EMA after every update (medium-narrow: one micro-batch per update)."""
    return [
        'solver=audiogen/demo',
        f'pretrained={pkg}',
        *SHAPES[shape][0],
        f'datasource.train={data[0]}',
        f'datasource.valid={data[1]}',
        'dataset.segment_duration=4',
        'dataset.min_segment_ratio=0.5',  # what prepare_dataset's presets write
        'dataset.batch_size=8',
        f'dataset.num_workers={args.workers}',
        *(['optim.grad_accum_steps=1'] if shape != 'demo' else []),
        f'optim.updates_per_epoch={args.updates}',
        'optim.epochs=1000',
        'logging.level=WARNING',
    ]


def time_budget(arms: dict[str, tp.Any], args: argparse.Namespace) -> tuple[dict[str, Clock], dict[str, list[float]]]:
    """Per-update phase times and ce of both arms, updates alternating in ABBA order after an untimed warm-up."""
    clocks = {name: Clock() for name in arms}
    batches = {name: epochs_of_batches(solver) for name, solver in arms.items()}
    ce: dict[str, list[float]] = {name: [] for name in arms}
    for name, solver in arms.items():
        solver.compression_model.encode = clocks[name].timed(solver.compression_model.encode, 'codec')
        solver._current_stage = 'train'  # what flashy's run_stage sets
    for i in range(args.warmup + args.updates):
        order = list(arms) if i % 2 == 0 else list(reversed(arms))
        for name in order:
            ce[name].append(timed_update(arms[name], batches[name], clocks[name], i))
        if i + 1 == args.warmup:
            for clock in clocks.values():
                clock.updates.clear()
    return clocks, ce


def print_budget(shape: str, arms: dict[str, tp.Any], clocks: dict[str, Clock], extra: dict) -> None:
    """The step-budget table of one shape: median seconds per phase per update, the paired ratio, throughput."""
    solver = arms['uncached']
    clips = solver.cfg.dataset.batch_size * solver.cfg.optim.grad_accum_steps
    params = sum(p.numel() for p in solver.model.parameters()) / 1e6
    print(f'\n### {shape}: {params:.1f} M parameter LM, {clips} clips x 4 s per update\n')
    print('| arm | ' + ' | '.join(PHASES) + ' | total s/update | step clips/s (no data) |')
    print('|---|' + '---|' * (len(PHASES) + 2))
    totals = {}
    for name, clock in clocks.items():
        medians = [statistics.median(u[p] for u in clock.updates) for p in PHASES]
        totals[name] = [sum(u.values()) for u in clock.updates]
        compute = statistics.median(sum(u.values()) - u['data'] for u in clock.updates)
        cells = ' | '.join(f'{m:.4f}' for m in medians)
        print(f'| {name} | {cells} | {statistics.median(totals[name]):.4f} | {clips / compute:.1f} |')
    paired = statistics.median(c / u for c, u in zip(totals['cached'], totals['uncached']))
    print(f'\ncached/uncached s/update: median of {len(totals["cached"])} paired ratios {paired:.3f}')
    for key, value in extra.items():
        print(f'{key}: {value}')


def run_step_budget(args: argparse.Namespace) -> int:
    """Per shape: build the package and both arms, time the updates and the loaders, compare the ce curves."""
    tmp = Path(tempfile.mkdtemp(prefix='bench_budget_'))
    os.environ['AUDIOGEN_HOME'] = str(tmp / 'home')  # the token cache goes under a temporary data root
    print(f'step-budget: {args.threads} threads, load average {os.getloadavg()[0]:.2f}', flush=True)
    try:
        data = prepare_bench_dataset(tmp, args.per_class)
        for shape in args.shapes:
            pkg = shape_package(tmp / shape, shape)
            arms, context, build_s = build_budget_arms(budget_overrides(shape, pkg, data, args), tmp / f'out-{shape}')
            try:
                torch.set_num_threads(args.threads)
                clocks, ce = time_budget(arms, args)
                extra: dict[str, str] = {'token cache build (cold)': f'{build_s:.1f} s'}
                for workers in sorted({args.workers, *args.loader_workers}):
                    rates = [f'{n} {loader_clips_per_s(s, workers, args.loader_batches):.1f}' for n, s in arms.items()]
                    extra[f'loader clips/s, {workers} workers'] = ', '.join(rates)
                gaps = [abs(a - b) for a, b in zip(ce['cached'], ce['uncached'])]
                extra['ce per update, uncached'] = ' '.join(f'{v:.3f}' for v in ce['uncached'])
                extra['ce per update, cached'] = ' '.join(f'{v:.3f}' for v in ce['cached'])
                extra['|ce cached - uncached|'] = f'max {max(gaps):.4f}, median {statistics.median(gaps):.4f}'
                print_budget(shape, arms, clocks, extra)
            finally:
                context.__exit__(None, None, None)
        print(f'\nload average {os.getloadavg()[0]:.2f}')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Parse the mode and its options, run it, print Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest='mode', required=True)
    med = modes.add_parser('medium-lora', help="LoRA training steps at medium's architecture, with the planner")
    med.add_argument('--steps', type=int, default=3)
    med.add_argument('--batch', type=int, default=1, help='clips per step')
    med.add_argument('--seconds', type=float, default=2.0, help='seconds per clip (50 codec frames per second)')
    med.add_argument('--device', default='cpu')
    med.add_argument(
        '--dtype',
        choices=sorted(DTYPES),
        default='float32',
        help='autocast dtype (float32: no autocast; float16 adds a grad scaler, CUDA only)',
    )
    med.add_argument('--gpu-gb', type=float, default=24.0, help="memory the planner's verdict is checked against")
    med.add_argument(
        '--override',
        action='append',
        default=[],
        metavar='KEY=VALUE',
        help='an extra config override, e.g. transformer_lm.num_layers=4 for a quick try (repeatable)',
    )
    med.add_argument(
        '--no-saved-bytes',
        dest='saved_bytes',
        action='store_false',
        help="don't count autograd's saved tensors during step 1",
    )
    over = modes.add_parser('overhead', help="our solver's per-update time against stock AudioGenSolver")
    over.add_argument('--updates', type=int, default=5, help='updates per train-stage epoch (and distinct batches)')
    over.add_argument(
        '--repeats',
        type=int,
        default=6,
        help='timed epochs per arm; run_step times repeats x updates single steps per arm',
    )
    over.add_argument('--batch', type=int, default=4)
    over.add_argument('--seconds', type=float, default=2.0)
    over.add_argument('--per-class', type=int, default=4, help='demo clips per sound class in the dataset')
    budget = modes.add_parser('step-budget', help='seconds per update in each phase, with and without the token cache')
    budget.add_argument('--shapes', nargs='+', choices=sorted(SHAPES), default=['demo', 'medium-narrow'])
    budget.add_argument('--updates', type=int, default=10, help='timed updates per arm')
    budget.add_argument('--warmup', type=int, default=2, help='untimed updates per arm first')
    budget.add_argument(
        '--workers', type=int, default=0, help="loader workers of the steps (prepare_dataset's on 2 CPUs)"
    )
    budget.add_argument(
        '--loader-workers', type=int, nargs='*', default=[2], help='also time the loader alone with these'
    )
    budget.add_argument('--loader-batches', type=int, default=8, help='batches per loader throughput measure')
    budget.add_argument('--per-class', type=int, default=4, help='demo clips per sound class in the dataset')
    for sub in (med, over, budget):
        sub.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    args = parser.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    project.quiet_dependencies()
    torch.set_num_threads(args.threads)
    modes_run = {'medium-lora': run_medium_lora, 'overhead': run_overhead, 'step-budget': run_step_budget}
    return modes_run[args.mode](args)


if __name__ == '__main__':
    sys.exit(main())
