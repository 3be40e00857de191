"""Batch text-to-sound generation: load any model reference, sample with per-item seeds, write files and sidecars.

Models: an HF id, a local package dir (ours or an export), or a training XP (signature or folder) with its best, EMA
or last weights. Every model ends up as an ``audiocraft.models.AudioGen`` and is sampled through its ``generate``,
whose LM decoding goes through
:mod:`solvers.generation.fastgen` (the same tokens as audiocraft's, faster) unless the model
was loaded with ``decoder='stock'``. It is the one generation path: scripts/generate.py and scripts/evaluate.py
(:func:`run`), and training's epoch samples and evaluate stage and the demo report (:func:`generate_clips`, the
solver's LM wrapped by :func:`training_audiogen`) all batch with :func:`clip_batches` and sample with
:func:`generate_batch`.

Reproducibility (see docs/generate.md):

- Each item (prompt x seed) draws its sampling randomness from its own ``torch.Generator`` seeded with its seed, on
  the CPU. audiocraft samples a whole batch from the global RNG (``audiocraft.utils.utils.multinomial``); while we
  generate, :class:`PerItemSampler` replaces that function with inverse-CDF sampling fed by the per-item streams. The
  distribution is the same; what changes is that an item's draws no longer depend on its batch neighbours.
- audiocraft's cross-attention has no padding mask, so a text conditioner that pads (T5) makes an item's output
  depend on the longest prompt of its batch. Batches therefore only mix prompts whose conditioning has the same
  shape (:func:`plan_batches`); items of one prompt always share that shape.
- So the same command reproduces its files exactly on the same device and software, and re-running a single seed
  (``--seeds 7``) reproduces that seed's file up to float rounding of differently sized batched kernels: bit-exact
  on CPU in our tests; on GPU a last-bit difference can flip one sample and make the clip diverge.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import logging
import math
import os
import shlex
import sys
import time
import typing as tp
from pathlib import Path

import torch

from solvers import atomic
from solvers.errors import AudiogenError
from solvers.generation import audio_io, fastgen
from solvers.models import export, package, references
from solvers.models.lm import build_lm_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL = 'facebook/audiogen-medium'
FORMATS = ('wav', 'flac', 'mp3', 'ogg')
DTYPES = ('auto', 'float32', 'float16', 'bfloat16')
MAX_SEED = 2**63 - 1
# Uniforms drawn per item and per refill of the sampler's buffer. Part of the reproducibility contract: an item's
# stream is its generator's successive draws of this size, so changing it changes every sampled clip.
_UNIFORM_CHUNK = 4096


class GenerationError(AudiogenError, ValueError):
    """Bad input for generation (prompts, parameters, model reference); the message says what to change."""


# ---------------------------------------------------------------------------------------------------- models
@dataclasses.dataclass
class ModelSource:
    """Where a model came from, as recorded in every sidecar.

    Attributes:
        given: the reference as the user wrote it.
        kind: ``hub`` (HF id), ``package`` (local package dir) or ``xp`` (training XP).
        path: the resolved HF id, package dir or XP folder.
        weights: for XPs, best/ema/last; None otherwise.
        sig: for XPs, the Dora signature.
        epoch: for XPs, epochs completed in the checkpoint.
        package: for XPs, the package holding the codec.
    """

    given: str
    kind: str
    path: str
    weights: str | None = None
    sig: str | None = None
    epoch: int | None = None
    package: str | None = None

    def cli_reference(self) -> str:
        """The ``--model`` value that finds this model again from any directory."""
        if self.kind == 'xp' and self.sig and (references.xps_dir() / self.sig).resolve() == Path(self.path).resolve():
            return self.sig
        return self.path


def resolve_model(spec: str, weights: str | None = None) -> ModelSource:
    """Classify a ``--model`` value: an existing dir (package or XP folder), an XP signature, or an HF id.

    Args:
        spec: the user's reference.
        weights: best/ema/last; only XPs hold more than one set of weights.
    Raises:
        references.ReferenceError: unknown reference, or a signature-shaped one that names no XP.
        GenerationError: ``weights`` given for a package.
    """
    spec = str(spec).strip()
    if not spec:
        raise GenerationError('--model is empty: pass an HF id, a package directory, or an XP signature/folder.')
    if weights is not None and weights not in export.WEIGHTS:
        raise GenerationError(f'--weights {weights}: choose one of {", ".join(export.WEIGHTS)}.')
    ref = references.resolve(spec)
    if ref.kind == 'xp':
        return ModelSource(given=spec, kind='xp', path=ref.path, weights=weights or 'best', sig=ref.sig)
    if weights not in (None, 'best'):
        raise GenerationError(
            f"--weights {weights} applies to training XPs; '{spec}' is a pretrained package, which "
            "holds one set of weights. Drop --weights, or pass the XP's signature or folder."
        )
    return ModelSource(given=spec, kind=ref.kind, path=ref.path)


def pick_device(device: str = 'auto') -> str:
    """``auto`` → cuda when available, else cpu; an explicit CUDA device must exist."""
    if device in (None, '', 'auto'):
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise GenerationError(f'--device {device}: no CUDA device is available here. Use --device cpu (or auto).')
    try:
        torch.device(device)
    except RuntimeError as err:
        raise GenerationError(f'--device {device}: {err}. Use auto, cpu or cuda[:N].') from err
    return device


def pick_dtype(dtype: str, device: str) -> str:
    """``auto`` → float32 on CPU, float16 on GPU (what audiocraft's loaders pick); bfloat16/float16 need a GPU."""
    if dtype not in DTYPES:
        raise GenerationError(f'--dtype {dtype}: choose one of {", ".join(DTYPES)}.')
    if dtype == 'auto':
        return 'float32' if str(device) == 'cpu' else 'float16'
    if str(device) == 'cpu' and dtype != 'float32':
        raise GenerationError(
            f'--dtype {dtype} needs a GPU: audiocraft generates in float32 on the CPU. '
            'Use --dtype float32 (or auto) with --device cpu.'
        )
    return dtype


@functools.cache
def _audiogen_class() -> type:
    """The AudioGen subclass we generate with (built lazily: importing audiocraft.models takes seconds)."""
    from audiocraft.models import AudioGen

    class ClipwiseAudioGen(AudioGen):
        """``AudioGen`` whose LM decodes through :mod:`solvers.generation.fastgen` and whose codec decodes one clip
        at a time.

        ``decoder`` (``fast``, ``graph`` or ``stock``) picks the LM decoding; audiocraft's own ``_generate_tokens``
        (its sliding-window extension included) runs unchanged around it. ``decoder_used`` is what last ran:
        ``stock`` when the LM is outside what the fast path reproduces.

        A batched codec decode differs from a single-clip decode in the last float bits (convolution blocking),
        which would make a clip's file depend on its batch neighbours; decoding clip by clip makes the audio a
        function of its tokens only. The codec is a small share of the time next to the LM's autoregressive steps.
        """

        decoder: str = 'fast'
        decoder_used: str | None = None

        def _generate_tokens(
            self, attributes: list, prompt_tokens: torch.Tensor | None, progress: bool = False
        ) -> torch.Tensor:
            with fastgen.decoding(self.lm, self.decoder) as used:
                self.decoder_used = used
                return super()._generate_tokens(attributes, prompt_tokens, progress)

        def generate_audio(self, gen_tokens: torch.Tensor) -> torch.Tensor:
            return torch.cat([super(ClipwiseAudioGen, self).generate_audio(t[None]) for t in gen_tokens])

    return ClipwiseAudioGen


def build_audiogen(
    name: str, compression_model: tp.Any, lm: tp.Any, decoder: str = 'fast', max_duration: float | None = None
):
    """Our ``AudioGen`` (clip-wise codec decoding, ``decoder`` for the LM) around a codec and an LM.

    Args:
        name: the model's name (recorded by audiocraft).
        compression_model: the codec.
        lm: the LM; it needs ``lm.cfg`` unless ``max_duration`` is given.
        decoder: one of :data:`solvers.generation.fastgen.DECODERS`.
        max_duration: the generation window in seconds (default: the LM's ``dataset.segment_duration``).
    """
    fastgen.check_decoder(decoder, next(iter(lm.parameters())).device)
    model = _audiogen_class()(name, compression_model, lm, max_duration=max_duration)
    model.decoder = decoder
    return model


def training_audiogen(
    name: str, compression_model: tp.Any, lm: tp.Any, decoder: str, segment_duration: float, duration: float, autocast
):
    """The ``AudioGen`` that training's samples and evaluate stage generate with: the solver's LM and codec (no
    copy) under the solver's autocast, with the window :func:`load_model` gives the XP's export.

    The window is the training segment, as scripts/generate.py's (``dataset.segment_duration`` of the XP), so a clip
    is the one the CLI makes of the same weights and seed. audiocraft needs a window longer than its 2 s
    sliding-window stride; below that (which the CLI refuses) the window fits the clip in one pass instead.

    Args:
        name: the model's name.
        compression_model: the solver's codec.
        lm: the solver's LM (left in eval mode: the caller restores its mode).
        decoder: ``generate.decoder``.
        segment_duration: ``dataset.segment_duration``.
        duration: seconds per clip.
        autocast: the solver's autocast context.
    """
    window = float(segment_duration) if segment_duration > 2 else max(float(duration), 10.0)
    model = build_audiogen(name, compression_model, lm, decoder, max_duration=window)
    model.autocast = autocast
    return model


def load_model(source: ModelSource, device: str = 'cpu', decoder: str = 'fast', dtype: str = 'auto'):
    """Build the ``AudioGen`` a :class:`ModelSource` names (records the XP's epoch/package into ``source``).

    The model is an ``AudioGen`` subclass (``ClipwiseAudioGen``) that changes how the LM decodes (``decoder``:
    ``fast``, the same tokens as audiocraft's, faster; ``graph``, CUDA graphs; ``stock``, audiocraft's own loop) and
    decodes the codec clip by clip; the rest is audiocraft's ``AudioGen.generate``.

    Args:
        source: the model reference.
        device: cpu or cuda[:N].
        decoder: one of :data:`solvers.generation.fastgen.DECODERS`.
        dtype: the LM's weights and autocast dtype (:data:`DTYPES`; ``auto`` as audiocraft's loaders).

    Packages are read with ``weights_only=True`` through :mod:`solvers.models.package`, so a hub
    id that isn't cached while
    offline fails with a PackageError explaining HF_HUB_OFFLINE rather than a hub traceback.
    """
    if source.kind == 'xp':
        xp = export.load_xp(source.path, source.weights or 'best')
        source.sig, source.epoch, source.package = xp.sig, xp.epoch, xp.package
        cfg, state, pkg = xp.lm_cfg, xp.lm_state, xp.package
        name = f'xp:{xp.sig}:{xp.weights}'
    else:
        pkg = source.path
        cfg, state = package.load_lm(pkg)
        name = source.path
    window = float(cfg.dataset.segment_duration)
    if window <= 2:
        raise GenerationError(
            f"{source.given}: its generation window dataset.segment_duration={window:g} s is too short; audiocraft's "
            'AudioGen needs more than 2 s (its default extend_stride). Re-export the model with a longer window.'
        )
    fastgen.check_decoder(decoder, device, naming='cli')
    dtype = pick_dtype(dtype, device)
    compression_model = package.load_compression_model(pkg, device)
    lm = build_lm_model(cfg, state, device=device, dtype=dtype)
    if 'self_wav' in lm.condition_provider.conditioners:
        raise GenerationError(f"{source.given} is conditioned on audio (self_wav), which AudioGen doesn't support.")
    model = build_audiogen(name, compression_model, lm, decoder)
    if dtype != 'float16' and str(device) != 'cpu':
        # audiocraft's GenModel always autocasts to float16 on GPU; follow the weights' dtype (none for float32).
        from audiocraft.utils.autocast import TorchAutocast

        model.autocast = TorchAutocast(
            enabled=dtype != 'float32', device_type=torch.device(device).type, dtype=getattr(torch, dtype)
        )
    return model


# ---------------------------------------------------------------------------------------------------- sampling
class PerItemSampler:
    """Draws each batch item's tokens from that item's own seeded generator (see the module docstring).

    Use as a context manager around ``AudioGen.generate``: it swaps ``audiocraft.utils.utils.multinomial`` (which
    ``sample_top_k``, ``sample_top_p`` and plain sampling all call) for inverse-CDF sampling, and restores it on exit.
    Calls it doesn't recognise (another batch size, more than one sample) go to the original function.

    Args:
        seeds: one seed per batch item, in batch order.
    """

    def __init__(self, seeds: tp.Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.buffer = torch.empty(len(seeds), 0)
        self._original: tp.Callable | None = None

    def __enter__(self) -> PerItemSampler:
        from audiocraft.utils import utils

        self._original = utils.multinomial
        utils.multinomial = self.multinomial
        return self

    def __exit__(self, *exc: tp.Any) -> None:
        from audiocraft.utils import utils

        utils.multinomial = self._original  # type: ignore[assignment]

    def uniforms(self, count: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        """The next ``count`` uniforms of every item's stream, [B, count], on ``device``.

        Drawn on the CPU (the same streams on any device) a chunk at a time and moved once per chunk, so a GPU
        sampling step doesn't wait on a host-to-device copy.
        """
        if self.buffer.device != torch.device(device):
            self.buffer = self.buffer.to(device)
        while self.buffer.shape[1] < count:
            fresh = torch.stack([torch.rand(_UNIFORM_CHUNK, generator=g) for g in self.generators])
            self.buffer = torch.cat([self.buffer, fresh.to(self.buffer.device)], dim=1)
        out, self.buffer = self.buffer[:, :count], self.buffer[:, count:]
        return out

    def multinomial(
        self,
        input: torch.Tensor,
        num_samples: int,
        replacement: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Same contract as ``audiocraft.utils.utils.multinomial`` for one sample per distribution."""
        batch = len(self.generators)
        if num_samples != 1 or generator is not None or input.dim() < 2 or input.shape[0] != batch:
            assert self._original is not None
            return self._original(input, num_samples, replacement, generator=generator)
        # float64: u * total stays strictly below the total, so a zero-probability token is never picked.
        probs = input.reshape(batch, -1, input.shape[-1]).double()
        cdf = probs.cumsum(-1)
        u = self.uniforms(probs.shape[1], probs.device).to(probs.dtype)
        target = (u * cdf[..., -1]).unsqueeze(-1)
        token = torch.searchsorted(cdf, target, right=True).clamp_(max=input.shape[-1] - 1)
        return token.reshape(*input.shape[:-1], 1)


# ---------------------------------------------------------------------------------------------------- planning
@dataclasses.dataclass
class GenerationParams:
    """Sampling settings, passed to ``AudioGen.set_generation_params``.

    Attributes:
        duration: seconds per clip; beyond the model's window audiocraft extends with a sliding window.
        top_k: sample among the k most likely tokens (0: no top-k).
        top_p: nucleus sampling threshold (0: off; when > 0 it wins over top_k).
        temperature: softmax temperature; 0 means greedy (argmax) decoding.
        cfg_coef: classifier-free guidance strength.
        extend_stride: seconds added per sliding-window step for clips longer than the window; None picks
            audiocraft's 2 s, capped at half the window.
    """

    duration: float = 5.0
    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    cfg_coef: float = 3.0
    extend_stride: float | None = None

    def check(self) -> None:
        """Raise GenerationError naming the first bad value."""
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise GenerationError(f'--duration must be a positive number of seconds, got {self.duration}.')
        if self.top_k < 0:
            raise GenerationError(f'--top_k must be >= 0 (0 disables top-k), got {self.top_k}.')
        if not 0.0 <= self.top_p <= 1.0:
            raise GenerationError(f'--top_p must be within [0, 1] (0 disables nucleus sampling), got {self.top_p}.')
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f'--temperature must be >= 0 (0 is greedy decoding), got {self.temperature}.')
        if not math.isfinite(self.cfg_coef):
            raise GenerationError(f'--cfg_coef must be a finite number, got {self.cfg_coef}.')
        if self.extend_stride is not None and not (math.isfinite(self.extend_stride) and self.extend_stride > 0):
            raise GenerationError(f'--extend-stride must be a positive number of seconds, got {self.extend_stride}.')

    @classmethod
    def from_config(cls, cfg: tp.Any, duration: float) -> GenerationParams:
        """Training's sampling settings (``generate.lm``, ``classifier_free_guidance.inference_coef``) for clips of
        ``duration`` seconds: what epoch samples and the evaluate stage use, as ``--top_k``, ``--temperature``...
        would give scripts/generate.py."""
        lm = cfg.generate.lm
        return cls(
            duration=float(duration),
            top_k=int(lm.top_k),
            top_p=float(lm.top_p),
            temperature=float(lm.temp) if lm.use_sampling else 0.0,
            cfg_coef=float(cfg.classifier_free_guidance.inference_coef),
        )

    def stride_for(self, max_duration: float) -> float:
        """The sliding-window stride for a model whose window is ``max_duration`` seconds."""
        if self.extend_stride is None:
            return min(2.0, max_duration / 2)
        if self.extend_stride >= max_duration:
            raise GenerationError(
                f"--extend-stride {self.extend_stride} must be shorter than the model's {max_duration:g} s window."
            )
        return self.extend_stride

    def apply(self, model) -> dict:
        """Set the parameters on an ``AudioGen``; return them as recorded in sidecars."""
        stride = self.stride_for(model.max_duration)
        model.set_generation_params(
            use_sampling=True,
            top_k=self.top_k,
            top_p=self.top_p,
            temperature=self.temperature,
            duration=self.duration,
            cfg_coef=self.cfg_coef,
            extend_stride=stride,
        )
        return {
            'duration': self.duration,
            'top_k': self.top_k,
            'top_p': self.top_p,
            'temperature': self.temperature,
            'cfg_coef': self.cfg_coef,
            'use_sampling': self.temperature > 0,
            'extend_stride': stride,
            'max_duration': float(model.max_duration),
            'two_step_cfg': False,
        }


@dataclasses.dataclass
class Item:
    """One clip to generate: a prompt, a seed and the folder its files go to."""

    prompt: str
    seed: int
    folder: Path | None = None


def add_seed_arguments(parser: tp.Any, batch_size: int, clip: str) -> None:
    """The weights and seed options of the generate and evaluate CLIs; ``clip`` names one clip (``variation``)."""
    parser.add_argument(
        '--weights', choices=('best', 'ema', 'last'), default=None, help='for XPs: best (default), ema or last weights'
    )
    parser.add_argument(
        '--batch_size',
        '--batch-size',
        type=int,
        default=batch_size,
        help=f'{clip}s per prompt, with seeds SEED..SEED+N-1 (default: %(default)s)',
    )
    parser.add_argument(
        '--seed', type=int, default=0, help=f'seed of the first {clip} of each prompt (default: %(default)s)'
    )
    parser.add_argument('--seeds', type=int, nargs='+', help='exact seeds (overrides --batch_size)')


def add_sampling_arguments(parser: tp.Any, extend_stride: bool = True) -> None:
    """The sampling options of the generate and evaluate CLIs, with :class:`GenerationParams`' defaults."""
    d = GenerationParams()
    parser.add_argument('--duration', type=float, default=d.duration, help='seconds per clip (default: %(default)s)')
    parser.add_argument(
        '--top_k', '--top-k', type=int, default=d.top_k, help='top-k sampling, 0 = off (default: %(default)s)'
    )
    parser.add_argument(
        '--top_p', '--top-p', type=float, default=d.top_p, help='nucleus sampling, 0 = off (default: %(default)s)'
    )
    parser.add_argument(
        '--temperature', type=float, default=d.temperature, help='0 = greedy decoding (default: %(default)s)'
    )
    parser.add_argument(
        '--cfg_coef',
        '--cfg-coef',
        type=float,
        default=d.cfg_coef,
        help='classifier-free guidance (default: %(default)s)',
    )
    if extend_stride:
        parser.add_argument(
            '--extend-stride',
            type=float,
            default=d.extend_stride,
            help='seconds per sliding-window step beyond the model window (default: 2, at most half the window)',
        )


def sampling_params(args: tp.Any) -> GenerationParams:
    """The :class:`GenerationParams` of parsed :func:`add_sampling_arguments` options."""
    return GenerationParams(
        duration=args.duration,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        cfg_coef=args.cfg_coef,
        extend_stride=getattr(args, 'extend_stride', None),
    )


def check_prompts(prompts: tp.Sequence[str]) -> list[str]:
    """Strip prompts, refuse empty ones, drop exact duplicates (with a warning), keep the order."""
    if not prompts:
        raise GenerationError('No prompt given: pass prompts as arguments (e.g. "dog barking") or --prompts-file.')
    kept: list[str] = []
    for i, prompt in enumerate(prompts, 1):
        text = str(prompt).strip()
        if not text:
            raise GenerationError(f'Prompt {i} of {len(prompts)} is empty or whitespace: give every prompt some text.')
        if text in kept:
            logger.warning('Prompt %r is given twice: generating it once.', text)
            continue
        kept.append(text)
    return kept


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompts from a UTF-8 text file: one per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except FileNotFoundError as err:
        raise GenerationError(f'--prompts-file {path}: no such file.') from err
    except UnicodeDecodeError as err:
        raise GenerationError(f'--prompts-file {path} is not UTF-8 text ({err}); save it as UTF-8.') from err
    except OSError as err:
        raise GenerationError(f'--prompts-file {path}: {err}') from err
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith('#')]
    if not prompts:
        raise GenerationError(f'--prompts-file {path} holds no prompt (only blank lines or # comments).')
    return prompts


def make_seeds(batch_size: int = 25, seed: int = 0, seeds: tp.Sequence[int] | None = None) -> list[int]:
    """Seeds of the variations of every prompt: ``seeds`` when given, else ``seed, seed+1, ..., seed+batch_size-1``.

    Variation ``i`` of any prompt gets seed ``seed + i``, so ``--seeds S`` (or ``--seed S --batch_size 1``)
    regenerates the file ``S.wav`` of an earlier run.
    """
    if seeds:
        chosen = [int(s) for s in seeds]
        if len(set(chosen)) != len(chosen):
            raise GenerationError(f'--seeds lists a seed twice: {chosen}.')
    else:
        if batch_size < 1:
            raise GenerationError(f'--batch_size must be >= 1 (variations per prompt), got {batch_size}.')
        chosen = [seed + i for i in range(batch_size)]
    bad = [s for s in chosen if not 0 <= s <= MAX_SEED]
    if bad:
        raise GenerationError(f'Seeds must be within [0, 2**63 - 1]; got {bad[0]}.')
    return chosen


def conditioning_shape(model, prompt: str) -> tuple:
    """The shapes of a prompt's tokenized conditioning: prompts with equal shapes pad identically in a batch."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    tokens = model.lm.condition_provider.tokenize([ConditioningAttributes(text={'description': prompt})])

    def shapes(value: tp.Any) -> tp.Any:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, dict):
            return tuple((k, shapes(v)) for k, v in sorted(value.items()))
        if isinstance(value, (list, tuple)):
            return tuple(shapes(v) for v in value)
        return None

    return shapes(tokens)


def plan_batches(
    items: tp.Sequence[Item], max_batch: int, key: tp.Callable[[str], tp.Hashable] = lambda prompt: 0
) -> list[list[Item]]:
    """Split items into batches of at most ``max_batch``; a batch only mixes prompts with the same ``key``.

    Items keep their order within a key; keys come in order of first appearance. The plan is a function of the
    inputs only, so a command always batches the same way.
    """
    groups: dict[tp.Hashable, list[Item]] = {}
    cache: dict[str, tp.Hashable] = {}
    for item in items:
        if item.prompt not in cache:
            cache[item.prompt] = key(item.prompt)
        groups.setdefault(cache[item.prompt], []).append(item)
    return [group[i : i + max_batch] for group in groups.values() for i in range(0, len(group), max_batch)]


def clip_batches(model, items: tp.Sequence[Item], max_batch: int) -> list[list[Item]]:
    """:func:`plan_batches` by conditioning shape: the batches every generation of this project uses."""
    return plan_batches(items, max_batch, key=lambda prompt: conditioning_shape(model, prompt))


def generate_clips(
    model, prompts: tp.Sequence[str], seeds: tp.Sequence[int], max_batch: int, progress: bool = False
) -> dict[tuple[str, int], torch.Tensor]:
    """Every prompt x seed, batched and sampled as scripts/generate.py does: the one generation path.

    Epoch samples, the evaluate stage, scripts/evaluate.py (through :func:`run`) and the demo report all come
    here or to :func:`run`, which share :func:`clip_batches` and :func:`generate_batch`: the same per-item seeded
    sampler, the same decoder choice (``model.decoder``) and the same clip-wise codec decode.

    Args:
        model: an ``AudioGen`` from :func:`load_model`, :func:`build_audiogen` or :func:`training_audiogen`, its
            generation parameters set (:meth:`GenerationParams.apply`).
        prompts: the prompts.
        seeds: each prompt's seeds.
        max_batch: items per forward pass.
        progress: log one line per batch.
    Returns:
        [C, T] float32 CPU clips by (prompt, seed).
    """
    items = [Item(p, s) for p in prompts for s in seeds]
    batches = clip_batches(model, items, max_batch)
    out: dict[tuple[str, int], torch.Tensor] = {}
    for n, batch in enumerate(batches, 1):
        if progress:
            logger.info('Generation batch %d/%d (%d clips)', n, len(batches), len(batch))
        audio = generate_batch(model, [i.prompt for i in batch], [i.seed for i in batch])
        out.update({(i.prompt, i.seed): wav for i, wav in zip(batch, audio)})
    return out


def generate_batch(
    model, prompts: tp.Sequence[str], seeds: tp.Sequence[int], progress: tp.Callable[[int, int], None] | None = None
) -> torch.Tensor:
    """``AudioGen.generate`` with per-item seeded sampling; returns float32 audio [B, C, T] on the CPU."""
    model.set_custom_progress_callback(progress)
    try:
        with PerItemSampler(seeds):
            audio = model.generate(list(prompts), progress=progress is not None)
    finally:
        model.set_custom_progress_callback(None)
    return audio.float().cpu()


# ---------------------------------------------------------------------------------------------------- output
def versions() -> dict:
    """audiogen-finetune, audiocraft and torch versions, as recorded in sidecars."""
    return export.versions()


def allocate_folder(root: Path, prompt: str, stamp: str) -> Path:
    """Create ``root/<slug>/<stamp>`` (``<stamp>-1``, ``-2``... when taken) and return it."""
    try:
        return atomic.new_dir(root / audio_io.slugify(prompt), stamp)
    except FileExistsError as err:
        raise GenerationError(f'{err}: remove old runs or pass another --out.') from err


def _finite(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def reproduce_command(
    item: Item,
    source: ModelSource,
    params: dict,
    fmt: str,
    target_lufs: float,
    device: str,
    decoder: str = 'fast',
    dtype: str = 'auto',
) -> str:
    """The CLI line that regenerates exactly this item's file (into a new timestamp folder)."""
    args = ['audiogen-generate', item.prompt, '--model', source.cli_reference()]
    if source.kind == 'xp':
        args += ['--weights', source.weights or 'best']
    args += [
        '--seeds',
        str(item.seed),
        '--duration',
        f'{params["duration"]:g}',
        '--top_k',
        str(params['top_k']),
        '--top_p',
        f'{params["top_p"]:g}',
        '--temperature',
        f'{params["temperature"]:g}',
        '--cfg_coef',
        f'{params["cfg_coef"]:g}',
        '--extend-stride',
        f'{params["extend_stride"]:g}',
        '--loudness',
        f'{target_lufs:g}',
        '--format',
        fmt,
        '--device',
        device,
        '--decoder',
        decoder,
        '--dtype',
        dtype,
    ]
    return shlex.join(args)


@dataclasses.dataclass
class RunConfig:
    """Everything one generation run needs besides the model.

    Attributes:
        prompts: text prompts (checked with :func:`check_prompts`).
        seeds: seeds of each prompt's variations (see :func:`make_seeds`).
        params: sampling settings.
        out: output root; files go to ``out/<prompt-slug>/<timestamp>/<seed>.<fmt>``.
        fmt: wav, flac, mp3 or ogg.
        loudness: target integrated loudness (LUFS); a soft limiter keeps peaks below -1 dBFS.
        max_batch: items per forward pass.
        progress: show a tqdm bar on stderr.
    """

    prompts: list[str]
    seeds: list[int]
    params: GenerationParams = dataclasses.field(default_factory=GenerationParams)
    out: Path = Path('out')
    fmt: str = 'wav'
    loudness: float = -14.0
    max_batch: int = 25
    progress: bool = True

    def check(self) -> None:
        """Validate everything that doesn't need the model; raise GenerationError."""
        self.prompts = check_prompts(self.prompts)
        if not self.seeds:
            raise GenerationError('No seed to generate: --batch_size must be >= 1 or --seeds must list seeds.')
        self.params.check()
        if self.fmt not in FORMATS:
            raise GenerationError(f'--format {self.fmt}: choose one of {", ".join(FORMATS)}.')
        if not (math.isfinite(self.loudness) and -70 < self.loudness < 0):
            raise GenerationError(f'--loudness must be a target in LUFS between -70 and 0, got {self.loudness}.')
        if self.max_batch < 1:
            raise GenerationError(f'--max-batch must be >= 1, got {self.max_batch}.')
        if self.out.exists() and not self.out.is_dir():
            raise GenerationError(f'--out {self.out} exists and is not a directory.')


def run(model, source: ModelSource, cfg: RunConfig, device: str) -> list[Path]:
    """Generate every prompt x seed in batches, write normalised audio and a JSON sidecar per clip.

    Folders are created once the model is loaded and the inputs checked. One writer thread normalises, encodes and
    writes batch *k* while batch *k + 1* generates (at most one batch waits in memory). Each audio file and sidecar
    is written atomically, the sidecar after its audio; a write error is raised here, in the caller's thread. An
    interrupted or failed run lets the writer finish the pair it is on, so it leaves only complete pairs, and removes
    the folders it created that are still empty.

    Args:
        model: an ``AudioGen`` (ours records its decoder in the sidecars; a plain one counts as ``stock``).
        source: where the model came from (recorded in sidecars).
        cfg: the run (checked here).
        device: the device the model is on (recorded).
    Returns:
        The audio files written, in generation order.
    """
    cfg.check()
    params = cfg.params.apply(model)
    items = [Item(prompt, seed) for prompt in cfg.prompts for seed in cfg.seeds]
    batches = clip_batches(model, items, cfg.max_batch)
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    root = cfg.out.expanduser().resolve()
    folders = {prompt: allocate_folder(root, prompt, stamp) for prompt in cfg.prompts}
    for item in items:
        item.folder = folders[item.prompt]
    common = _common_sidecar(model, source, cfg, params, device)
    writer = _Writer(model.sample_rate, cfg, source, params, common, device)
    progress = _Progress(len(items), cfg.progress)
    try:
        for n, batch in enumerate(batches, 1):
            begin = time.perf_counter()
            audio = generate_batch(model, [i.prompt for i in batch], [i.seed for i in batch], progress.on_step)
            progress.clips(writer.collect())  # the previous batch's files: complete (or its error raised) first
            seconds = time.perf_counter() - begin
            writer.submit(batch, audio, seconds / len(batch))
            progress.batch(n, len(batches), len(batch), seconds)
        progress.clips(writer.collect())
    except BaseException:
        writer.stop()
        for folder in folders.values():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty
        raise
    finally:
        writer.close()
        progress.close()
    return writer.written


def _common_sidecar(model, source: ModelSource, cfg: RunConfig, params: dict, device: str) -> dict:
    """The sidecar entries every clip of a run shares: the model, its settings, the decoder that ran, versions."""
    return {
        'model': source.given,
        'model_kind': source.kind,
        'model_path': source.path,
        'weights': source.weights,
        'xp_sig': source.sig,
        'xp_epoch': source.epoch,
        'pretrained': source.package,
        'params': params,
        'target_lufs': cfg.loudness,
        'format': cfg.fmt,
        'device': device,
        'decoder': fastgen.effective_decoder(model.lm, getattr(model, 'decoder', 'stock')),
        'dtype': str(next(iter(model.lm.parameters())).dtype).removeprefix('torch.'),
        'max_batch': cfg.max_batch,
        'versions': versions(),
    }


class _Progress:
    """A live bar on a terminal; in a log file (SLURM, a pipe) one line per batch instead of carriage returns."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.enabled, self.live = enabled, enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, unit='clip', desc='generating', disable=not self.live, dynamic_ncols=True)
        self.last_refresh = 0.0
        self.on_step = self._on_step if self.live else None

    def _on_step(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last_refresh > 0.5 or done == total:
            self.last_refresh = now
            self.bar.set_postfix_str(f'step {done}/{total}')

    def clips(self, count: int) -> None:
        self.bar.update(count)

    def batch(self, n: int, batches: int, clips: int, seconds: float) -> None:
        if self.enabled and not self.live:
            text = f'{clips} clip{"s" * (clips != 1)}'
            print(f'generating: batch {n}/{batches} ({text}) in {seconds:.1f} s', file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


class _Writer:
    """One background thread that writes a batch's clips and sidecars while the next batch generates."""

    def __init__(self, sample_rate: int, cfg: RunConfig, source: ModelSource, params: dict, common: dict, device: str):
        self.args = (sample_rate, cfg, source, params, common)
        self.device = device
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix='audiogen-writer')
        self.pending: concurrent.futures.Future | None = None
        self.stopping = False
        self.written: list[Path] = []

    def submit(self, batch: list[Item], audio: torch.Tensor, seconds: float) -> None:
        """Queue a batch's writes (after :meth:`collect` of the previous one)."""
        assert self.pending is None
        self.pending = self.pool.submit(self._write_batch, batch, audio, seconds)

    def collect(self) -> int:
        """Wait for the queued batch; return its clip count, or raise its write error."""
        if self.pending is None:
            return 0
        future, self.pending = self.pending, None
        paths = future.result()
        self.written.extend(paths)
        return len(paths)

    def stop(self) -> None:
        """Let the pair being written finish, skip the rest of the batch, and wait (its error is dropped: the
        caller is already raising)."""
        self.stopping = True
        if self.pending is not None:
            with contextlib.suppress(BaseException):
                self.written.extend(self.pending.result())
            self.pending = None

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _write_batch(self, batch: list[Item], audio: torch.Tensor, seconds: float) -> list[Path]:
        paths = []
        for item, wav in zip(batch, audio):
            if self.stopping:
                break
            paths.append(_write_item(item, wav, *self.args, seconds, self.device))
        return paths


def _write_item(
    item: Item,
    wav: torch.Tensor,
    sample_rate: int,
    cfg: RunConfig,
    source: ModelSource,
    params: dict,
    common: dict,
    seconds: float,
    device: str,
) -> Path:
    assert item.folder is not None
    wav = audio_io.normalize_loudness(wav, sample_rate, cfg.loudness)
    path = audio_io.write_audio(item.folder / f'{item.seed}.{cfg.fmt}', wav, sample_rate, fmt=cfg.fmt)
    peak = float(wav.abs().max())
    sidecar = {
        'prompt': item.prompt,
        'seed': item.seed,
        'file': path.name,
        **common,
        'duration': wav.shape[-1] / sample_rate,
        'sample_rate': sample_rate,
        'channels': wav.shape[0],
        'lufs': _finite(audio_io.loudness(wav, sample_rate)),
        'peak_dbfs': _finite(20 * math.log10(peak)) if peak > 0 else None,
        'generation_seconds': round(seconds, 4),
        'created': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'reproduce': reproduce_command(
            item, source, params, cfg.fmt, cfg.loudness, device, common['decoder'], common['dtype']
        ),
    }
    try:
        atomic.write_json(item.folder / f'{item.seed}.json', sidecar, overwrite=False)
    except BaseException:
        path.unlink(missing_ok=True)  # no audio without its sidecar
        raise
    return path
