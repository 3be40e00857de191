"""solvers/atomic.py: the one writer of files, whole or not at all."""

from __future__ import annotations

import json

import pytest

from solvers import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / 'report.json'
    atomic.write_json(path, {'a': 1})
    with pytest.raises(RuntimeError):
        with atomic.open_atomic(path, 'w') as f:
            f.write('{"half": ')
            raise RuntimeError('killed mid-write')
    assert json.loads(path.read_text()) == {'a': 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['report.json']


def test_overwrite_false_refuses_an_existing_file(tmp_path):
    path = atomic.write_text(tmp_path / 'sidecar.json', '{}')
    with pytest.raises(FileExistsError):
        atomic.write_json(path, {'a': 1}, overwrite=False)
    assert path.read_text() == '{}' and atomic.stale_temporaries(tmp_path) == []


def test_json_refuses_nan_and_ends_with_a_newline(tmp_path):
    with pytest.raises(ValueError):
        atomic.write_json(tmp_path / 'x.json', {'ce': float('nan')})
    assert not (tmp_path / 'x.json').exists()
    assert atomic.write_json(tmp_path / 'y.json', {'ce': 1.5}).read_text().endswith('}\n')


def test_a_folder_is_replaced_whole(tmp_path):
    out = tmp_path / 'export'
    with atomic.open_dir(out) as tmp:
        atomic.write_text(tmp / 'a.txt', 'first')
    with pytest.raises(RuntimeError):
        with atomic.open_dir(out) as tmp:
            atomic.write_text(tmp / 'a.txt', 'second')
            raise RuntimeError('failed half-way')
    assert (out / 'a.txt').read_text() == 'first'
    with atomic.open_dir(out) as tmp:
        atomic.write_text(tmp / 'b.txt', 'third')
    assert sorted(p.name for p in out.iterdir()) == ['b.txt']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export']


def test_new_dir_takes_the_next_free_name_and_says_when_none_is_left(tmp_path):
    assert atomic.new_dir(tmp_path / 'runs', 'x') == tmp_path / 'runs' / 'x'
    assert atomic.new_dir(tmp_path / 'runs', 'x') == tmp_path / 'runs' / 'x-1'
    with pytest.raises(FileExistsError, match='2 folders named x or x-N already exist'):
        atomic.new_dir(tmp_path / 'runs', 'x', attempts=2)
