"""Map the `slurm` config group (config/slurm/*.yaml) onto the SLURM settings Dora schedules `dora grid`/`launch` with.

Dora reads the SLURM settings of a job from the base config's `slurm` node (`dora.conf.SlurmConfig`), never from an
XP's overrides: `solvers/train.py` runs `main._base_cfg.slurm = slurm_parameters(main._base_cfg.slurm)` once at import,
as audiocraft's train.py does with `audiocraft.utils.cluster.get_slurm_parameters` (which we don't call: it needs
audiocraft's team config files). The preset in force is the one the solver preset's defaults list names
(`/slurm: local`); `dora grid`/`dora launch` flags `-g/--gpus`, `-p/--partition`, `-c/--comment` and `--constraint`
then override single keys, and a grid can switch to another preset with ``launcher.slurm_(**slurm_preset('cluster'))``.
Putting `slurm=cluster` on an XP's command line changes neither the scheduling nor, for the `slurm.*` keys, the
signature.

Keys of the `slurm` group (every preset sets all of them, so that overriding one never needs a `+`):
    gpus: GPUs of the job in total; 0 makes a CPU-only job of one task. Up to 8 fit on one node, more must be a
        multiple of 8 (Dora then asks for gpus/8 nodes of 8 GPUs). Dora starts one task per GPU.
    mem_per_gpu: host RAM per GPU, in whole GB (gpus > 0). Dora asks for mem_per_gpu * GPUs-per-node per node.
        null asks for no memory, so the partition's default applies.
    cpus_per_gpu: CPUs per GPU, i.e. per task (gpus > 0); null leaves SLURM's default of 1.
    mem_gb: host RAM of a CPU-only job (gpus: 0), in whole GB; null leaves the partition's default.
    cpus: CPUs of a CPU-only job (gpus: 0); null leaves SLURM's default of 1.
    time: time limit in minutes. submitit asks SLURM for USR2 90 s before it and requeues the job, which resumes
        from its last checkpoint.
    partition: SLURM partition (`sinfo` lists them). Required.
    constraint: node features (`--constraint`), e.g. a GPU model; null for none.
    exclude: nodes never to run on (`--exclude`), e.g. "node[01-03]"; null for none.
    comment: free text shown by squeue/sacct (`--comment`); null for none.
    qos, account: `--qos` and `--account`, where the cluster wants them; null for none.
    setup: shell lines run in the sbatch script before the job starts, e.g. `module load cuda` or
        `source .venv/bin/activate`.
    max_num_timeout: how many times a job that hits its time limit is requeued before it is left failed.

Any other field of `dora.conf.SlurmConfig` (one_task_per_node, array_parallelism, dependents, srun_args, python,
nodelist, cpus_per_task, container_chdir, force_chdir) may be added to a preset and is passed on unchanged.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import typing as tp

from dora.conf import SlurmConfig
from omegaconf import DictConfig, OmegaConf
from submitit.core.logger import get_logger as submitit_logger

from solvers.errors import AudiogenError
from solvers.project import CONFIG_DIR

PRESET_DIR = CONFIG_DIR / 'slurm'
# Our keys for CPU-only jobs; Dora knows only per-GPU amounts, so they are folded into those below.
CPU_ONLY_KEYS = ('mem_gb', 'cpus')
DORA_KEYS = tuple(field.name for field in dataclasses.fields(SlurmConfig))
# Optional strings: an empty value means "none", which submitit expresses by leaving the flag out.
OPTIONAL_STRINGS = ('constraint', 'exclude', 'comment', 'qos', 'account')
# Keys the mapping writes, so they must be there already (Dora compares XP configs with the base key by key).
REQUIRED_KEYS = ('gpus', 'mem_per_gpu', 'cpus_per_gpu')
GPUS_PER_NODE = 8  # Dora's assumption: nodes of 8 GPUs (dora/shep.py, Shepherd._get_submitit_executor)


class SlurmConfigError(AudiogenError, ValueError):
    """A value of the `slurm` config group that SLURM or Dora cannot take."""


def hand_over_to_submitit(handler: tp.Callable[[int, tp.Any], tp.Any], signum: int) -> None:
    """Call submitit's handler of `signum` (on USR2 it checkpoints the job and runs `scontrol requeue`).

    To requeue a job, SLURM ends it: it sends SIGTERM to every process of the job, and `scontrol` is one of them while
    it waits for its answer. On a loaded node the SIGTERM can come before scontrol exits; submitit then raises
    CalledProcessError and reports a failed job although SLURM has requeued it. That case counts as requeued here.
    The caller exits afterwards, as submitit would have.
    """
    try:
        handler(signum, None)
    except subprocess.CalledProcessError as error:
        if list(error.cmd)[:2] != ['scontrol', 'requeue'] or error.returncode != -signal.SIGTERM:
            raise
        # submitit's logger, which logs "Requeued job N" when scontrol returns: the job's log reads the same.
        submitit_logger().info(
            'Requeued job %s (the SIGTERM with which SLURM ends a job to requeue it stopped scontrol first)',
            error.cmd[2],
        )


def _fail(key: str, message: str) -> tp.NoReturn:
    raise SlurmConfigError(f'slurm.{key}: {message} (config/slurm/*.yaml, or slurm.{key}=... on the command line)')


def _is_int(value: tp.Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(cfg: dict, key: str, minimum: int, optional: bool) -> int | None:
    value = cfg.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        allowed = f'a whole number >= {minimum}' + (' or null' if optional else '')
        _fail(key, f'got {value!r}, expected {allowed}')
    return value


def _gigabytes(cfg: dict, key: str) -> int | None:
    """Whole GB: Dora writes `--mem=<n>GB` and sbatch rejects fractions such as 2.5GB."""
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value) or value < 1:
        _fail(key, f'got {value!r}, expected a whole number of GB >= 1 or null (sbatch takes no fractions of a GB)')
    return value


def slurm_parameters(slurm_cfg: DictConfig) -> DictConfig:
    """Check the `slurm` group's values and turn them into the keys `dora.conf.SlurmConfig` accepts.

    The result keeps every key of ``slurm_cfg`` except `mem_gb` and `cpus` (Dora rejects keys it doesn't know, and
    compares each XP's config with the base one key by key, so no key may be added). For a CPU-only job (gpus: 0)
    Dora counts one GPU slot per node, so `mem_gb` and `cpus` become `mem_per_gpu` and `cpus_per_gpu`.

    Args:
        slurm_cfg: the `slurm` node of the composed config.

    Returns:
        A new config; ``slurm_cfg`` is left unchanged.

    Raises:
        SlurmConfigError: a value is missing, of the wrong type, or one SLURM would refuse.
    """
    cfg = _checked_keys(slurm_cfg)
    _map_resources(cfg)
    _normalise_optional(cfg)
    return OmegaConf.create(cfg)


def _checked_keys(slurm_cfg: DictConfig) -> dict:
    """The `slurm` node as a dict, once every required key is there, set, and known to Dora (or mapped by us)."""
    if 'partition' not in slurm_cfg or OmegaConf.is_missing(slurm_cfg, 'partition'):
        _fail('partition', 'is not set: name the SLURM partition to run on (`sinfo` lists them)')
    for key in REQUIRED_KEYS:
        if key not in slurm_cfg:
            _fail(
                key,
                f'is missing: every preset sets {", ".join(REQUIRED_KEYS)} (null where unused), since the '
                "mapped config may not gain keys the XP's config lacks",
            )
    for name in slurm_cfg:
        if OmegaConf.is_missing(slurm_cfg, name):
            _fail(str(name), 'is required (??? in the preset): set it')
    cfg = OmegaConf.to_container(slurm_cfg, resolve=True)
    assert isinstance(cfg, dict)
    unknown = sorted(set(cfg) - set(DORA_KEYS) - set(CPU_ONLY_KEYS))
    if unknown:
        raise SlurmConfigError(
            f'slurm: unknown key(s) {", ".join(unknown)}; known keys are {", ".join(CPU_ONLY_KEYS + DORA_KEYS)} '
            '(see the docstring of solvers/training/slurm.py)'
        )
    partition = cfg['partition']
    if not isinstance(partition, str) or not partition.strip():
        _fail('partition', f'got {partition!r}: name the SLURM partition to run on (`sinfo` lists them)')
    return cfg


def _map_resources(cfg: dict) -> None:
    """Check gpus, memory and cpus; map `mem_gb`/`cpus` (CPU-only jobs) onto Dora's per-GPU keys, in place."""
    gpus = _count(cfg, 'gpus', 0, optional=False)
    assert gpus is not None
    if gpus > GPUS_PER_NODE and gpus % GPUS_PER_NODE:
        _fail(
            'gpus',
            f'got {gpus}: Dora schedules up to {GPUS_PER_NODE} GPUs on one node, or a multiple of '
            f'{GPUS_PER_NODE} over several nodes',
        )
    mem_per_gpu = _gigabytes(cfg, 'mem_per_gpu')
    mem_gb = _gigabytes(cfg, 'mem_gb')
    cpus_per_gpu = _count(cfg, 'cpus_per_gpu', 1, optional=True)
    cpus = _count(cfg, 'cpus', 1, optional=True)
    for job_key, job_value, gpu_key, gpu_value in (
        ('mem_gb', mem_gb, 'mem_per_gpu', mem_per_gpu),
        ('cpus', cpus, 'cpus_per_gpu', cpus_per_gpu),
    ):
        if gpus == 0 and gpu_value is not None:
            _fail(
                gpu_key,
                f'is {gpu_value} but the job has no GPU (slurm.gpus=0): set slurm.{job_key} for a CPU-only '
                f'job and slurm.{gpu_key}=null',
            )
        if gpus > 0 and job_value is not None:
            _fail(
                job_key,
                f'is {job_value} but applies to CPU-only jobs (slurm.gpus=0); this job has {gpus} GPU(s): '
                f'set slurm.{gpu_key} and slurm.{job_key}=null',
            )
    # dora/shep.py counts a job without GPUs as one GPU slot per node: mem = mem_per_gpu * 1, no --gres.
    cfg['mem_per_gpu'], cfg['cpus_per_gpu'] = (mem_gb, cpus) if gpus == 0 else (mem_per_gpu, cpus_per_gpu)
    for key in CPU_ONLY_KEYS:
        cfg.pop(key, None)


def _normalise_optional(cfg: dict) -> None:
    """Check the time limits, optional strings and setup lines, in place (blank strings become null)."""
    if 'time' in cfg:
        _count(cfg, 'time', 1, optional=False)
    if 'max_num_timeout' in cfg:
        _count(cfg, 'max_num_timeout', 0, optional=False)
    for key in OPTIONAL_STRINGS:
        if key not in cfg:
            continue
        value = cfg[key]
        if value is not None and not isinstance(value, str):
            _fail(key, f'got {value!r}, expected a string or null')
        cfg[key] = (value.strip() or None) if isinstance(value, str) else None
    if 'setup' in cfg:
        setup = cfg['setup'] if cfg['setup'] is not None else []
        if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
            _fail('setup', f'got {setup!r}, expected a list of shell lines, e.g. slurm.setup=\'["module load cuda"]\'')
        cfg['setup'] = setup


def slurm_preset(name: str, **overrides: tp.Any) -> dict[str, tp.Any]:
    """Load config/slurm/<name>.yaml, apply ``overrides`` and map it as `slurm_parameters` does.

    For grids, whose SLURM settings otherwise come from the base config:
    ``launcher.slurm_(**slurm_preset('cluster', partition='gpu'))``.

    Args:
        name: a preset of config/slurm/, e.g. ``'local'`` or ``'cluster'``.
        **overrides: values replacing the preset's, by key.
    """
    path = PRESET_DIR / f'{name}.yaml'
    if not path.exists():
        known = ', '.join(sorted(p.stem for p in PRESET_DIR.glob('*.yaml')))
        raise SlurmConfigError(f'no SLURM preset {name!r}: {path} does not exist (presets: {known})')
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    unknown = sorted(set(overrides) - set(cfg.keys()))
    if unknown:
        raise SlurmConfigError(f'slurm_preset({name!r}): {", ".join(unknown)} not in {path}')
    for key, value in overrides.items():
        cfg[key] = value
    result = OmegaConf.to_container(slurm_parameters(cfg))
    assert isinstance(result, dict)
    return {str(key): value for key, value in result.items()}
