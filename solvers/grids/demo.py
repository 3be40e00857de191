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

from dora import Launcher

from solvers.data import read_manifest
from solvers.errors import AudiogenError
from solvers.grids._explorers import AudioGenExplorer
from solvers.models import package
from solvers.project import compose, resolve_path
from solvers.training.slurm import slurm_preset

LRS = [1e-3, 3e-4]  # the demo preset's lr and a third of it
SCHEDULE = {
    'optim.epochs': 2,  # enough for a history of two rows and a resume point between them
    'optim.updates_per_epoch': 5,
    'schedule.cosine.warmup': 2,  # the preset's 8 would not fit in 2 x 5 updates
    'generate.every': 2,  # samples once, at the end (not part of the signature)
    'generate.duration': 1.0,  # seconds per sample: generation on CPU costs more than training here
    'num_threads': 1,  # one per CPU of the job (below), so two XPs share 2 cores without contention
    'dataset.num_workers': 0,  # loader processes would only compete for the job's one CPU (each stage
    # starts them afresh: 4 of them made a 5-clip valid take 100 s)
}
ENV_KEYS = {  # environment variable -> config key it overrides (default: the demo presets' value)
    'AUDIOGEN_DEMO_PRETRAINED': 'pretrained',
    'AUDIOGEN_DEMO_TRAIN': 'datasource.train',
    'AUDIOGEN_DEMO_VALID': 'datasource.valid',
}


def data_overrides() -> dict[str, str]:
    """Overrides for the env vars that are set; checks that the package and manifests the XPs read exist."""
    overrides = {
        key: str(resolve_path(os.environ[env].strip()))
        for env, key in ENV_KEYS.items()
        if os.environ.get(env, '').strip()
    }
    for env, key in ENV_KEYS.items():
        if key in overrides and not os.path.exists(overrides[key]):
            raise SystemExit(
                f'dora grid demo: {env}={overrides[key]} does not exist. Point it at an existing '
                f'{"package folder" if key == "pretrained" else "manifest folder"}, or unset it to use '
                "the demo's (built by `make demo`)."
            )
    try:
        cfg = compose(['solver=audiogen/demo', *(f'{k}={v}' for k, v in overrides.items())])
        package.resolve(cfg.pretrained, base_dir=resolve_path('.'))
        for split in ('train', 'valid'):
            read_manifest(resolve_path(cfg.datasource[split]))
    except AudiogenError as err:
        raise SystemExit(
            f'dora grid demo: {err} Run `make demo` once to build the demo package and data, or set '
            f'{", ".join(ENV_KEYS)} to existing paths.'
        ) from None
    return overrides


@AudioGenExplorer
def explorer(launcher: Launcher) -> None:
    # 1 CPU and 2 GB per job (the demo holds ~1 GB), so the two XPs run side by side on a 2-core machine.
    launcher.slurm_(**slurm_preset('local', cpus=1, mem_gb=2))
    launcher.bind_(['solver=audiogen/demo'], data_overrides(), SCHEDULE)
    for lr in LRS:
        launcher({'optim.lr': lr})
