"""Sweep lr x effective batch for fine-tuning facebook/audiogen-medium on a SLURM cluster (9 XPs, one GPU each).

Run (from the project root; docs/cluster.md explains the table and the other flags):
    AUDIOGEN_DATASET=mysounds AUDIOGEN_PARTITION=gpu dora grid finetune --dry_run   # list the XPs, submit nothing
    AUDIOGEN_DATASET=mysounds AUDIOGEN_PARTITION=gpu dora grid finetune             # submit, then show the table

`dora grid` passes a grid no arguments of its own (its positional arguments only filter XPs by name), so the two
choices a sweep needs come from the environment:
    AUDIOGEN_DATASET    a prepared dataset, i.e. config/dataset/<name>.yaml (scripts/prepare_dataset.py writes it).
    AUDIOGEN_PARTITION  the SLURM partition (`sinfo -s` lists them). The rest of the job (GPUs, memory, time, account,
                        setup lines) comes from config/slurm/cluster.yaml; `dora grid -p/-g/--constraint` flags are
                        overridden by that preset here, so edit the preset instead.

Every XP uses `solver=audiogen/train` (bf16, EMA, warmup + cosine) with `dataset.batch_size` fixed at BATCH_SIZE and
the effective batch set by `optim.grad_accum_steps`. With `optim.updates_per_epoch` fixed, an XP with 4x the
accumulation sees 4x the clips (and takes ~4x the time) per epoch: compare XPs by valid ce at equal clips seen, or
at the end of their schedule.
"""

from __future__ import annotations

import os

from dora import Launcher

from solvers.grids._explorers import AudioGenExplorer
from solvers.project import preset_names, user_config_dir
from solvers.training.slurm import slurm_preset

LRS = [1e-5, 3e-5, 1e-4]  # around the preset's 3e-5 (a third of pre-training's 1e-4), a factor ~3 apart
GRAD_ACCUM_STEPS = [2, 4, 8]  # x BATCH_SIZE = 16, 32, 64 clips per update (the preset's default is 4)
BATCH_SIZE = 8  # clips per micro-batch: what one 80 GB GPU holds for 10 s segments in bf16


def _required_env(name: str, what: str) -> str:
    value = os.environ.get(name, '').strip()
    if not value:
        raise SystemExit(
            f'dora grid finetune: {name} is not set. Set it to {what}, e.g. '
            f'AUDIOGEN_DATASET=mysounds AUDIOGEN_PARTITION=gpu dora grid finetune (docs/cluster.md).'
        )
    return value


def dataset_name() -> str:
    """The dataset preset named by AUDIOGEN_DATASET, checked to exist (config/dataset/ or the data root's)."""
    name = _required_env('AUDIOGEN_DATASET', 'the name of a prepared dataset (config/dataset/<name>.yaml)')
    known = [preset for preset in preset_names('dataset') if preset != 'template']
    if name not in known:
        raise SystemExit(
            f'dora grid finetune: AUDIOGEN_DATASET={name} but {user_config_dir()}/dataset/{name}.yaml '
            f'does not exist (known: {", ".join(known) or "none"}). Prepare it with '
            f'`python -m scripts.prepare_dataset /path/to/sounds --name {name}`.'
        )
    return name


@AudioGenExplorer
def explorer(launcher: Launcher) -> None:
    dataset = dataset_name()
    partition = _required_env('AUDIOGEN_PARTITION', "your cluster's GPU partition (`sinfo -s` lists them)")
    launcher.slurm_(**slurm_preset('cluster', partition=partition))
    launcher.bind_(['solver=audiogen/train', f'dataset={dataset}'], {'dataset.batch_size': BATCH_SIZE})
    for lr in LRS:
        for accum in GRAD_ACCUM_STEPS:
            launcher({'optim.lr': lr, 'optim.grad_accum_steps': accum})
