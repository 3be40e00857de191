"""The training memory planner: bytes per component for a config, whether it fits a GPU, and what would make it fit.

Parameter counts come from building the configured LM on the meta device (no weights are read or allocated); a T5
text encoder is counted from its config (the HF cache when it is there, else the published sizes below), and the
LM's T5 projection is built as a lookup-table conditioner of the same width. Activations per micro-batch follow
:data:`ACTIVATION_MODEL`, whose coefficients were measured with :func:`measure_activation_bytes` (autograd's saved
tensors, deduplicated by storage) on the custom-attention LM: see benchmarks/bench_memory.py and docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing as tp

import torch
from omegaconf import DictConfig, OmegaConf

from solvers.models import adapters
from solvers.models.lm import build_lm_model

GB = 1e9
# T5 encoders audiocraft's T5Conditioner accepts: (parameters of the encoder alone, d_model). From the published
# configs; used when the model isn't in the local HF cache.
T5_ENCODERS = {
    't5-small': (35_330_816, 512),
    't5-base': (109_628_544, 768),
    't5-large': (341_231_104, 1024),
    't5-3b': (1_241_784_320, 1024),
    't5-11b': (4_762_310_656, 1024),
    'google/flan-t5-small': (35_326_976, 512),
    'google/flan-t5-base': (109_628_544, 768),
    'google/flan-t5-large': (341_231_104, 1024),
    'google/flan-t5-xl': (1_223_527_424, 2048),
    'google/flan-t5-xxl': (4_762_310_656, 4096),
}
CODEC_PARAMS = 59_000_000  # facebook/audiogen-medium's 16 kHz EnCodec, when its package can't be read
# Activation bytes kept for the backward, per token (frame x item) and per transformer layer, in multiples of the
# model width D, fp32. Measured by benchmarks/bench_memory.py (autograd's saved tensors) on the custom-attention LM
# (hidden_scale 4, dropout 0) at D = 64-256: 19.9-20.4 D per layer without checkpointing, 1.0 D with it (the layer's
# input), plus one layer's full set while the backward recomputes it. `logits` is per token and per codebook bin:
# the fp32 logits saved for the cross-entropy (measured 0.95) and their gradient during the backward.
# `lora_dropout_d`: LoRA's dropout on the inputs of its nn.Linear targets (out projections and FFN; default targets,
# dropout > 0) keeps a dropped-out copy of each: measured 7.6-8.2 D per layer (D = 128, 256); 0 without dropout.
ACTIVATION_MODEL = {'per_layer_d': 20.5, 'checkpointed_layer_d': 1.0, 'logits': 2.0, 'lora_dropout_d': 8.0}
# bf16/fp16 autocast saves the half-precision copies its matmuls read *and* the fp32 tensors around them (norms,
# residuals): measured on CPU bf16 autocast, the saved bytes equal fp32's (ratio 1.01). Not yet measured on CUDA.
AUTOCAST_ACTIVATION_RATIO = 1.0
# LoRA on a fused in_proj_weight (peft's target_parameters) rebuilds the whole [3D, D] weight W + B @ A at every
# forward, and autograd keeps it for the backward: 3 D^2 values per targeted projection and layer, whatever the batch.
# Measured by benchmarks/bench_training.py on medium's architecture (CPU, fp32): 3.56 GB saved for one 1 x 2 s
# step, of which 48 x 2 x 28.3 MB are these weights. Under CUDA autocast the matmul also keeps the half-precision
# copy it reads (assumed, not yet measured on a GPU).
LORA_FUSED_WEIGHT_BYTES = 4
CUDA_OVERHEAD = 0.8 * GB  # CUDA context, cuBLAS/cuDNN workspaces
FRAGMENTATION = 0.10  # the caching allocator's slack on top of live tensors


@dataclasses.dataclass
class Counts:
    """Parameter counts of a configured model."""

    lm: int
    trainable: int
    t5: int
    codec: int


@dataclasses.dataclass
class Plan:
    """Memory of one training process on one GPU, by component, in bytes."""

    components: list[tuple[str, float, str]]
    counts: Counts
    gpu_bytes: float
    overrides: list[str]

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.components)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes


def t5_counts(name: str) -> tuple[int, int]:
    """(encoder parameters, width) of a T5 model: from its cached config when present, else the known sizes."""
    try:
        from transformers import T5Config, T5EncoderModel

        config = T5Config.from_pretrained(name, local_files_only=True)
        with torch.device('meta'):
            encoder = T5EncoderModel(config)
        return sum(p.numel() for p in encoder.parameters()), int(config.d_model)
    except Exception:
        if name not in T5_ENCODERS:
            raise adapters.AdapterError(
                f"Unknown T5 encoder '{name}' and it is not in the local HF cache: the planner can't count it. "
                f'Fetch it once (python -c "from transformers import T5Config; T5Config.from_pretrained(\'{name}\')") '
                f'or use one of {", ".join(T5_ENCODERS)}.'
            ) from None
        return T5_ENCODERS[name]


def build_on_meta(cfg: DictConfig) -> tp.Any:
    """The configured LM (with its LoRA adapters and freezing) on the meta device: shapes only, no memory."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(cfg, False)
    description = cfg.conditioners.description
    if description.model == 't5':
        # The LM holds T5's output projection only (T5 itself stays outside its state): a lookup table of the same
        # width has the same projection; its 1-row table is subtracted by the caller.
        description.model = 'lut'
        description.lut.dim = t5_counts(str(description.t5.name))[1]
        description.lut.n_bins = 1
        description.lut.tokenizer = 'noop'
    adapters.check_settings(cfg)
    lm = build_lm_model(cfg, device='meta', dtype='float32')
    if adapters.enabled(cfg):
        adapters.inject_lora(lm, cfg.adapter)
    elif cfg.freeze.first_layers or cfg.freeze.embeddings or cfg.freeze.conditioner:
        adapters.freeze(lm, cfg)
    return lm


def count(cfg: DictConfig, package_codec: int | None = None) -> Counts:
    """Parameter counts of the configured LM, its T5 encoder and its codec."""
    lm = build_on_meta(cfg)
    total = sum(p.numel() for p in lm.parameters())
    trainable = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    t5 = 0
    if cfg.conditioners.description.model == 't5':
        t5, width = t5_counts(str(cfg.conditioners.description.t5.name))
        total -= width  # the stand-in lookup table's single row
        if lm.condition_provider.conditioners['description'].embed.weight.requires_grad:
            trainable -= width
    return Counts(lm=total, trainable=trainable, t5=t5, codec=package_codec or CODEC_PARAMS)


def activation_bytes(cfg: DictConfig, batch: int, peak: bool = True) -> float:
    """Activation bytes of one micro-batch of ``batch`` clips at ``dataset.segment_duration`` (see ACTIVATION_MODEL).

    Args:
        peak: include what exists only during the backward (the recomputed layer under checkpointing, the logits'
            gradient); False gives the bytes saved at the end of the forward, what the calibration measures.
    """
    lm = cfg.transformer_lm
    frame_rate = 50  # the 16 kHz EnCodec's 320-sample hop; every AudioGen/MusicGen codec is 50 Hz
    steps = math.ceil(float(cfg.dataset.segment_duration) * frame_rate) + len(cfg.codebooks_pattern.delay.delays) - 1
    tokens = batch * steps
    width = 4 if not _autocast(cfg) else 4 * AUTOCAST_ACTIVATION_RATIO
    per_layer = ACTIVATION_MODEL['per_layer_d']
    if (
        adapters.enabled(cfg)
        and float(cfg.adapter.dropout) > 0
        and any(target not in adapters.PARAM_TARGETS for target in cfg.adapter.targets)
    ):
        per_layer += ACTIVATION_MODEL['lora_dropout_d']
    if lm.checkpointing == 'none':
        layers = lm.num_layers * per_layer
    else:
        layers = lm.num_layers * ACTIVATION_MODEL['checkpointed_layer_d'] + peak * per_layer
    # The cross-entropy is computed in fp32: the saved logits, and at peak their gradient too.
    logits = (ACTIVATION_MODEL['logits'] if peak else 1.0) * lm.n_q * lm.card * 4
    return tokens * (layers * lm.dim * width + logits)


def lora_fused_weight_bytes(cfg: DictConfig, peak: bool = True) -> float:
    """Bytes of the rebuilt fused q/k/v weights that LoRA keeps for the backward (see LORA_FUSED_WEIGHT_BYTES).

    Without checkpointing every layer's are kept; with it only the layer being recomputed holds them (at peak).
    """
    if not adapters.enabled(cfg):
        return 0.0
    fused = sum(target in adapters.PARAM_TARGETS for target in cfg.adapter.targets)
    lm = cfg.transformer_lm
    layers = lm.num_layers if lm.checkpointing == 'none' else int(peak)
    size = LORA_FUSED_WEIGHT_BYTES + (2 if _autocast(cfg) else 0)
    return float(layers * fused * 3 * lm.dim * lm.dim * size)


def _autocast(cfg: DictConfig) -> bool:
    return bool(cfg.autocast) and str(cfg.device).startswith('cuda')


def plan(cfg: DictConfig, gpu_gb: float, overrides: tp.Sequence[str] = (), counts: Counts | None = None) -> Plan:
    """The memory of training ``cfg`` on one GPU of ``gpu_gb`` GB.

    Args:
        cfg: a composed training config (``project.compose``).
        gpu_gb: the GPU's memory in GB (1e9 bytes, as GPU vendors count).
        overrides: the overrides that produced ``cfg`` (kept in the plan for display).
        counts: parameter counts, when already known for this model and adapter setup.
    """
    counts = counts or count(cfg)
    lora = adapters.enabled(cfg)
    cuda = str(cfg.device).startswith('cuda')
    world = 1
    batch = max(1, int(cfg.dataset.batch_size) // world)
    base_dtype = adapters.BASE_DTYPES[cfg.adapter.base_dtype] if lora and cuda else torch.float32
    base_size = torch.finfo(base_dtype).bits // 8
    frozen = counts.lm - counts.trainable
    optimizer_bytes = 2 if cfg.optim.optimizer == 'adamw8bit' else 8
    ema_on_gpu = bool(cfg.optim.ema.use) and str(cfg.optim.ema.device).startswith(('cuda', '${'))
    components = [
        ('weights (trainable, fp32)', counts.trainable * 4, f'{counts.trainable / 1e6:,.1f}M parameters'),
        (
            f'weights (frozen, {str(base_dtype).removeprefix("torch.")})',
            frozen * base_size,
            f'{frozen / 1e6:,.1f}M parameters',
        ),
        ('gradients', counts.trainable * 4, 'fp32, trainable parameters only'),
        (
            f'optimizer ({cfg.optim.optimizer})',
            counts.trainable * optimizer_bytes,
            '2 moments' + (' in 8 bits' if optimizer_bytes == 2 else ' in fp32'),
        ),
        (
            'EMA',
            counts.trainable * 4 if ema_on_gpu else 0,
            'on the GPU' if ema_on_gpu else ('host RAM (optim.ema.device=cpu)' if cfg.optim.ema.use else 'off'),
        ),
        ('text encoder (T5, frozen)', counts.t5 * 4, f'{counts.t5 / 1e6:,.0f}M parameters, fp32'),
        ('codec (frozen)', counts.codec * 4, 'encodes the batch'),
        (
            f'activations ({batch} x {float(cfg.dataset.segment_duration):g} s)',
            activation_bytes(cfg, batch),
            f'checkpointing={cfg.transformer_lm.checkpointing}' + (', autocast' if _autocast(cfg) else ', fp32'),
        ),
    ]
    rebuilt = lora_fused_weight_bytes(cfg)
    if rebuilt:
        components.append(('LoRA fused q/k/v weights', rebuilt, 'W + B @ A rebuilt per layer, kept for the backward'))
    live = sum(b for _, b, _ in components)
    components.append(
        (
            'CUDA context + allocator slack',
            CUDA_OVERHEAD + FRAGMENTATION * live,
            f'{CUDA_OVERHEAD / GB:.1f} GB + {FRAGMENTATION:.0%}',
        )
    )
    return Plan(components=components, counts=counts, gpu_bytes=gpu_gb * GB, overrides=list(overrides))


# Levers, tried in this order until the plan fits: each is an override a training command takes.
LEVERS: tuple[tuple[str, tp.Callable[[DictConfig], bool]], ...] = (
    ('adapter=lora', lambda cfg: not adapters.enabled(cfg)),
    ('transformer_lm.checkpointing=torch', lambda cfg: cfg.transformer_lm.checkpointing == 'none'),
    ('optim.optimizer=adamw8bit', lambda cfg: cfg.optim.optimizer == 'adamw'),
    ('optim.ema.device=cpu', lambda cfg: bool(cfg.optim.ema.use) and cfg.optim.ema.device != 'cpu'),
)


def make_it_fit(
    overrides: tp.Sequence[str], gpu_gb: float, compose: tp.Callable[[list[str]], DictConfig]
) -> Plan | None:
    """The first plan that fits, adding levers and then halving the micro-batch (doubling the accumulation, so the
    effective batch is unchanged); None when even a micro-batch of one clip doesn't fit."""
    extra: list[str] = []
    cfg = compose([*overrides])
    counts_cache: dict[bool, Counts] = {}

    def planned(cfg: DictConfig, current: list[str]) -> Plan:
        key = adapters.enabled(cfg)
        if key not in counts_cache:
            counts_cache[key] = count(cfg)
        return plan(cfg, gpu_gb, current, counts_cache[key])

    for lever, applies in LEVERS:
        current = planned(cfg, [*overrides, *extra])
        if current.fits:
            return current if extra else None
        if applies(cfg):
            extra.append(lever)
            cfg = compose([*overrides, *extra])
    batch, accum = int(cfg.dataset.batch_size), int(cfg.optim.grad_accum_steps)
    while True:
        current = planned(cfg, [*overrides, *extra])
        if current.fits:
            return current
        if batch == 1:
            return None
        batch, accum = max(1, batch // 2), accum * 2
        sizes = [f'dataset.batch_size={batch}', f'optim.grad_accum_steps={accum}']
        cfg = compose([*overrides, *extra, *sizes])
        extra = [e for e in extra if not e.startswith(('dataset.batch_size=', 'optim.grad_accum_steps='))] + sizes


def effective_batch(cfg: DictConfig) -> int:
    """Clips per optimizer update: ``dataset.batch_size`` (split across the GPUs of a run, solvers/train.py) times
    ``optim.grad_accum_steps``, the same at any number of GPUs."""
    return int(cfg.dataset.batch_size) * int(cfg.optim.grad_accum_steps)


def batch_note(cfg: DictConfig, preset: DictConfig) -> str:
    """One line on the effective batch of ``cfg``, against the one its presets (``preset``: no key overrides) set.

    Recipes keep the effective batch: a smaller micro-batch takes more accumulation. A command that changes it says
    so, and how to keep it.
    """
    ours, theirs = effective_batch(cfg), effective_batch(preset)
    text = (
        f'Effective batch: {cfg.dataset.batch_size} clips x {cfg.optim.grad_accum_steps} micro-batches = {ours} '
        'per update'
    )
    if ours == theirs:
        return f"{text}, the preset's."
    keep = theirs / int(cfg.dataset.batch_size)
    hint = f'optim.grad_accum_steps={int(keep)} keeps it; or ' if keep == int(keep) else ''
    return f"{text}; the preset's is {theirs}: this changes the optimisation ({hint}scale optim.lr with it)."


def format_plan(plan: Plan, title: str = 'Memory plan') -> str:
    """The plan as a table a user reads in a terminal or a log."""
    lines = [f'{title} (one process, GB = 1e9 bytes):']
    for name, size, note in plan.components:
        lines.append(f'  {name:<38} {size / GB:8.2f} GB   {note}')
    verdict = 'fits' if plan.fits else 'does NOT fit'
    lines.append(f'  {"total":<38} {plan.total / GB:8.2f} GB   {verdict} in {plan.gpu_bytes / GB:g} GB')
    c = plan.counts
    lines.append(
        f'  parameters: LM {c.lm / 1e6:,.1f}M ({c.trainable / 1e6:,.1f}M trainable), T5 {c.t5 / 1e6:,.0f}M, '
        f'codec {c.codec / 1e6:,.0f}M'
    )
    return '\n'.join(lines)


@torch.no_grad()
def _unique_bytes(tensors: tp.Iterable[torch.Tensor]) -> int:
    seen: dict[tp.Any, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), tensor.device)] = storage.nbytes()
    return sum(seen.values())


def measure_activation_bytes(step: tp.Callable[[], torch.Tensor], exclude: tp.Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd keeps for the backward of ``step()`` (its saved tensors, each storage counted once).

    Args:
        step: runs a forward pass and returns the loss.
        exclude: tensors not to count (the parameters, which are saved by reference).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in skip:
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = step()
    total = _unique_bytes(saved)
    loss.backward()
    return total


def peak_memory_gb(device: str) -> float:
    """Peak CUDA memory allocated on this process' GPU, or the process' peak RSS on CPU, in GB."""
    import resource

    if str(device).startswith('cuda') and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def out_of_memory_error(
    err: BaseException,
    cfg: DictConfig,
    argv: tp.Sequence[str],
    where: str,
    kept: tp.Any,
    compose: tp.Callable | None = None,
) -> Exception:
    """A training step ran out of GPU memory: what the planner expected and what would fit, as one AudiogenError.

    The caller frees the step's gradients first; nothing of the failed update is saved: the last checkpoint on
    disk is the one a re-run resumes from.

    Args:
        err: the out-of-memory error.
        cfg: the run's config.
        argv: the run's overrides (``xp.argv``), from which the fitting command is built.
        where: ``update U of epoch E``.
        kept: the last checkpoint's path.
        compose: composes a config from overrides (default: ``solvers.project.compose``).
    """
    from solvers import project
    from solvers.errors import AudiogenError

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    on_gpu = torch.cuda.is_available() and str(cfg.device).startswith('cuda')
    gpu_gb = torch.cuda.get_device_properties(cfg.device).total_memory / GB if on_gpu else 24.0
    lines = [f'Out of GPU memory in {where} ({str(err).splitlines()[0][:160]}).']
    try:
        lines.append(format_plan(plan(cfg, gpu_gb, list(argv)), 'The planner expected'))
        fitted = make_it_fit(list(argv), gpu_gb, compose or project.compose)
    except Exception as plan_err:  # the advice must never hide the error itself
        import logging

        logging.getLogger(__name__).debug('No memory plan: %s', plan_err)
        fitted = None
    if fitted is not None:
        import shlex

        lines.append('Re-run with: dora run ' + shlex.join(fitted.overrides))
    else:
        lines.append(
            'Re-run with adapter=lora transformer_lm.checkpointing=torch, or a smaller dataset.batch_size '
            'with a larger optim.grad_accum_steps (python -m scripts.plan_memory shows what fits).'
        )
    lines.append(
        f'Nothing was lost: {kept if kept.exists() else "the XP folder"} holds the last checkpoint; '
        'a re-run with the same overrides resumes from it. Changing batch or adapter starts a new XP.'
    )
    return AudiogenError('\n'.join(lines))
