"""An XP pins its base package: a package whose weights changed is refused by resume, generate, evaluate and export
in one line naming both checksums; make_tiny_package never silently replaces a package with other weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, run_dora, subprocess_env

from scripts import make_tiny_package
from solvers.demo.tiny import build_tiny_package
from solvers.models import export, identity


def test_identity_is_the_checksum_of_the_weights(tiny_package, tmp_path):
    ours = identity.package_identity(str(tiny_package))
    assert set(ours['files']) == {'state_dict.bin', 'compression_state_dict.bin'} and ours['revision'] is None
    copy = shutil.copytree(tiny_package, tmp_path / 'copy')
    assert identity.package_identity(str(copy))['checksum'] == ours['checksum']  # content, not place
    other = build_tiny_package(tmp_path / 'other', seed=1)
    assert identity.package_identity(str(other))['checksum'] != ours['checksum']


def test_a_hub_file_is_named_by_its_sha_and_revision(tmp_path):
    sha = 'ab' * 32
    blob = tmp_path / 'blobs' / sha
    blob.parent.mkdir()
    blob.write_bytes(b'weights')
    link = tmp_path / 'snapshots' / 'c0ffee' / 'state_dict.bin'
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert identity.file_sha256(link) == sha and identity._revision(link) == 'c0ffee'


def test_pin_then_verify_refuses_another_base(tiny_package, tmp_path):
    xp = tmp_path / 'xps' / 'abcd1234'
    pinned = identity.pin(xp, str(tiny_package), resuming=False)
    assert json.loads((xp / identity.BASE_FILE).read_text())['checksum'] == pinned['checksum']
    identity.verify(xp, str(tiny_package))  # the same package: fine
    other = build_tiny_package(tmp_path / 'other', seed=1)
    with pytest.raises(identity.BaseChangedError) as err:
        identity.pin(xp, str(other), resuming=True)
    message = str(err.value)
    assert '\n' not in message and pinned['checksum'][:12] in message
    assert identity.package_identity(str(other))['checksum'][:12] in message
    assert 'make_tiny_package' in message and f'move {xp} away' in message
    identity.pin(xp, str(other), resuming=False)  # a new XP (no checkpoint yet) re-pins
    identity.verify(xp, str(other))


def test_generate_and_export_of_an_xp_refuse_a_changed_base(trained_xp, tmp_path):
    folder = trained_xp['folder']
    pinned = identity.recorded(folder)
    assert pinned is not None and 'base package' in trained_xp['log'].lower()
    package = pinned['package']
    backup = shutil.copytree(package, tmp_path / 'backup')
    try:
        shutil.rmtree(package)
        build_tiny_package(package, seed=3)
        with pytest.raises(identity.BaseChangedError):
            export.load_xp(folder)  # what generate, evaluate and export load an XP with
        env = subprocess_env(trained_xp['outputs'])
        proc = subprocess.run(
            [sys.executable, '-m', 'scripts.export', str(folder), str(tmp_path / 'out')],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and 'now holds other weights' in proc.stderr
        proc = run_dora(trained_xp['overrides'], trained_xp['outputs'], check=False)  # the resume
        assert proc.returncode == 2 and 'now holds other weights' in proc.stderr and 'Traceback' not in proc.stderr
    finally:
        shutil.rmtree(package)
        shutil.copytree(backup, package)
    assert export.load_xp(folder).sig


def test_make_tiny_package_refuses_other_weights_without_force(tmp_path, capsys):
    dest = tmp_path / 'tiny'
    assert make_tiny_package.main([str(dest)]) == 0
    first = identity.package_identity(str(dest))['checksum']
    assert make_tiny_package.main([str(dest)]) == 0 and 'unchanged' in capsys.readouterr().out
    assert make_tiny_package.main([str(dest), '--seed', '1']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and '--force' in err and first[:12] in err
    assert identity.package_identity(str(dest))['checksum'] == first  # left alone
    assert make_tiny_package.main([str(dest), '--seed', '1', '--force']) == 0
    assert identity.package_identity(str(dest))['checksum'] != first
    assert not list(tmp_path.glob('.*'))  # no build folder left beside it


def test_next_commands_work_as_printed(monkeypatch):
    """One builder of the "Next:" lines: export into exported/<dataset>, evaluate with a CLAP model when one is
    cached, else a comment saying what can't be compared."""
    from solvers import project

    cfg = project.compose(['solver=audiogen/tiny', 'datasource.train=egs/mysounds/train'])
    monkeypatch.setattr(project, '_cached', lambda model: False)
    lines = project.next_commands(cfg, 'abcd1234', ['a dog barks'])
    assert lines[1] == "python -m scripts.generate 'a dog barks' --model abcd1234 --batch_size 5"
    assert lines[2].startswith('python -m scripts.export abcd1234 exported/mysounds ')
    assert lines[3].startswith('# base vs fine-tune needs a CLAP model') and 'only the codec' in lines[3]
    monkeypatch.setattr(project, '_cached', lambda model: True)
    evaluate = project.next_commands(cfg, 'abcd1234', [], steps=('evaluate',))[0]
    assert evaluate.startswith(
        'python -m scripts.evaluate tiny abcd1234 --dataset mysounds --clap-model laion/larger_clap_general '
    )
