"""`make gpu-check-smoke`: the GPU acceptance script (benchmarks/gpu_check.py) on the CPU at tiny shapes, as CI runs
it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part_and_writes_its_table(tmp_path: Path) -> None:
    env = {**os.environ, 'AUDIOGEN_OUTPUTS': str(tmp_path / 'outputs')}
    proc = subprocess.run(['make', '-s', 'gpu-check-smoke'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (folder,) = (tmp_path / 'outputs' / 'gpu_check').iterdir()
    result = json.loads((folder / 'gpu_check.json').read_text())
    assert result['smoke'] and result['gpu_tests']['returncode'] in (0, 5)  # collected, skipped on the CPU
    steps = {(s['recipe'], s['dtype']) for s in result['training']}
    assert steps == {(r, d) for r in ('full', 'lora') for d in ('float32', 'bfloat16')}
    assert all(s['finite'] and s['step_s'] > 0 and s['planned_gb'] > 0 for s in result['training'])
    assert result['decoding']['identical_to_stock'] == {'stock': True, 'fast': True}
    assert result['token_cache']['uncached_s'] > 0 and result['token_cache']['cached_s'] > 0
    table = (folder / 'gpu_check.md').read_text()
    assert '| lora | bfloat16 |' in table and '| fast |' in table and '| token cache (' in table
    assert table in proc.stdout


def test_gpu_check_without_cuda_stops_in_one_line() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip('CUDA is available here: the GPU run itself is `make gpu-check`')
    proc = subprocess.run(['make', '-s', 'gpu-check'], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stdout.strip().count('\n') == 0 and 'needs a CUDA GPU' in proc.stdout, proc.stdout + proc.stderr
