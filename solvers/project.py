"""Where the config tree and the user's data live, composing configs outside `dora run`, and start-up hygiene.

Two roots:
- the code's config tree, ``config/`` of this clone (``CONFIG_DIR``);
- the user's data root (``data_root()``): ``$AUDIOGEN_HOME`` when set, else this clone. It holds ``egs/``
  (manifests), ``data/`` (prepared audio), ``config/dataset/`` (presets written by prepare_dataset, found by
  `dora run dataset=NAME` through Hydra's search path) and ``outputs/`` (XPs; ``$AUDIOGEN_OUTPUTS`` moves them alone).
"""

from __future__ import annotations

import difflib
import logging
import os
import shlex
import sys
import typing as tp
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from solvers.errors import USER_ERROR, AudiogenError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / 'config'
GROUPS = ('solver', 'model', 'dataset', 'optim', 'slurm', 'adapter')  # config groups users pick presets from


def data_root() -> Path:
    """Root of the user's data: ``$AUDIOGEN_HOME`` if set, else the clone this code runs from."""
    env = os.environ.get('AUDIOGEN_HOME')
    return Path(env).expanduser().resolve() if env else PROJECT_ROOT


def user_config_dir() -> Path:
    """Where prepare_dataset writes dataset presets: ``<data root>/config`` (searched by Hydra after ``config/``)."""
    return data_root() / 'config'


# config.yaml's `hydra.searchpath` reads this, so `dataset=NAME` finds presets under $AUDIOGEN_HOME/config too.
OmegaConf.register_new_resolver('audiogen_user_config', lambda: user_config_dir().as_posix(), replace=True)


def outputs_dir() -> Path:
    """Root of XP folders: ``$AUDIOGEN_OUTPUTS``, else ``dora.dir`` of config.yaml under the data root."""
    env = os.environ.get('AUDIOGEN_OUTPUTS')
    if env:
        return Path(env).expanduser().resolve()
    configured = Path(OmegaConf.load(CONFIG_DIR / 'config.yaml').dora.dir).expanduser()
    return configured if configured.is_absolute() else data_root() / configured


NEXT_STEPS = ('curves', 'generate', 'export', 'evaluate')


def next_commands(
    cfg: DictConfig,
    sig: str,
    prompts: tp.Sequence[str],
    generate_options: str = '--batch_size 5',
    steps: tp.Sequence[str] = NEXT_STEPS,
) -> list[str]:
    """What a user does with a trained XP, as the commands to type: the one builder of every "Next:" list (the
    solver's, scripts/show_xp.py's, scripts/demo_report.py's). Each works as printed from any directory, with or
    without ``AUDIOGEN_HOME``: XPs are named by signature, packages by what ``pretrained`` says, outputs go under the
    working directory (``exported/``, ``out/``, ``evaluations/``, all ignored by git in the clone).

    Args:
        cfg: the XP's config (``xp.cfg``): its dataset names the export folder and is evaluated.
        sig: the XP signature.
        prompts: prompts for the generate command (the XP's sample prompts, :func:`solvers.data.sample_prompts`).
        generate_options: the generate command's options after ``--model``.
        steps: which of :data:`NEXT_STEPS` to print, in that order.
    """
    name = Path(str(cfg.datasource.train)).parent.name
    quoted = ' '.join(shlex.quote(p) for p in prompts) if prompts else '"<your prompt>"'
    evaluate = f'python -m scripts.evaluate {shlex.quote(str(cfg.pretrained))} {sig} --dataset {name}'
    clap = cfg.evaluate.clap.model or _default_clap()
    lines = {
        'curves': f'tensorboard --logdir {_shown(outputs_dir() / "tensorboard")}     # curves: one run per XP',
        'generate': f'python -m scripts.generate {quoted} --model {sig} {generate_options}',
        'export': f'python -m scripts.export {sig} exported/{name}     # a package AudioGen.get_pretrained loads',
        'evaluate': (
            f'{evaluate} --clap-model {shlex.quote(str(clap))}     # base vs fine-tune: CLAP, KAD on your valid clips'
            if clap and _cached(str(clap))
            else f'# base vs fine-tune needs a CLAP model ({_default_clap()}: docs/evaluate.md fetches it once); '
            f'without one only the codec is scored, which both share. Then: {evaluate}'
        ),
    }
    return [lines[step] for step in steps]


def _default_clap() -> str:
    """The CLAP model of the base config (``evaluate.clap.model`` in config/config.yaml)."""
    return str(OmegaConf.load(CONFIG_DIR / 'config.yaml').evaluate.clap.model)


def _cached(model: str) -> bool:
    """A local CLAP folder, or an HF id whose config is in the local HF cache (no network)."""
    if Path(model).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, 'config.json'), str)


def counted(n: int, noun: str) -> str:
    """``1 seed``, ``3 seeds``: a count with its noun in the right number (plural by adding an s)."""
    return f'{n} {noun}' if n == 1 else f'{n} {noun}s'


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter to read and to type)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def compose(overrides: tp.Sequence[str] = ()) -> DictConfig:
    """Compose the Hydra config exactly as `dora run <overrides>` would, without running anything.

    Args:
        overrides: command-line style overrides, e.g. ``['solver=audiogen/demo', 'optim.lr=1e-4']``.
    Raises:
        AudiogenError: an unknown key or preset, explained in one sentence.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base='1.1', job_name='audiogen'):
        return compose_or_explain(lambda: hydra_compose('config', overrides=list(overrides)), overrides)


def resolve_path(path: str | os.PathLike) -> Path:
    """Make a user path absolute against the data root the run was launched from.

    Hydra runs the solver inside the XP folder and `dora grid` with git_save runs it from a clean clone, so neither
    the cwd nor this file's location is the user's project; Dora records the original one in _DORA_ORIGINAL_DIR.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    if os.environ.get('AUDIOGEN_HOME'):
        base = data_root()
    else:
        base = Path(os.environ.get('_DORA_ORIGINAL_DIR', PROJECT_ROOT))
    return (base / path).resolve()


# ------------------------------------------------------------------------------------------------ start-up
def quiet_dependencies() -> None:
    """Silence start-up messages a user can't act on (each is harmless on our stack).

    - Hydra's version_base="1.1" migration notes: Dora composes with 1.1 semantics on purpose (audiocraft runs inside
      the XP folder).
    - xFormers' "can't load C++/CUDA extensions": audiocraft imports xformers but we run attention on torch SDPA.
    - torch's weight_norm deprecation inside audiocraft's codec; audiocraft 1.1's apology for a no_grad change.
    - transformers' and huggingface_hub's progress bars when a text encoder loads (must run before they import).
    - bitsandbytes' note that an optional CPU 4-bit kernel isn't installed (peft imports it; 4-bit isn't used).
    """
    os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
    from hydra.errors import Hydra14MigrationWarning

    warnings.filterwarnings('ignore', category=Hydra14MigrationWarning)
    warnings.filterwarnings('ignore', message='Future Hydra versions will no longer change working directory')
    warnings.filterwarnings('ignore', message=r'(?s).*weight_norm.* is deprecated', category=FutureWarning)
    warnings.filterwarnings('ignore', message=r'Up to version 1\.0\.1, the _prepare_tokens_and_attributes')
    warnings.filterwarnings('ignore', message=r'provider=hydra\.searchpath.* is not available')
    logging.getLogger('xformers').setLevel(logging.ERROR)
    logging.getLogger('bitsandbytes.backends.cpu.ops').setLevel(logging.ERROR)


def install_error_hook() -> None:
    """Print an :class:`AudiogenError` that reaches the top of a process as one line instead of a traceback, and
    exit with :data:`solvers.errors.USER_ERROR` (`dora run` composes the config before our code can catch a typo)."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: tp.Any) -> None:
        if isinstance(value, AudiogenError):
            print(f'error: {value}', file=sys.stderr)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(USER_ERROR)  # an excepthook can't set the exit status otherwise (Python exits 1)
        else:
            previous(kind, value, tb)

    sys.excepthook = hook


# ------------------------------------------------------------------------------------------------ config errors
def compose_or_explain(compose_fn: tp.Callable[[], DictConfig], overrides: tp.Sequence[str]) -> DictConfig:
    """Run a Hydra composition; turn a failure caused by an override into a one-line :class:`AudiogenError`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_fn()
    except (HydraException, OmegaConfBaseException) as err:
        raise explain_config_error(overrides, err) from None


def preset_names(group: str) -> list[str]:
    """The presets of a config group: ``config/<group>/`` plus the user's ``<data root>/config/<group>/``."""
    names = set()
    for root in (CONFIG_DIR, user_config_dir()):
        names |= {p.relative_to(root / group).with_suffix('').as_posix() for p in (root / group).rglob('*.yaml')}
    return sorted(names)


def explain_config_error(overrides: tp.Sequence[str], err: Exception) -> AudiogenError:
    """The one sentence that says which override is wrong and how to fix it (an unknown preset or key)."""
    for override in overrides:
        key, sep, value = override.partition('=')
        key = key.lstrip('+~')
        if not sep or key.startswith('hydra'):
            continue
        if key in GROUPS and value not in preset_names(key):
            return AudiogenError(_unknown_preset(key, value))
        if key not in GROUPS and not override.startswith('+') and not _key_exists(key):
            return AudiogenError(_unknown_key(key))
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return AudiogenError(
        f'The configuration could not be composed from {" ".join(overrides) or "the defaults"}: {first}'
    )


def _unknown_preset(group: str, value: str) -> str:
    known = preset_names(group)
    close = difflib.get_close_matches(value, known, n=1)
    hint = f' Did you mean {group}={close[0]}?' if close else ''
    message = f'Unknown preset {group}={value}: config/{group}/ has {", ".join(known) or "none"}.{hint}'
    if group == 'dataset':
        message += f' To make it, prepare your sounds: python -m scripts.prepare_dataset DIR --name {value}'
    return message


def _all_keys() -> list[str]:
    """Every key the base config and the presets define (dotted): the key set every composition shares."""
    out: set[str] = set()

    def walk(node: tp.Any, prefix: str) -> None:
        for key, value in node.items():
            if prefix or key not in ('defaults', 'hydra'):
                out.add(prefix + str(key))
                if isinstance(value, dict):
                    walk(value, prefix + str(key) + '.')

    for path in [CONFIG_DIR / 'config.yaml', *sorted(CONFIG_DIR.glob('*/**/*.yaml'))]:
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        if isinstance(node, dict):
            walk(node, '')
    return sorted(out)


def _key_exists(key: str) -> bool:
    keys = set(_all_keys())
    return key in keys or any(key.startswith(k + '.') and k in ('slurm', 'metrics') for k in keys)


def _unknown_key(key: str) -> str:
    keys = _all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    if not close:  # a typo in the last part: match leaves, preferring keys under the same parent
        parent, _, leaf = key.rpartition('.')
        for pool in ([k for k in keys if k.rpartition('.')[0] == parent], keys):
            leaves = {k.rpartition('.')[2]: k for k in reversed(pool)}
            close = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)]
            if close:
                break
    hint = f' Did you mean {close[0]}?' if close else ' See config/config.yaml for the keys.'
    return f"Unknown config key '{key}': no preset or base config defines it.{hint}"
