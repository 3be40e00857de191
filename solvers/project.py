"""Where the project's config tree and default folders live, and composing configs outside `dora run`."""
from __future__ import annotations

import os
import typing as tp
from pathlib import Path

from omegaconf import DictConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / 'config'


def outputs_dir() -> Path:
    """Root of XP folders: ``$AUDIOGEN_OUTPUTS`` if set, else ``dora.dir`` of config.yaml under the project root."""
    env = os.environ.get('AUDIOGEN_OUTPUTS')
    if env:
        return Path(env).expanduser().resolve()
    from omegaconf import OmegaConf
    configured = Path(OmegaConf.load(CONFIG_DIR / 'config.yaml').dora.dir).expanduser()
    return configured if configured.is_absolute() else PROJECT_ROOT / configured


def compose(overrides: tp.Sequence[str] = ()) -> DictConfig:
    """Compose the Hydra config exactly as `dora run <overrides>` would, without running anything.

    Args:
        overrides: command-line style overrides, e.g. ``['solver=audiogen/demo', 'optim.lr=1e-4']``.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base='1.1', job_name='audiogen'):
        return hydra_compose('config', overrides=list(overrides))


def resolve_path(path: str | os.PathLike) -> Path:
    """Make a user path absolute against the project root the run was launched from.

    Hydra runs the solver inside the XP folder and `dora grid` with git_save runs it from a clean clone, so neither
    the cwd nor this file's location is the user's project; Dora records the original one in _DORA_ORIGINAL_DIR.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    base = Path(os.environ.get('_DORA_ORIGINAL_DIR', PROJECT_ROOT))
    return (base / path).resolve()
