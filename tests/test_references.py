"""solvers/models/references.py: every kind of model reference, and what an unknown one says."""

from __future__ import annotations

import pytest

from solvers.models import references


@pytest.fixture()
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(tmp_path / 'outputs'))
    xp = tmp_path / 'outputs' / 'xps' / '0123abcd'
    xp.mkdir(parents=True)
    (xp / 'checkpoint.th').write_bytes(b'')
    return tmp_path / 'outputs'


def test_xps_by_signature_folder_or_dora_prefix(outputs):
    for spec in ('0123abcd', '//sig/0123abcd', str(outputs / 'xps' / '0123abcd')):
        ref = references.resolve(spec)
        assert (ref.kind, ref.sig) == ('xp', '0123abcd'), spec
    with pytest.raises(references.ReferenceError, match='No XP with signature deadbeef'):
        references.resolve('deadbeef')


def test_packages_by_dir_or_bare_name_and_hub_ids(outputs, tiny_package, monkeypatch):
    assert references.resolve(str(tiny_package)) == references.Reference(
        str(tiny_package), 'package', str(tiny_package.resolve())
    )
    local = outputs / 'pretrained' / 'tiny'
    local.parent.mkdir(parents=True)
    local.symlink_to(tiny_package)
    assert references.resolve('tiny').kind == 'package'
    assert references.resolve('facebook/audiogen-medium') == references.Reference(
        'facebook/audiogen-medium', 'hub', 'facebook/audiogen-medium'
    )
    with pytest.raises(references.ReferenceError, match="Unknown model 'nothing-here'"):
        references.resolve('nothing-here')


def test_continue_from_names_a_checkpoint_or_a_package(outputs, tmp_path):
    checkpoint = str(outputs / 'xps' / '0123abcd' / 'checkpoint.th')
    assert references.continue_source('//sig/0123abcd', 'pkg') == checkpoint
    assert references.continue_source(checkpoint, 'pkg') == checkpoint
    assert references.continue_source('facebook/audiogen-medium', 'pkg') == 'facebook/audiogen-medium'
    with pytest.raises(references.ReferenceError, match='continue_from=//sig/ffffffff: no checkpoint'):
        references.continue_source('//sig/ffffffff', 'pkg')
