"""The dataset preset: config/dataset/<name>.yaml, its settings from the data, and keeping a user's edits."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from solvers import atomic
from solvers.data.config import _hash_text, _is_within
from solvers.project import data_root

PRESET_MARK = '# Written by prepare_dataset (fingerprint '  # first line of generated presets; unedited: updated
PACKAGE_LINE = '# @package __global__\n'  # Hydra reads it only on the first line


@dataclass
class PresetSettings:
    """What a prepared preset takes from the data and the machine (see :func:`preset_settings`)."""

    segment_duration: float
    num_workers: int
    prompts: list[str]
    sample_duration: float


def preset_settings(durations: list[float], captions: list[str], cpus: int | None = None) -> PresetSettings:
    """Segment length from the clips, loader workers from the machine, sample prompts from the captions.

    Args:
        durations: seconds of every prepared clip.
        captions: distinct captions, valid split first (the sample prompts are the first four).
        cpus: CPU count (default: this machine's).
    """
    longest = sorted(durations)[int(0.9 * (len(durations) - 1))] if durations else 10.0
    # 90 % of clips fit a segment (rounded up to 0.5 s), between 1 s and the 10 s AudioGen was trained on.
    segment = min(10.0, max(1.0, math.ceil(longest * 2) / 2))
    cpus = cpus or os.cpu_count() or 1
    # Worker processes cost a fork and memory each; on 1-2 cores reading in the training process is faster.
    workers = 0 if cpus <= 2 else min(8, cpus // 2)
    return PresetSettings(segment, workers, captions[:4], segment)


def manifest_ref(egs_dir: Path) -> str:
    """How the preset names the manifests folder: relative to the data root if it lies inside, else absolute."""
    root = str(data_root())
    real_egs = os.path.realpath(egs_dir)
    return Path(os.path.relpath(real_egs, root)).as_posix() if _is_within(real_egs, root) else real_egs


def _yaml_string(text: str) -> str:
    """A YAML double-quoted scalar that OmegaConf won't interpolate."""
    return json.dumps(text.replace('${', '\\${'), ensure_ascii=False)


def preset_text(name: str, dataset_dir: Path, manifest_ref: str, settings: PresetSettings) -> str:
    """Hydra preset of the ``dataset`` group for a prepared dataset, without its two header lines.

    Args:
        name: Dataset name.
        dataset_dir: The user's folder (written in the header only).
        manifest_ref: ``egs/<name>`` relative to the data root, or an absolute folder.
        settings: values taken from the data and the machine.
    """
    s = settings
    prompts = '\n'.join(f'    - {_yaml_string(p)}' for p in s.prompts) or '    []'
    return f"""# Dataset preset for {dataset_dir}.
# Run: dora run solver=audiogen/tiny dataset={name}      (the tiny stand-in, on a CPU)
#      dora run solver=audiogen/train dataset={name}     (facebook/audiogen-medium, on a GPU)
datasource:
  max_sample_rate: 16000
  max_channels: 1
  train: {manifest_ref}/train       # relative paths are resolved against the data root, whatever Hydra's cwd is
  valid: {manifest_ref}/valid
  evaluate: null
  generate: null         # samples come from generate.prompts, not from the data
dataset:
  segment_duration: {s.segment_duration:g}  # seconds per example: 90 % of these clips fit; shorter ones are padded
  batch_size: 8          # clips per micro-batch; x optim.grad_accum_steps = clips per update
  num_workers: {s.num_workers}         # loader processes for this machine ({os.cpu_count()} CPUs); not in the signature
  min_segment_ratio: 0.5 # a random offset keeps at least half a segment of a long clip in view
  valid:
    num_samples: null    # one segment of every valid clip
generate:
  duration: {s.sample_duration:g}          # seconds per sample, like the training segments
  prompts:               # samples after each epoch: captions of your valid clips (edit freely)
{prompts}
"""


def _preset_file(body: str) -> str:
    return f'{PACKAGE_LINE}{PRESET_MARK}{_hash_text(body)}; an edited preset is kept on re-runs)\n{body}'


def _is_unedited(text: str) -> bool:
    """True for a preset written by prepare_dataset and not changed since (its fingerprint still matches)."""
    if not text.startswith(PACKAGE_LINE):
        return False
    mark, _, body = text[len(PACKAGE_LINE) :].partition('\n')
    return mark.startswith(PRESET_MARK) and mark[len(PRESET_MARK) :].startswith(_hash_text(body) + ';')


def write_preset(path: Path, body: str, force: bool) -> tuple[str, str | None]:
    """Write a dataset preset unless the user edited the existing one; returns (action, note or None)."""
    text = _preset_file(body)
    old = path.read_text(encoding='utf-8', errors='replace') if path.exists() else None
    if old == text:
        return 'unchanged', None
    if old is None or force or _is_unedited(old):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, text.encode('utf-8'))
        return (
            'written' if old is None else 'overwritten (--force)' if force and not _is_unedited(old) else 'updated'
        ), None
    return (
        'kept: you edited it; --force replaces it',
        f'{path} was edited by hand and was kept; compare it with what this run would write (segments, prompts) '
        'or pass --force to replace it.',
    )
