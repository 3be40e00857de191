"""Pretrained packages in facebook/audiogen-medium's layout: resolve, read safely, check against a config, write.

A package is a directory (or an HF hub repo) holding two files:

- ``state_dict.bin``: ``{'xp.cfg': <YAML str>, 'best_state': <LM state dict>, 'version': str, 'exported': True}``
- ``compression_state_dict.bin``: the codec, either ``{'xp.cfg': <YAML str>, 'best_state': <state dict>}`` or a
  ``{'pretrained': <HF EnCodec id>}`` pointer (musicgen uses those; AudioGen's 16 kHz codec is always inline).

Everything here loads with ``torch.load(weights_only=True)``: packages hold only tensors, strings and numbers.
"""

from __future__ import annotations

import logging
import os
import re
import typing as tp
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from solvers.errors import AudiogenError

logger = logging.getLogger(__name__)

LM_FILE = 'state_dict.bin'
COMPRESSION_FILE = 'compression_state_dict.bin'
# An adapter-only export (scripts/export.py of a LoRA XP without --merge): LoRA weights + the base package they sit on.
ADAPTER_FILE = 'adapter.bin'
_HF_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')

# Keys that define the LM's parameters. A package and a config that disagree on any of them cannot share weights.
ARCHITECTURE_KEYS = (
    'sample_rate',
    'channels',
    'transformer_lm.dim',
    'transformer_lm.num_heads',
    'transformer_lm.num_layers',
    'transformer_lm.hidden_scale',
    'transformer_lm.n_q',
    'transformer_lm.card',
    'transformer_lm.activation',
    'transformer_lm.norm_first',
    'transformer_lm.bias_ff',
    'transformer_lm.bias_attn',
    'transformer_lm.bias_proj',
    'transformer_lm.norm',
    'transformer_lm.positional_embedding',
    'transformer_lm.layer_scale',
    'transformer_lm.kv_repeat',
    'transformer_lm.qk_layer_norm',
    'transformer_lm.qk_layer_norm_cross',
    'codebooks_pattern.modeling',
    'codebooks_pattern.delay.delays',
    'conditioners.description.model',
)
# Sub-trees taken verbatim from the package: they name the exact conditioner, fuser and token pattern the weights
# were trained with, so the config can't silently swap them.
PACKAGE_SUBTREES = ('conditioners', 'fuser', 'codebooks_pattern')


class PackageError(AudiogenError, RuntimeError):
    """A pretrained package is missing, unreadable or does not match the config."""


def resolve(name_or_path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> str:
    """Turn a user-given package reference into an absolute local dir or an HF hub id.

    Args:
        name_or_path: an HF id such as ``facebook/audiogen-medium`` or a directory (absolute, or relative to
            ``base_dir``).
        base_dir: where relative directories are looked up; defaults to the current directory.
    Returns:
        The absolute directory when it exists locally, else the HF id unchanged.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or os.getcwd()) / path
    if not path.is_dir() and _is_local_name(text):
        path = local_packages_dir() / text
        if not path.is_dir():
            hint = (
                'build it with `python -m scripts.make_tiny_package` (`make demo` does it)'
                if text == 'tiny'
                else 'export one there with `python -m scripts.export`, or pass an HF id or a directory'
            )
            raise PackageError(f"The pretrained package '{text}' is not built: expected it in {path}; {hint}.")
    if path.is_dir() and (path / ADAPTER_FILE).is_file():
        return str(path.resolve())  # an adapter export: its base is resolved when it is read
    if path.is_dir():
        missing = [f for f in (LM_FILE, COMPRESSION_FILE) if not (path / f).is_file()]
        if missing:
            raise PackageError(
                f'Pretrained package {path} lacks {", ".join(missing)}. A package dir holds {LM_FILE} (xp.cfg + '
                f'best_state) and {COMPRESSION_FILE}; build one with scripts/export.py or '
                'scripts/make_tiny_package.py.'
            )
        return str(path.resolve())
    if is_hub_id(text):
        return text
    raise PackageError(
        f"Pretrained package not found: '{text}' (looked for the directory {path}). Pass an HF id such as "
        f'facebook/audiogen-medium or a directory containing {LM_FILE} and {COMPRESSION_FILE}.'
    )


def local_packages_dir() -> Path:
    """Where packages named by a bare name (``pretrained=tiny``) live: ``<outputs>/pretrained/``."""
    from solvers.project import outputs_dir

    return outputs_dir() / 'pretrained'


def local_package(name: str) -> Path | None:
    """The built package a bare name (``tiny``) refers to, under :func:`local_packages_dir`; None if there is none."""
    path = local_packages_dir() / name
    return path if _is_local_name(name) and path.is_dir() else None


def _is_local_name(text: str) -> bool:
    """A bare package name such as ``tiny``: no path separator, not an HF id."""
    return bool(re.fullmatch(r'[A-Za-z0-9][\w.-]*', text)) and text not in ('.', '..')


def is_hub_id(name: str) -> bool:
    """True when ``name`` reads like a Hugging Face repo id (``owner/name``)."""
    return bool(_HF_ID.match(name)) and not name.startswith(('.', '/'))


def _fetch(package: str, filename: str) -> Path:
    """Local path of one package file, downloading it through the HF cache for hub ids."""
    local = Path(package)
    if local.is_dir():
        return local / filename
    import audiocraft
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(
                repo_id=package,
                filename=filename,
                cache_dir=os.environ.get('AUDIOCRAFT_CACHE_DIR'),
                library_name='audiocraft',
                library_version=audiocraft.__version__,
            )
        )
    except LocalEntryNotFoundError as err:
        raise PackageError(
            f"Cannot fetch {filename} of '{package}' from the Hugging Face hub: it is not in the local cache and "
            f"the hub can't be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Download it once "
            'on a machine with internet (the cache is ~/.cache/huggingface, or HF_HOME), or pass a local package '
            'directory.'
        ) from err
    except Exception as err:  # RepositoryNotFoundError, EntryNotFoundError, HTTP errors
        raise PackageError(f"Cannot fetch {filename} of '{package}' from the Hugging Face hub: {err}") from err


def load_file(package: str, filename: str) -> dict:
    """Load one package file with ``weights_only=True``, memory-mapped when possible.

    Args:
        package: a resolved package (see :func:`resolve`).
        filename: ``state_dict.bin`` or ``compression_state_dict.bin``.
    """
    from solvers.models.checkpoint_io import load_weights_only

    path = _fetch(package, filename)
    try:
        return load_weights_only(path)
    except Exception as err:
        raise PackageError(
            f'Cannot read {path}: {err}. Package files must be torch zip archives holding only tensors, strings '
            'and numbers (they are loaded with weights_only=True); re-export the package with scripts/export.py.'
        ) from err


def adapter_export(package: str) -> dict | None:
    """The contents of an adapter-only export (``adapter.bin``), or None for a regular package."""
    path = Path(package)
    if not (path.is_dir() and (path / ADAPTER_FILE).is_file()):
        return None
    data = load_file(package, ADAPTER_FILE)
    missing = [k for k in ('xp.cfg', 'adapter_state', 'adapter_layout', 'base') if k not in data]
    if missing:
        raise PackageError(
            f'{path / ADAPTER_FILE} lacks {", ".join(missing)}: re-export the XP with scripts/export.py.'
        )
    return data


def base_of(package: str) -> str:
    """The package whose codec and base weights ``package`` uses: itself, or an adapter export's base."""
    data = adapter_export(package)
    return package if data is None else _base_of_export(package, data)


def _base_of_export(package: str, data: dict) -> str:
    try:
        base = resolve(str(data['base']))
    except PackageError as err:
        raise PackageError(f"The adapter export {package} sits on the base package '{data['base']}': {err}") from err
    if data.get('base_checksum'):  # exports made before identities were recorded have none
        from solvers.models import identity

        now = identity.package_identity(base)['checksum']
        if now != data['base_checksum']:
            raise PackageError(
                f"The adapter export {package} was made over '{data['base']}' with weights checksum "
                f'{data["base_checksum"][:12]}, but it now holds {now[:12]}: its adapters would sit on other weights. '
                'Put that package back, or export the XP again with --merge for a standalone package.'
            )
    return base


def load_lm(package: str) -> tuple[DictConfig, dict]:
    """The LM's training config (``xp.cfg``) and weights (``best_state``), each package file read once.

    An adapter export's weights are its adapters merged into its base package's LM.
    """
    adapter = adapter_export(package)
    if adapter is not None:
        from solvers.models.adapters import merge_state

        base = _base_of_export(package, adapter)
        _, base_state = load_lm(base)
        cfg = OmegaConf.create(adapter['xp.cfg'])
        return cfg, merge_state(base_state, adapter['adapter_state'], adapter['adapter_layout'])
    pkg = load_file(package, LM_FILE)
    if 'xp.cfg' not in pkg or 'best_state' not in pkg:
        raise PackageError(f"{package}/{LM_FILE} must hold 'xp.cfg' and 'best_state'; it has {sorted(pkg)}.")
    return OmegaConf.create(pkg['xp.cfg']), pkg['best_state']


def lm_config(package: str) -> DictConfig:
    """The LM's training config (``xp.cfg``) stored in the package (or in an adapter export)."""
    adapter = adapter_export(package)
    if adapter is not None:
        return OmegaConf.create(adapter['xp.cfg'])
    return load_lm(package)[0]


def lm_state(package: str) -> dict:
    """The LM weights (``best_state``) stored in the package; an adapter export's are merged into its base."""
    return load_lm(package)[1]


def load_compression_model(package: str, device: str | torch.device = 'cpu'):
    """Build the package's codec in eval mode, frozen.

    Args:
        package: a resolved package.
        device: where to put the codec.
    """
    from audiocraft.models import CompressionModel, builders

    pkg = load_file(base_of(package), COMPRESSION_FILE)
    if 'pretrained' in pkg:
        model = CompressionModel.get_pretrained(pkg['pretrained'], device=device)
    else:
        cfg = OmegaConf.create(pkg['xp.cfg'])
        cfg.device = str(device)
        model = builders.get_compression_model(cfg)
        model.load_state_dict(pkg['best_state'])
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


_ABSENT = object()


def check_and_merge(cfg: DictConfig, package_cfg: DictConfig, package: str) -> None:
    """Fail if ``cfg`` and the package disagree on the LM architecture, then adopt the package's sub-trees.

    Keys that are absent or ``???`` in ``cfg`` are filled from the package, so a config may leave the architecture to
    the package. Modifies ``cfg`` in place.

    Raises:
        PackageError: naming every mismatched key with both values.
    """
    mismatches = []
    for key in ARCHITECTURE_KEYS:
        theirs = OmegaConf.select(package_cfg, key, default=_ABSENT)
        if theirs is _ABSENT or theirs is None:
            continue
        ours = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if ours is _ABSENT or ours is None:  # model=from_package leaves the architecture to the package
            OmegaConf.update(cfg, key, theirs, force_add=True)
            continue
        ours, theirs = (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for v in (ours, theirs))
        if ours != theirs:
            mismatches.append(f'  {key}: {ours!r} in the config, {theirs!r} in the package')
    if mismatches:
        raise PackageError(
            f"The model config does not match the pretrained package '{package}':\n"
            + '\n'.join(mismatches)
            + '\nPick the model preset that matches the package (model=audiogen_medium for facebook/audiogen-medium, '
            'model=tiny for the tiny stand-in), take the architecture from the package with '
            f'`model=from_package pretrained={package}`, or point `pretrained=` at the package you meant.'
        )
    for subtree in PACKAGE_SUBTREES:
        if subtree in package_cfg:
            OmegaConf.update(cfg, subtree, package_cfg[subtree], merge=False, force_add=True)


def write(
    out_dir: str | os.PathLike,
    lm_cfg: DictConfig | str,
    lm_state_dict: dict,
    compression_cfg: DictConfig | str,
    compression_state_dict: dict,
) -> Path:
    """Write a package that ``AudioGen.get_pretrained(out_dir)`` loads unchanged.

    Args:
        out_dir: destination directory (created).
        lm_cfg: the LM's full config (stored as YAML in ``xp.cfg``).
        lm_state_dict: LM weights, conditioner included.
        compression_cfg: the codec's config.
        compression_state_dict: the codec's weights.
    Returns:
        The package directory.
    """
    import audiocraft

    from solvers.atomic import save_torch

    out = Path(out_dir)

    def as_yaml(cfg: DictConfig | str) -> str:
        return cfg if isinstance(cfg, str) else OmegaConf.to_yaml(cfg)

    def plain(state: dict) -> dict:
        return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}

    meta = {'version': audiocraft.__version__, 'exported': True}
    save_torch(
        {'xp.cfg': as_yaml(compression_cfg), 'best_state': plain(compression_state_dict), **meta},
        out / COMPRESSION_FILE,
    )
    save_torch({'xp.cfg': as_yaml(lm_cfg), 'best_state': plain(lm_state_dict), **meta}, out / LM_FILE)
    return out


def check_codec(cfg: DictConfig, codec: tp.Any) -> None:
    """The config's sample rate, card and codebooks must be those of the package's codec.

    Raises:
        PackageError: naming the key, the config's value and the codec's.
    """
    for key, ours, theirs in (
        ('sample_rate', cfg.sample_rate, codec.sample_rate),
        ('transformer_lm.card', cfg.transformer_lm.card, codec.cardinality),
        ('transformer_lm.n_q', cfg.transformer_lm.n_q, codec.num_codebooks),
    ):
        if ours != theirs:
            raise PackageError(f"{key}={ours} in the config but the codec of '{cfg.pretrained}' has {theirs}.")
    logger.info(
        'Codec: %d codebooks x %d bins at %d Hz frames, %d Hz audio.',
        codec.num_codebooks,
        codec.cardinality,
        codec.frame_rate,
        codec.sample_rate,
    )
