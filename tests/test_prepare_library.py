"""scripts/prepare_dataset.py on sound libraries built in tmp dirs: captions from tags and names, splits, duplicates."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from mutagen.flac import FLAC
from mutagen.id3 import COMM, ID3, TIT2
from mutagen.oggvorbis import OggVorbis

from solvers import data
from solvers.data import PrepareConfig, prepare
from solvers.data.names import family_key, names_caption, ucs_caption
from solvers.data.splits import Family, assign_splits

os.environ.setdefault('HF_HUB_OFFLINE', '1')
ROOT = Path(__file__).resolve().parents[1]
SR = 16000
HAS_MP3 = 'MP3' in sf.available_formats()


def sound(seed: int, seconds: float = 0.5, sr: int = SR) -> np.ndarray:
    """A short noisy tone, different for every seed (so that only deliberate copies are duplicates)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.02 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def chunk(cid: bytes, body: bytes) -> bytes:
    return cid + struct.pack('<I', len(body)) + body + (b'\0' if len(body) % 2 else b'')


def add_wav(root: Path, rel: str, seed: int, chunks: bytes = b'') -> Path:
    """Write ``root/rel`` as a PCM16 WAV with extra RIFF ``chunks`` appended (the RIFF size fixed up)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, sound(seed), SR, subtype='PCM_16', format='WAV')
    if chunks:
        data = bytearray(path.read_bytes()) + chunks
        data[4:8] = struct.pack('<I', len(data) - 8)
        path.write_bytes(bytes(data))
    return path


def info_list(**fields: str) -> bytes:
    body = b'INFO' + b''.join(chunk(k.encode(), v.encode() + b'\0') for k, v in fields.items())
    return chunk(b'LIST', body)


def bext(description: str) -> bytes:
    """A ``bext`` chunk: the 256-byte Description, then the fixed fields (602 bytes in all, version 0)."""
    return chunk(b'bext', description.encode('latin-1').ljust(256, b'\0') + bytes(346))


def build_library(root: Path) -> dict[str, str]:
    """A library as sound designers keep one, without a single caption file.

    Returns:
        ``{rel: words its caption must hold}``; wordless names are left out (they must be rejected).
    """
    expect = {}
    add_wav(root, 'field/ZOOM0001.WAV', 1, bext('sSPEED=048.000-ND\r\nCreek babbling over stones\r\nsTAKE=01'))
    expect['field/ZOOM0001.WAV'] = 'creek babbling over stones'
    add_wav(root, 'field/ZOOM0002.WAV', 2, info_list(INAM='Wind in pine trees', ICMT='recorded at dusk'))
    expect['field/ZOOM0002.WAV'] = 'wind in pine trees'
    ixml = '<BWFXML><NOTE>Kettle whistling on a gas stove</NOTE></BWFXML>'
    add_wav(root, 'field/ZOOM0003.WAV', 3, chunk(b'iXML', ixml.encode()))
    expect['field/ZOOM0003.WAV'] = 'kettle whistling on a gas stove'
    flac = root / 'tagged/a1b2.flac'
    flac.parent.mkdir(parents=True)
    sf.write(flac, sound(4), SR, subtype='PCM_16')
    tagged = FLAC(flac)
    tagged['DESCRIPTION'] = 'Glass bottle clinking'
    tagged.save()
    expect['tagged/a1b2.flac'] = 'glass bottle clinking'
    ogg = root / 'tagged/b3c4.ogg'
    sf.write(ogg, sound(5), SR, subtype='VORBIS')
    vorbis = OggVorbis(ogg)
    vorbis['title'] = 'Crowd applause'
    vorbis.save()
    expect['tagged/b3c4.ogg'] = 'crowd applause'
    if HAS_MP3:
        mp3 = root / 'tagged/c5d6.mp3'
        sf.write(mp3, sound(6, sr=44100), 44100, subtype='MPEG_LAYER_III')
        id3 = ID3()
        id3.add(TIT2(encoding=3, text='Thunder rumble'))
        id3.add(COMM(encoding=3, lang='eng', desc='', text='distant storm'))
        id3.save(mp3)
        expect['tagged/c5d6.mp3'] = 'thunder rumble'
    for i, (name, words) in enumerate(
        [
            ('DOORWood_Door Slam Heavy_JD_Farm.wav', 'door slam heavy wood'),
            ('GLASBrk_Window Smash_JD_Studio.wav', 'window smash'),  # "Brk": no vowel, an abbreviation
        ]
    ):
        add_wav(root, f'ucs/{name}', 10 + i)
        expect[f'ucs/{name}'] = words
    for i in range(1, 6):  # takes of one sound in nested folders
        add_wav(root, f'Animals/Dogs/Dog_Bark_Small_{i:02d}.wav', 20 + i)
        expect[f'Animals/Dogs/Dog_Bark_Small_{i:02d}.wav'] = 'dog bark small animals'
        add_wav(root, f'Animals/Cats/CatMeowAngry-take{i}.wav', 30 + i)
        expect[f'Animals/Cats/CatMeowAngry-take{i}.wav'] = 'cat meow angry animals'
    for rel in ('0001.wav', 'a8f3e2c1.wav', 'ZOOM0004.WAV'):
        add_wav(root, rel, 40 + len(rel))
    add_wav(root, 'Footsteps_Gravel.wav', 50)
    expect['Footsteps_Gravel.wav'] = 'footsteps gravel'
    (root / 'Footsteps_Gravel copy.wav').write_bytes((root / 'Footsteps_Gravel.wav').read_bytes())
    (root / 'Impacts').mkdir()
    (root / 'Impacts/Metal_Hit.wav').write_bytes((root / 'Footsteps_Gravel.wav').read_bytes())
    return expect


def config(tmp: Path, dataset: Path, **kw) -> PrepareConfig:
    return PrepareConfig(
        dataset_dir=dataset,
        name='lib',
        out_dir=tmp / 'out',
        egs_root=tmp / 'egs',
        config_root=tmp / 'cfg',
        workers=1,
        progress=False,
        **kw,
    )


@pytest.fixture(scope='module')
def library(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp('library')
    expect = build_library(tmp / 'sfx')
    result = prepare(config(tmp, tmp / 'sfx'))
    return {'tmp': tmp, 'expect': expect, 'result': result, 'report': result.report}


def test_captions_come_from_tags_ucs_and_names(library):
    report = library['report']
    captions = report['captions']
    for rel, words in library['expect'].items():
        text = captions[rel]['caption'].lower()
        assert all(w in text for w in words.split()), (rel, text)
    assert captions['field/ZOOM0001.WAV']['source'] == 'tags'
    assert 'sspeed' not in captions['field/ZOOM0001.WAV']['caption'].lower()  # recorder key=value lines dropped
    assert captions['ucs/DOORWood_Door Slam Heavy_JD_Farm.wav']['source'] == 'ucs'
    assert captions['Animals/Dogs/Dog_Bark_Small_01.wav']['source'] == 'names'
    tagged = 6 if HAS_MP3 else 5
    assert report['caption_sources'] == {'tags': tagged, 'ucs': 2, 'names': 11}
    assert report['totals']['kept_files'] == tagged + 2 + 11


def test_wordless_names_are_rejected_with_the_fix(library):
    rows = {i['path']: i for i in library['report']['issues'] if i['status'] == 'rejected'}
    assert set(rows) == {'0001.wav', 'a8f3e2c1.wav', 'ZOOM0004.WAV'}
    assert all(r['code'] == 'wordless_name' and 'tag' in r['fix'] and 'rename' in r['fix'] for r in rows.values())


def test_duplicates_are_kept_once_and_named(library):
    report = library['report']
    assert report['duplicates'] == {
        'Footsteps_Gravel copy.wav': 'Footsteps_Gravel.wav',
        'Impacts/Metal_Hit.wav': 'Footsteps_Gravel.wav',
    }
    assert report['totals']['duplicate_files'] == 2
    text = (library['tmp'] / 'out/report.txt').read_text()
    assert 'Impacts/Metal_Hit.wav: the same audio as Footsteps_Gravel.wav' in text


def test_every_take_family_sits_in_one_split(library):
    splits = library['report']['splits']
    for prefix in ('Animals/Dogs/Dog_Bark_Small_', 'Animals/Cats/CatMeowAngry-take'):
        assert len({s for rel, s in splits.items() if rel.startswith(prefix)}) == 1
    assert set(splits.values()) == {'train', 'valid'}


def test_captions_csv_lists_every_caption_and_reads_back(library, tmp_path):
    out = library['tmp'] / 'out'
    rows = list(csv.DictReader((out / 'captions.csv').open(encoding='utf-8')))
    assert {r['path'] for r in rows} == set(library['report']['captions'])
    edited = out.parent / 'edited.csv'
    rows[0]['caption'] = 'a caption fixed by hand'
    with edited.open('w', encoding='utf-8', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=['path', 'caption', 'source'])
        writer.writeheader()
        writer.writerows(rows)
    again = prepare(config(tmp_path, library['tmp'] / 'sfx', captions=edited)).report
    assert again['captions'][rows[0]['path']] == {'caption': 'a caption fixed by hand', 'source': 'metadata'}
    assert again['caption_sources'] == {'metadata': len(rows)}


def test_captions_from_chooses_and_orders_the_sources(tmp_path):
    root = tmp_path / 'sfx'
    add_wav(root, 'Rain_On_Roof_01.wav', 1, info_list(INAM='Heavy rain drumming on a tin roof'))
    (root / 'Rain_On_Roof_01.json').write_text(json.dumps({'description': 'rain from the caption file'}))
    report = prepare(config(tmp_path, root)).report
    assert report['captions']['Rain_On_Roof_01.wav']['source'] == 'metadata'
    report = prepare(config(tmp_path, root, captions_from=('names', 'tags'))).report
    assert report['captions']['Rain_On_Roof_01.wav'] == {'caption': 'rain on roof', 'source': 'names'}
    report = prepare(config(tmp_path, root, captions_from=('tags',))).report
    assert report['captions']['Rain_On_Roof_01.wav']['caption'] == 'Heavy rain drumming on a tin roof'
    with pytest.raises(data.DatasetError, match='--captions-from'):
        prepare(config(tmp_path, root, captions_from=('tags', 'filenames')))


def test_rerun_reads_no_unchanged_file_and_converts_only_the_added_one(tmp_path, monkeypatch):
    root = tmp_path / 'sfx'
    for i in range(12):
        add_wav(root, f'Kinds{i % 3}/Sound_{i:02d}.wav', i, info_list(INAM=f'sound number {["one", "two"][i % 2]}'))
    first = prepare(config(tmp_path, root)).report
    read: list[str] = []
    real_read_bytes = Path.read_bytes

    def spy(self: Path) -> bytes:
        if str(self).startswith(str(root)):
            read.append(str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, 'read_bytes', spy)
    second = prepare(config(tmp_path, root)).report
    assert read == [] and second['totals']['converted'] == 0 and second['splits'] == first['splits']
    add_wav(root, 'Kinds0/Sound_99.wav', 99, info_list(INAM='a new sound'))
    read.clear()  # add_wav read it to append the tags
    third = prepare(config(tmp_path, root)).report
    assert read == [str(root / 'Kinds0/Sound_99.wav')] and third['totals']['converted'] == 1
    assert {r: third['splits'][r] for r in first['splits']} == first['splits']  # nothing moved


def test_captioned_take_families_never_straddle_the_split(tmp_path):
    """10 families of 5 takes, each take captioned by a JSON beside it: each family lands in one split."""
    root = tmp_path / 'sfx'
    for family, letter in enumerate('ABCDEFGHIJ'):
        for take in range(1, 6):
            add_wav(root, f'Hit_{letter}_{take:02d}.wav', family * 10 + take)
            (root / f'Hit_{letter}_{take:02d}.json').write_text(json.dumps({'description': f'hit number {letter}'}))
    splits = prepare(config(tmp_path, root)).report['splits']
    by_family: dict[str, set[str]] = {}
    for rel, split in splits.items():
        by_family.setdefault(rel.split('_')[1], set()).add(split)
    assert all(len(s) == 1 for s in by_family.values()) and len(by_family) == 10
    assert sum(s == 'valid' for s in splits.values()) == 5  # one family: the closest to 10 % of 50 files


def test_nothing_is_written_when_no_file_is_usable(tmp_path):
    root = tmp_path / 'sfx'
    for i in range(3):
        add_wav(root, f'{i:04d}.wav', i)
    result = prepare(config(tmp_path, root))
    assert result.exit_code == 1 and result.report['manifests'] == {}
    assert not (tmp_path / 'egs').exists() and not (tmp_path / 'cfg').exists()
    assert {i['code'] for i in result.report['issues']} == {'wordless_name'}


def test_names_ucs_and_take_families():
    assert names_caption('Animals/Dogs/Dog_Bark_Small_03.wav') == 'dog bark small, animals'
    assert names_caption('doorSlamHeavy-copy (1).wav') == 'door slam heavy'
    assert all(names_caption(n) is None for n in ('0001.wav', 'a8f3e2c1.wav', 'ZOOM0001.WAV', 'Take 3.wav'))
    assert ucs_caption('DOORWood_Door Slam Heavy_JD_Farm.wav') == 'door slam heavy, wood'
    assert ucs_caption('Dog_Bark_Small_03.wav') is None  # no CatID: an upper-case category, a capitalised subcategory
    keys = {family_key(n) for n in ('x/Door_01.wav', 'x/Door_02.wav', 'x/Door copy.wav', 'x/Door (1).wav')}
    assert keys == {'x/door'}
    assert family_key('y/Door_01.wav') != family_key('x/Door_01.wav')


def test_split_is_stratified_stable_and_gives_the_share():
    groups = [Family(f'{kind}/{i}', kind, [f'{kind}/{i}.wav']) for kind in ('a', 'b', 'c') for i in range(16)]
    splits = assign_splits(groups, 0.1, {})
    valid = {r for r, s in splits.items() if s == 'valid'}
    assert len(valid) == 5 and {r.split('/')[0] for r in valid} == {'a', 'b', 'c'}
    again = [Family(g.key, g.stratum, list(g.files)) for g in groups]
    assert assign_splits(list(reversed(again)), 0.1, {}) == splits  # deterministic, whatever the order
    more = again + [Family(f'a/new{i}', 'a', [f'a/new{i}.wav']) for i in range(30)]
    grown = assign_splits(more, 0.1, splits)
    assert {r: grown[r] for r in splits} == splits  # stable: nothing moved
    assert abs(sum(s == 'valid' for s in grown.values()) - 0.1 * len(grown)) <= 1


def test_cli_prepares_a_library_without_caption_files(tmp_path):
    """What the README shows: a library folder with no caption file, prepared with the defaults."""
    build_library(tmp_path / 'sfx')
    elsewhere = tmp_path / 'cwd'
    elsewhere.mkdir()
    env = {**os.environ, 'AUDIOGEN_HOME': str(tmp_path / 'home'), 'PYTHONPATH': str(ROOT)}
    proc = subprocess.run(
        [sys.executable, '-m', 'scripts.prepare_dataset', str(tmp_path / 'sfx'), '--name', 'mysfx'],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    tagged = 6 if HAS_MP3 else 5
    assert f'captions: {tagged} from tags, 2 UCS, 11 from names' in proc.stdout
    assert 'rejected wordless_name x3' in proc.stdout and 'duplicates: ' in proc.stdout
    assert (tmp_path / 'home/config/dataset/mysfx.yaml').is_file()
    assert (tmp_path / 'home/data/mysfx/captions.csv').is_file()
