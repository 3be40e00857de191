"""The project is used from its clone: the editable install works from any directory, a regular wheel is refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, subprocess_env


def test_the_commands_run_from_any_directory(tmp_path):
    """The venv's console scripts and `python -m scripts.*` find the clone from an unrelated working directory."""
    env = {**subprocess_env(), 'AUDIOGEN_HOME': str(tmp_path / 'home')}
    env.pop('PYTHONPATH', None)
    bin_dir = Path(sys.executable).parent
    for command in ([str(bin_dir / 'audiogen-generate'), '--help'], [sys.executable, '-m', 'scripts.export', '--help']):
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and 'usage:' in proc.stdout, proc.stderr[-2000:]


def test_a_regular_wheel_is_refused_with_the_way_to_install(tmp_path):
    uv = shutil.which('uv') or os.path.expanduser('~/.local/bin/uv')
    if not os.path.exists(uv):
        pytest.skip('uv is not installed here (make installs it)')
    proc = subprocess.run(
        [uv, 'build', '--wheel', '--out-dir', str(tmp_path / 'dist'), str(ROOT)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert 'is used from a clone of its repository: install it there with `make install`' in proc.stderr
    assert not list((tmp_path / 'dist').glob('*.whl'))
