"""Turn a training XP into a pretrained package that plain audiocraft loads: ``AudioGen.get_pretrained(dir)``.

An XP folder (``outputs/xps/<sig>/``) holds the LM weights and its config but not the codec, which stays in the
pretrained package the XP was fine-tuned from (``cfg.pretrained``). :func:`load_xp` gathers both into the same
in-memory package that :func:`export_xp` writes, so generating from an XP and from its export is one code path.

Package layout written (facebook/audiogen-medium's):

- ``state_dict.bin``: ``{'xp.cfg': YAML, 'best_state': LM weights, 'version', 'exported'}``; the config is the XP's
  with the package's conditioners/fuser/token pattern, interpolations resolved and machine-specific groups
  (``datasource``, ``slurm``, ``dora``) dropped.
- ``compression_state_dict.bin``: the codec itself (``xp.cfg`` + ``best_state``), never a ``{'pretrained': ...}``
  pointer: pointers are materialised.
- ``export.json``: provenance (XP, weights, epoch, versions). audiocraft ignores it.
"""

from __future__ import annotations

import dataclasses
import os
import typing as tp
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from solvers import atomic, project
from solvers.atomic import save_torch
from solvers.errors import AudiogenError
from solvers.models import adapters, identity, package
from solvers.models.checkpoint_io import safe_load
from solvers.models.references import find_xp, xps_dir

WEIGHTS = ('best', 'ema', 'last')
# Where each --weights choice lives in a solver checkpoint.
WEIGHT_KEYS = {'best': "'best_state'['model']", 'ema': "'ema'['state']['model']", 'last': "'model'"}
# Config groups that only describe the training machine and data: useless (and misleading) in a package.
MACHINE_KEYS = ('datasource', 'slurm', 'dora')


class ExportError(AudiogenError, RuntimeError):
    """An XP can't be read or exported; the message says what to do."""


@dataclasses.dataclass
class XPPackage:
    """A trained XP seen as a pretrained package, in memory.

    Attributes:
        folder: the XP folder.
        sig: its Dora signature (the folder name).
        weights: which weights were taken (best, ema or last).
        epoch: epochs completed in the checkpoint read.
        package: the resolved pretrained package the XP was fine-tuned from (holds the codec).
        lm_cfg: the full LM config, ready for ``audiocraft.models.builders.get_lm_model``.
        lm_state: the LM state dict (conditioner included); for a LoRA XP, the adapters merged into the base.
        adapter: for a LoRA XP, ``{'adapter_state': ..., 'adapter_layout': ...}`` (the unmerged adapters).
    """

    folder: Path
    sig: str
    weights: str
    epoch: int
    package: str
    lm_cfg: DictConfig
    lm_state: dict
    adapter: dict | None = None


def _pick_weights(state: dict, weights: str, path: Path) -> dict:
    if weights == 'best':
        best = state.get('best_state') or state.get('fsdp_best_state') or {}
        lm = best.get('model')
    elif weights == 'ema':
        ema = state.get('ema')
        lm = ema.get('state', {}).get('model') if isinstance(ema, dict) else None
    elif weights == 'last':
        lm = state.get('model')
    else:
        raise ExportError(f"Unknown weights '{weights}': choose one of {', '.join(WEIGHTS)}.")
    if not lm:
        hint = ' (the XP ran without an EMA: optim.ema.use was false)' if weights == 'ema' else ''
        available = [w for w in WEIGHTS if w != weights and _has_weights(state, w)]
        raise ExportError(
            f'{path} holds no {weights} weights ({WEIGHT_KEYS[weights]}){hint}. '
            f'Available: {", ".join(available) or "none"}; pass --weights with one of them.'
        )
    return dict(lm)


def _has_weights(state: dict, weights: str) -> bool:
    try:
        return bool(_pick_weights(state, weights, Path()))
    except ExportError:
        return False


def lm_config_for_package(xp_cfg: DictConfig | str, pkg: str) -> DictConfig:
    """The XP's config made self-contained: the package's architecture sub-trees, resolved, no machine keys.

    The generation window (``dataset.segment_duration``, which ``AudioGen`` uses as ``max_duration``) is the larger
    of the XP's training segment and the package's: fine-tuning on short clips doesn't shrink what the model can
    generate in one window (positions are sinusoidal), and keeping the pretrained 10 s avoids needless sliding-window
    steps.

    Args:
        xp_cfg: the XP's config (``checkpoint['xp.cfg']``).
        pkg: the resolved package the XP was fine-tuned from.
    """
    cfg = OmegaConf.create(xp_cfg) if isinstance(xp_cfg, str) else xp_cfg.copy()
    assert isinstance(cfg, DictConfig), f'xp.cfg must be a mapping, got {type(cfg).__name__}'
    OmegaConf.set_struct(cfg, False)
    package_cfg = package.lm_config(pkg)
    package.check_and_merge(cfg, package_cfg, pkg)
    windows = [OmegaConf.select(c, 'dataset.segment_duration') for c in (cfg, package_cfg)]
    windows = [float(w) for w in windows if isinstance(w, (int, float))]
    if windows:
        OmegaConf.update(cfg, 'dataset.segment_duration', max(windows), force_add=True)
    cfg.device = 'cpu'
    cfg.dtype = 'float32'
    for key in MACHINE_KEYS:
        cfg.pop(key, None)
    OmegaConf.resolve(cfg)
    return cfg


def load_xp(spec: str | os.PathLike, weights: str = 'best') -> XPPackage:
    """Read an XP's weights and config, and locate the package holding its codec. Builds no model and no dataset.

    Args:
        spec: an XP folder or a Dora signature (looked up under :func:`xps_dir`).
        weights: ``best`` (checkpoint ``best_state``: the EMA weights at the best valid epoch when the EMA is on),
            ``ema`` (the EMA at the last epoch) or ``last`` (the raw weights at the last epoch).
    Raises:
        ExportError: not an XP, unreadable checkpoint, or the chosen weights are absent.
        package.PackageError: the package the XP was trained from can't be found or doesn't match.
    """
    if weights not in WEIGHTS:
        raise ExportError(f"Unknown weights '{weights}': choose one of {', '.join(WEIGHTS)}.")
    folder = find_xp(spec)
    if folder is None:
        raise ExportError(
            f"'{spec}' is not a training XP: expected an XP folder holding checkpoint.th or a Dora signature "
            f'of a run under {xps_dir()}.'
        )
    path = folder / 'checkpoint.th'
    if not path.is_file():
        if weights != 'best':
            raise ExportError(
                f'{folder} has only checkpoint_best.th, which holds the best weights only: use --weights best.'
            )
        path = folder / 'checkpoint_best.th'
    state = safe_load(path, mmap=True)  # mapped: a medium checkpoint with its optimizer is ~30 GB
    if 'xp.cfg' not in state:
        raise ExportError(f"{path} has no 'xp.cfg': it is not a solver checkpoint of this project or audiocraft.")
    lm_state = _pick_weights(state, weights, path)
    xp_cfg = OmegaConf.create(state['xp.cfg']) if isinstance(state['xp.cfg'], str) else state['xp.cfg']
    if not isinstance(xp_cfg, DictConfig):
        raise ExportError(f"{path}: 'xp.cfg' is not a config mapping.")
    pretrained = OmegaConf.select(xp_cfg, 'pretrained', default=None)
    if not pretrained:
        raise ExportError(f"{path}: its config has no `pretrained` package, so the codec can't be found.")
    try:
        pkg = package.resolve(pretrained, base_dir=project.resolve_path('.'))
    except package.PackageError as err:
        raise package.PackageError(
            f"XP {folder.name} was fine-tuned from the package '{pretrained}', which holds its codec: {err}"
        ) from err
    identity.verify(folder, pkg)  # the package must still hold the weights the XP was fine-tuned from
    adapter, lm_state = _lora_parts(state, xp_cfg, lm_state, pkg, path)
    return XPPackage(
        folder=folder,
        sig=str(state.get('xp.sig') or folder.name),
        weights=weights,
        epoch=len(state.get('history') or []),
        package=pkg,
        lm_cfg=lm_config_for_package(xp_cfg, pkg),
        lm_state=lm_state,
        adapter=adapter,
    )


def _lora_parts(state: dict, xp_cfg: DictConfig, lm_state: dict, pkg: str, path: Path) -> tuple[dict | None, dict]:
    """For a LoRA XP, its adapters and layout, and the LM weights merged over the base package; else (None, as is)."""
    if OmegaConf.select(xp_cfg, 'adapter.kind', default='none') != 'lora':
        return None, lm_state
    layout = state.get('adapter_layout')
    if not layout:
        raise ExportError(
            f"{path} is a LoRA run but holds no 'adapter_layout': it was written by an older "
            "version; re-run the XP's command once to rewrite its checkpoint."
        )
    adapter = {'adapter_state': lm_state, 'adapter_layout': layout}
    return adapter, adapters.merge_state(package.lm_state(pkg), lm_state, layout)


def codec_files(pkg: str) -> tuple[str, dict]:
    """The codec of a package as (config YAML, state dict), following ``{'pretrained': ...}`` pointers.

    Raises:
        ExportError: the pointer names a codec audiocraft can't rebuild from a config (DAC, HF transformers EnCodec).
    """
    data = package.load_file(package.base_of(pkg), package.COMPRESSION_FILE)
    chain = [pkg]
    while 'pretrained' in data:
        target = str(data['pretrained'])
        chain.append(target)
        # CompressionModel.get_pretrained reads an audiocraft codec only from an existing path (a package dir or the
        # file itself); any other name goes to HF transformers' EnCodec or DAC, which have no audiocraft config.
        path = Path(target).expanduser()
        if len(chain) > 5 or not path.exists():
            raise ExportError(
                f"The codec of '{pkg}' is a pointer ({' -> '.join(chain)}) to a model audiocraft loads through HF "
                "transformers or DAC, which can't be stored as an audiocraft codec. Export needs an audiocraft "
                "EnCodec package (AudioGen's own 16 kHz codec is one)."
            )
        if path.is_dir():
            data = package.load_file(str(path), package.COMPRESSION_FILE)
        else:
            data = package.load_file(str(path.parent), path.name)
    cfg = data['xp.cfg']
    return (cfg if isinstance(cfg, str) else OmegaConf.to_yaml(cfg)), dict(data['best_state'])


def _check_destination(out: Path, force: bool, protected: tp.Sequence[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f'{out} exists and is not a directory.')
    for other in protected:
        other = other.resolve()
        if out == other or out in other.parents:
            raise ExportError(
                f'Refusing to export into {out}: it holds {other}, which the export reads. Choose another OUT_DIR.'
            )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f'{out} is not empty. Choose an empty or new OUT_DIR, or pass --force to replace it.')


def versions() -> dict:
    """audiogen-finetune, audiocraft and torch versions."""
    import importlib.metadata

    import audiocraft

    try:
        ours = importlib.metadata.version('audiogen-finetune')
    except importlib.metadata.PackageNotFoundError:
        ours = 'unknown'
    return {'audiogen_finetune': ours, 'audiocraft': audiocraft.__version__, 'torch': torch.__version__}


def export_xp(
    spec: str | os.PathLike,
    out_dir: str | os.PathLike,
    weights: str = 'best',
    half: bool = False,
    force: bool = False,
    merge: bool = False,
) -> Path:
    """Write an XP as a package that ``AudioGen.get_pretrained(out_dir)`` and ``scripts/generate.py`` load.

    A LoRA XP is written as an adapter-only export (``adapter.bin``: the adapters and the name of their base
    package; megabytes), which our generate and evaluate scripts load over the base, unless ``merge`` folds the
    adapters into the base weights and writes a standard package that plain audiocraft loads.

    The package is written into a temporary directory beside ``out_dir`` and renamed into place, so ``out_dir`` is
    either untouched or complete. With ``force``, an existing ``out_dir`` is replaced (moved aside, then deleted).

    Args:
        spec: an XP folder or Dora signature.
        out_dir: destination directory; must be absent or empty unless ``force``.
        weights: best, ema or last (see :func:`load_xp`).
        half: store the LM weights in float16 (half the size; audiocraft casts them back on load).
        force: replace a non-empty ``out_dir``.
        merge: for LoRA XPs, write the merged full package instead of the adapters alone.
    Returns:
        The package directory.
    """
    out = Path(out_dir).expanduser().resolve()
    folder = find_xp(spec)
    _check_destination(out, force, [folder] if folder else [])  # fail fast, before reading a large checkpoint
    xp = load_xp(spec, weights)
    protected = [xp.folder] + ([Path(xp.package)] if Path(xp.package).is_dir() else [])
    _check_destination(out, force, protected)
    adapter_only = xp.adapter is not None and not merge
    provenance = {
        'xp': str(xp.folder),
        'sig': xp.sig,
        'weights': xp.weights,
        'epoch': xp.epoch,
        'pretrained': xp.package,
        'base_checksum': identity.package_identity(xp.package)['checksum'],
        'half': half,
        'max_duration': xp.lm_cfg.dataset.segment_duration,
        'kind': 'adapter' if adapter_only else 'package',
        'versions': versions(),
    }
    with atomic.open_dir(out) as tmp:
        if adapter_only:
            _write_adapter(tmp, xp, half)
        else:
            codec_cfg, codec_state = codec_files(xp.package)
            package.write(tmp, xp.lm_cfg, _maybe_half(xp.lm_state, half), codec_cfg, codec_state)
        atomic.write_json(tmp / 'export.json', provenance)
    return out


def _maybe_half(state: dict, half: bool) -> dict:
    """``state`` with its floating-point tensors in float16 when ``half``."""
    return {
        k: v.half() if half and isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()
    }


def _write_adapter(folder: Path, xp: XPPackage, half: bool) -> None:
    """An adapter-only export's ``adapter.bin``: the adapters, their layout and the name of their base package."""
    assert xp.adapter is not None
    save_torch(
        {
            'xp.cfg': OmegaConf.to_yaml(xp.lm_cfg),
            'base': xp.package,
            'base_checksum': identity.package_identity(xp.package)['checksum'],  # checked at every load
            'adapter_state': _maybe_half(xp.adapter['adapter_state'], half),
            'adapter_layout': xp.adapter['adapter_layout'],
            'version': versions()['audiocraft'],
            'exported': True,
        },
        folder / package.ADAPTER_FILE,
    )
