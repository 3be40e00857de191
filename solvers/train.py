"""Dora/Hydra entry point: `dora run solver=audiogen/train dataset=<name>` (or `dora grid`, `dora launch`).

Seeds, logging, distributed init, then builds the fine-tuning solver and runs it. `get_solver_from_sig` rebuilds a
solver from a past XP for notebooks and the export/generate scripts. Mistakes a user can fix (an unknown key or
preset, a missing dataset or package, no GPU for device=cuda, a full disk) end the run with one line, not a traceback.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import sys
import typing as tp

import dora
import flashy
import omegaconf
from dora import XP
from dora.hydra import HydraMain

from solvers import project
from solvers.errors import USER_ERROR, AudiogenError
from solvers.project import outputs_dir, resolve_path
from solvers.training import logs, runs
from solvers.training.slurm import slurm_parameters

project.install_error_hook()
logger = logging.getLogger(__name__)


def check_settings(cfg: omegaconf.DictConfig) -> None:
    """The mistakes a config can hold before anything is built: no GPU for device=cuda, no package, no dataset or an
    empty one. `dora run` calls it before Dora makes the XP folder (`_Main.__call__`), so a refused run leaves none.

    Raises:
        AudiogenError: one line naming the key or file and the fix.
    """
    import torch

    from solvers.data import read_manifest
    from solvers.models import package

    if str(cfg.device).startswith('cuda') and not torch.cuda.is_available():
        raise AudiogenError(
            f'device={cfg.device}, but torch sees no CUDA GPU on this machine. Run on a GPU machine (or on SLURM, '
            'docs/cluster.md); on a CPU, train the tiny stand-in on your data with `dora run solver=audiogen/tiny '
            'dataset=NAME`.'
        )
    if not cfg.pretrained:
        raise AudiogenError(
            'No pretrained package: pass pretrained=<HF id such as facebook/audiogen-medium, or a '
            'package directory> (model=from_package takes the architecture from it).'
        )
    if not cfg.datasource.train or not cfg.datasource.valid:
        raise AudiogenError(
            'No dataset chosen: datasource.train/valid are empty. Prepare your sounds with '
            '`python -m scripts.prepare_dataset DIR --name NAME`, then add dataset=NAME to the command '
            '(dataset=demo after `make demo`).'
        )
    package.resolve(cfg.pretrained, base_dir=resolve_path('.'))  # a local package's files; an HF id is fetched later
    for split in ('train', 'valid'):
        path = resolve_path(cfg.datasource[split])
        if not read_manifest(path):  # a missing manifest is a one-line error too, before any loading
            raise AudiogenError(
                f'The {split} manifest {path} lists no clip: preparing the dataset found no usable file (its report '
                'says why). Add usable audio and run python -m scripts.prepare_dataset again.'
            )


def get_solver(cfg: omegaconf.DictConfig):
    """Build the solver: check the settings, split the batch across ranks, make data paths absolute."""
    from solvers.training.solver import AudioGenFinetuneSolver

    check_settings(cfg)
    world = flashy.distrib.world_size()
    if cfg.dataset.batch_size % world:
        raise AudiogenError(f'dataset.batch_size={cfg.dataset.batch_size} must be divisible by the {world} processes.')
    cfg.dataset.batch_size //= world
    # Hydra runs us inside the XP folder, so relative manifest paths must not depend on the cwd.
    for split, path in cfg.datasource.items():
        if isinstance(path, str):
            cfg.datasource[split] = str(resolve_path(path))
    return AudioGenFinetuneSolver(cfg)


def get_solver_from_xp(
    xp: XP,
    load_best: bool = True,
    ignore_state_keys: tp.Sequence[str] = ('optimizer', 'ema'),
    override_cfg: dict | None = None,
):
    """Rebuild the solver of a past XP and restore its checkpoint (the best weights by default)."""
    cfg = xp.cfg if override_cfg is None else omegaconf.OmegaConf.merge(xp.cfg, override_cfg)
    with xp.enter():
        solver = get_solver(tp.cast(omegaconf.DictConfig, cfg))
        solver.restore(load_best=load_best, ignore_state_keys=list(ignore_state_keys))
    return solver


def get_solver_from_sig(sig: str, **kwargs: tp.Any):
    """Rebuild a solver from its Dora signature, e.g. in a notebook. See `get_solver_from_xp`."""
    return get_solver_from_xp(main.get_xp_from_sig(sig), **kwargs)


def init_seed_and_system(cfg: omegaconf.DictConfig) -> None:
    """Seed every RNG and set threads, the multiprocessing start method and the attention backend."""
    import numpy as np
    import torch
    from audiocraft.modules.transformer import set_efficient_attention_backend

    multiprocessing.set_start_method(cfg.mp_start_method, force=True)
    if cfg.mp_start_method == 'forkserver':
        # Loader workers fork from the server, which imports the solver (audiocraft, torch: ~5 s) once; otherwise each
        # worker of each stage's loader imports it again when it unpickles the dataset. The server touches no GPU.
        multiprocessing.set_forkserver_preload(['__main__', f'{__package__}.training.solver'])
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    os.environ['MKL_NUM_THREADS'] = os.environ['OMP_NUM_THREADS'] = str(cfg.num_threads)
    set_efficient_attention_backend(cfg.efficient_attention_backend)


class _Main(HydraMain):
    """Dora's Hydra main, with configuration mistakes explained in one line (see `project.explain_config_error`)."""

    def _get_config_noinit(self, overrides: list[str] = []) -> omegaconf.DictConfig:  # noqa: B006 (dora's)
        return project.compose_or_explain(lambda: super(_Main, self)._get_config_noinit(overrides), overrides)

    def __call__(self) -> tp.Any:
        """Dora's run of one XP, with the config checked before Dora makes its folder (see `check_settings`)."""
        from dora.xp import _context

        argv = self._get_argv()
        if not self._is_active(argv):
            return self._main()
        try:
            xp = self.get_xp(argv)
            check_settings(tp.cast(omegaconf.DictConfig, xp.cfg))
        except AudiogenError as err:
            print(f'error: {err}', file=sys.stderr)
            raise SystemExit(USER_ERROR) from None
        self.init_xp(xp)
        with _context.enter_xp(xp):
            return self._main()

    def get_xp(self, argv: tp.Sequence[str]) -> XP:
        """Dora's XP for ``argv``; a required value left at ``???`` is named with the fix."""
        from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

        try:
            return super().get_xp(argv)
        except (MissingMandatoryValue, InterpolationToMissingValueError) as err:
            key = getattr(err, 'full_key', None) or str(err).split(':')[-1].strip().split()[0]
            raise AudiogenError(
                f'The config key {key} has no value (???): add {key}=... to the command (e.g. dataset.batch_size=8).'
            ) from None


def _train(cfg: omegaconf.DictConfig) -> tp.Any:
    """The job Dora runs in the XP folder: set up, build the solver, run it (or one stage of it)."""
    init_seed_and_system(cfg)
    log_name = f'{cfg.execute_only}.log.{{rank}}' if cfg.execute_only else 'solver.log.{rank}'
    flashy.setup_logging(level=logging.getLevelName(str(cfg.logging.level).upper()), log_name=log_name)
    logs.plain_logs()  # no colour codes in files and pipes, none of audiocraft's empty lines
    fresh = runs.is_fresh(dora.get_xp().folder)
    try:
        flashy.distrib.init(backend='nccl' if str(cfg.device).startswith('cuda') else 'gloo')  # gloo: CPU processes
        solver = get_solver(cfg)
        if cfg.show:
            solver.show()
            return
        if cfg.execute_only:
            solver.restore(replay_metrics=False)
            solver.run_one_stage(cfg.execute_only)
            return
        return solver.run()
    except AudiogenError as err:
        logger.error('%s', err)  # one line, in the XP's solver.log too
        if fresh and flashy.distrib.is_rank_zero():  # stopped before its first update: leave no clutter behind
            runs.forget(dora.get_xp().folder, project.outputs_dir())
        raise SystemExit(USER_ERROR) from None


_train.__name__ = 'main'  # Dora pickles the main for SLURM as <module>.<function name> (dora.main._load_main)
main = _Main(_train, config_name='config', config_path='../config', version_base='1.1')
main.dora.dir = outputs_dir()
main._base_cfg.slurm = slurm_parameters(main._base_cfg.slurm)

if __name__ == '__main__':
    main()
