"""A tiny grid on the local SLURM: the CPU demo at two learning rates, two short epochs each (about a minute).

Run (after `make demo`, and `scripts/slurm_local.sh start` as root):
    dora grid demo --dry_run     # the 2 XPs and their overrides, nothing submitted
    dora grid demo               # submit both, then refresh the table every 5 minutes until they finish (Ctrl-C
                                 # stops watching, not the jobs); `dora grid demo --no_monitoring` prints it once

The package and the data default to the demo's (config/model/tiny.yaml, config/dataset/demo.yaml); point them
elsewhere with paths (absolute, or relative to the project root):
    AUDIOGEN_DEMO_PRETRAINED  a package folder (state_dict.bin + compression_state_dict.bin)
    AUDIOGEN_DEMO_TRAIN       a folder holding the train data.jsonl.gz
    AUDIOGEN_DEMO_VALID       a folder holding the valid data.jsonl.gz
These become overrides, so they are part of each XP's signature.
"""
from __future__ import annotations

import os
from pathlib import Path

from dora import Launcher
from omegaconf import OmegaConf

from ..project import CONFIG_DIR, resolve_path
from ..slurm import slurm_preset
from ._explorers import AudioGenExplorer

LRS = [1e-3, 3e-4]  # the demo preset's lr and a third of it
SCHEDULE = {
    'optim.epochs': 2,               # enough for a history of two rows and a resume point between them
    'optim.updates_per_epoch': 5,
    'schedule.cosine.warmup': 2,     # the preset's 8 would not fit in 2 x 5 updates
    'generate.every': 2,             # samples once, at the end (not part of the signature)
    'generate.duration': 1.0,        # seconds per sample: generation on CPU costs more than training here
    'num_threads': 1,                # one per CPU of the job (below), so two XPs share 2 cores without contention
}
ENV_KEYS = {  # environment variable -> (config key, file that holds its default)
    'AUDIOGEN_DEMO_PRETRAINED': ('pretrained', 'model/tiny.yaml'),
    'AUDIOGEN_DEMO_TRAIN': ('datasource.train', 'dataset/demo.yaml'),
    'AUDIOGEN_DEMO_VALID': ('datasource.valid', 'dataset/demo.yaml'),
}


def data_overrides() -> dict[str, str]:
    """Overrides for the env vars that are set; checks that every path the XPs will read exists, set or not."""
    overrides = {}
    for env, (key, preset) in ENV_KEYS.items():
        value = os.environ.get(env, '').strip()
        if value:
            overrides[key] = str(resolve_path(value))
            source = f'{env}={value}'
        else:
            value = OmegaConf.select(OmegaConf.load(CONFIG_DIR / preset), key)
            source = f'{key}: {value} in config/{preset}'
        if not Path(resolve_path(value)).exists():
            raise SystemExit(f"dora grid demo: {source} does not exist. Run `make demo` once to build the demo "
                             f"package and data, or set {env} to an existing path.")
    return overrides


@AudioGenExplorer
def explorer(launcher: Launcher) -> None:
    # 1 CPU and 2 GB per job (the demo holds ~1 GB), so the two XPs run side by side on a 2-core machine.
    launcher.slurm_(**slurm_preset('local', cpus=1, mem_gb=2))
    launcher.bind_(['solver=audiogen/demo'], data_overrides(), SCHEDULE)
    for lr in LRS:
        launcher({'optim.lr': lr})
