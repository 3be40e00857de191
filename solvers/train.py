"""Dora/Hydra entry point: `dora run solver=audiogen/train dataset=<name>` (or `dora grid`, `dora launch`).

Seeds, logging, distributed init, then builds the fine-tuning solver and runs it. `get_solver_from_sig` rebuilds a
solver from a past XP for notebooks and the export/generate scripts.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import random
import typing as tp
import warnings

import flashy
import omegaconf
from dora import XP, hydra_main

from .project import outputs_dir, resolve_path
from .slurm import slurm_parameters

logger = logging.getLogger(__name__)
# Dora composes configs with version_base 1.1 (audiocraft's semantics: Hydra runs inside the XP folder); Hydra warns
# about that on every composition, which buries the training log.
warnings.filterwarnings('ignore', message='.*version_base="1.1" selects Hydra 1.1 compatibility.*')


def get_solver(cfg: omegaconf.DictConfig):
    """Build the solver: split the batch across ranks and make relative data/package paths absolute."""
    from .solver import AudioGenFinetuneSolver
    world = flashy.distrib.world_size()
    if cfg.dataset.batch_size % world:
        raise ValueError(f"dataset.batch_size={cfg.dataset.batch_size} must be divisible by the {world} processes.")
    cfg.dataset.batch_size //= world
    if not cfg.datasource.train or not cfg.datasource.valid:
        raise ValueError(
            "No dataset chosen: datasource.train/valid are empty. Prepare your sounds with "
            "`python scripts/prepare_dataset.py DIR --name NAME`, then add dataset=NAME to the command "
            "(dataset=demo after `make demo`).")
    # Hydra runs us inside the XP folder, so relative manifest paths must not depend on the cwd.
    for split, path in cfg.datasource.items():
        if isinstance(path, str):
            cfg.datasource[split] = str(resolve_path(path))
    return AudioGenFinetuneSolver(cfg)


def get_solver_from_xp(xp: XP, load_best: bool = True, ignore_state_keys: tp.Sequence[str] = ('optimizer', 'ema'),
                       override_cfg: dict | None = None):
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
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    os.environ['MKL_NUM_THREADS'] = os.environ['OMP_NUM_THREADS'] = str(cfg.num_threads)
    set_efficient_attention_backend(cfg.efficient_attention_backend)


@hydra_main(config_path='../config', config_name='config', version_base='1.1')
def main(cfg: omegaconf.DictConfig):
    init_seed_and_system(cfg)
    log_name = f'{cfg.execute_only}.log.{{rank}}' if cfg.execute_only else 'solver.log.{rank}'
    flashy.setup_logging(level=logging.getLevelName(str(cfg.logging.level).upper()), log_name=log_name)
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


main.dora.dir = outputs_dir()
main._base_cfg.slurm = slurm_parameters(main._base_cfg.slurm)

if __name__ == '__main__':
    main()
