"""scripts/prepare_dataset.py and solvers/data/ on a fuzz corpus of broken and odd inputs, built in tmp dirs."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from solvers import data as dataprep
from solvers.data import PrepareConfig, plan_chunks, prepare

os.environ.setdefault('HF_HUB_OFFLINE', '1')
ROOT = Path(__file__).resolve().parents[1]
SR = 16000
HAS_MP3 = 'MP3' in sf.available_formats()


def tone(seconds: float, sr: int = SR, channels: int = 1, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.stack([x * (1 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


def write_meta(path: Path, payload: dict | str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    elif isinstance(payload, str):
        path.write_text(payload, encoding='utf-8')
    else:
        path.write_text(json.dumps(payload, ensure_ascii=False), encoding='utf-8')


def add_clip(
    root: Path,
    rel: str,
    x: np.ndarray | None,
    sr: int = SR,
    meta: dict | str | bytes | None = None,
    subtype: str | None = 'PCM_16',
    fmt: str | None = None,
    raw: bytes | None = None,
) -> None:
    """Add ``audio/<rel>`` (samples or raw bytes) and, unless ``meta`` is None, ``metadata/<rel stem>.json``."""
    audio = root / 'audio' / rel
    audio.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        audio.write_bytes(raw)
    else:
        sf.write(audio, x, sr, subtype=subtype, format=fmt)
    if meta is not None:
        write_meta(root / 'metadata' / Path(rel).with_suffix('.json'), meta)


def build_fuzz_corpus(root: Path, outside: Path) -> tuple[set[str], dict[str, str]]:
    """The fuzz corpus in the audio/ + metadata/ layout.

    Returns:
        The relative paths that must be kept, and ``{path: code}`` of the rows the report must hold.
    """
    good: set[str] = set()
    expect: dict[str, str] = {}

    def ok(rel: str, x: np.ndarray, sr: int = SR, caption: str = 'a test tone', key: str = 'text', **kw) -> None:
        x = x * (1 - 0.01 * len(good))  # a different level each: the same audio twice would be kept once
        add_clip(root, rel, x, sr, meta={key: caption}, **kw)
        good.add(f'audio/{rel}')

    ok('rates/tone_8k.wav', tone(2, 8000), 8000, key='description')
    expect['audio/rates/tone_8k.wav'] = 'upsampled'
    ok('rates/tone_44k_stereo.wav', tone(2, 44100, 2), 44100, key='caption')
    ok('rates/tone_48k_6ch.wav', tone(2, 48000, 6), 48000)
    ok('formats/tone.flac', tone(1.5, 22050), 22050, subtype='PCM_24')
    ok('formats/tone.ogg', tone(1.5, 44100, 2), 44100, subtype='VORBIS')
    if HAS_MP3:
        ok('formats/tone.mp3', tone(2, 44100, 2), 44100, subtype='MPEG_LAYER_III')
    ok('long45.wav', tone(45), caption='a very long tone')
    expect['audio/long45.wav'] = 'split'
    ok('unicode.wav', tone(1.5), caption='  Ein Hund bellt 🐕 — 犬が吠える\n ')
    ok('long_caption.wav', tone(1.5), caption='word ' * 1000)
    expect['audio/long_caption.wav'] = 'long_caption'
    ok('hot_float.wav', tone(1.5, amp=2.0), subtype='FLOAT')
    expect['audio/hot_float.wav'] = 'over_full_scale'
    # Duplicate stems: two folders, and the same stem in two formats sharing one metadata file.
    ok('dup/a/x.wav', tone(1.2, freq=300))
    ok('dup/b/x.wav', tone(1.2, freq=600))
    ok('dup/x.wav', tone(1.2, freq=900))
    add_clip(root, 'dup/x.flac', tone(1.3, freq=1200), subtype='PCM_16')
    good.add('audio/dup/x.flac')
    add_clip(root, 'mismatch.wav', tone(2), meta={'text': 'metadata lies', 'duration': 10.0, 'sample_rate': 44100})
    good.add('audio/mismatch.wav')
    expect['audio/mismatch.wav'] = 'duration_mismatch'
    expect['audio/mismatch.wav#sr'] = 'sample_rate_mismatch'
    # Short sounds (a click, a UI blip) are kept by default: AudioGen pads short segments.
    ok('click.wav', tone(0.05, freq=2000))
    ok('blip.wav', tone(0.3, freq=1000))
    full = tone(4)
    add_clip(root, 'truncated.wav', full, meta={'text': 'cut short'})
    data = (root / 'audio/truncated.wav').read_bytes()
    (root / 'audio/truncated.wav').write_bytes(data[: len(data) // 2])
    good.add('audio/truncated.wav')
    expect['audio/truncated.wav'] = 'truncated'

    bad = {
        'short.wav': ('too_short', dict(x=tone(0.02))),  # under two codec frames
        'silence.wav': ('silent', dict(x=np.zeros((SR * 2, 1), np.float32))),
        'nan.wav': (
            'non_finite',
            dict(x=np.where(np.arange(SR * 2)[:, None] % 100 == 0, np.nan, tone(2)), subtype='FLOAT'),
        ),
        'inf.wav': ('non_finite', dict(x=np.where(np.arange(SR * 2)[:, None] == 5, np.inf, tone(2)), subtype='FLOAT')),
        'clipped.wav': ('clipped', dict(x=np.sign(tone(2, amp=1.0)) * 1.0)),
        'antiphase.wav': ('cancels_on_downmix', dict(x=np.concatenate([tone(2), -tone(2)], axis=1))),
        'zero.wav': ('empty_file', dict(x=None, raw=b'')),
        'garbage.wav': ('unreadable', dict(x=None, raw=np.random.default_rng(0).bytes(5000))),
        'header_only.wav': ('unreadable', dict(x=None, raw=b'RIFF\x24\x00\x00\x00WAVEfmt ')),
    }
    for rel, (code, kw) in bad.items():
        add_clip(root, rel, meta={'text': 'bad audio'}, **kw)
        expect[f'audio/{rel}'] = code
    caption_cases = {
        'no_json.wav': ('missing_caption', None),
        'bad_json.wav': ('malformed_json', '{"text": "unterminated'),
        'latin1.wav': ('not_utf8', '{"text": "caf\u00e9 ambience"}'.encode('latin-1')),
        'empty_caption.wav': ('empty_caption', {'text': ''}),
        'ws_caption.wav': ('empty_caption', {'text': '  \n\t '}),
        'number_caption.wav': ('bad_caption', {'text': 42}),
        'list_root.wav': ('bad_json_root', '["a dog"]'),
        'no_key.wav': ('missing_caption', {'title': 'no caption key'}),
    }
    for rel, (code, meta) in caption_cases.items():
        add_clip(root, rel, tone(1.5), meta=meta)
        expect[f'audio/{rel}'] = code
    # A symlink out of the root, and an unsupported container.
    sf.write(outside, tone(2), SR)
    os.symlink(outside, root / 'audio' / 'escape.wav')
    write_meta(root / 'metadata' / 'escape.json', {'text': 'outside'})
    expect['audio/escape.wav'] = 'escapes_root'
    (root / 'audio' / 'notes.m4a').write_bytes(b'\x00\x00\x00\x18ftypM4A ')
    expect['audio/notes.m4a'] = 'unsupported_format'
    write_meta(root / 'metadata' / 'orphan.json', {'text': 'no audio'})
    expect['metadata/orphan.json'] = 'orphan_metadata'
    return good, expect


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*'))
        if p.is_file() and not p.is_symlink()
    }


def config_for(tmp: Path, dataset: Path, name: str = 'fuzz', **kw) -> PrepareConfig:
    return PrepareConfig(
        dataset_dir=dataset,
        name=name,
        out_dir=tmp / 'out',
        egs_root=tmp / 'egs',
        config_root=tmp / 'cfg',
        progress=False,
        **kw,
    )


def manifest(tmp: Path, name: str, split: str) -> list[dict]:
    with gzip.open(tmp / 'egs' / name / split / 'data.jsonl.gz', 'rt', encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def sidecar(entry: dict) -> dict:
    return json.loads(Path(entry['path']).with_suffix('.json').read_text(encoding='ascii'))


@pytest.fixture(scope='module')
def fuzz(tmp_path_factory) -> dict:
    """The fuzz corpus prepared once with 2 workers (module scope: the tests below only read it).

    Captions come from caption files only, so that a file without one is rejected rather than captioned from its
    name (tests/test_prepare_library.py covers the other sources).
    """
    tmp = tmp_path_factory.mktemp('fuzz')
    dataset = tmp / 'dataset'
    good, expect = build_fuzz_corpus(dataset, tmp / 'outside.wav')
    before = tree_hashes(dataset)
    result = prepare(config_for(tmp, dataset, workers=2, captions_from=('metadata',)))
    return {'tmp': tmp, 'dataset': dataset, 'good': good, 'expect': expect, 'before': before, 'result': result}


def test_every_bad_file_is_reported_with_its_reason(fuzz):
    issues = fuzz['result'].report['issues']
    for path, code in fuzz['expect'].items():
        path = path.split('#')[0]
        rows = [i for i in issues if i['path'] == path]
        assert any(i['code'] == code for i in rows), f'{path}: expected {code}, report has {rows}'
        assert all(i['reason'] and i['fix'] for i in rows)
    rejected = {i['path'] for i in issues if i['status'] == 'rejected'}
    assert rejected.isdisjoint(fuzz['good'])
    malformed = next(i for i in issues if i['code'] == 'malformed_json')
    assert malformed['metadata_path'] == 'metadata/bad_json.json' and 'line 1, column 10' in malformed['reason']
    totals = fuzz['result'].report['totals']
    bad_audio = {p.split('#')[0] for p, c in fuzz['expect'].items() if not p.startswith('metadata/')} - fuzz['good']
    assert totals['rejected_files'] == len(bad_audio)
    assert totals['kept_files'] + totals['rejected_files'] == totals['audio_files']
    text = (fuzz['tmp'] / 'out' / 'report.txt').read_text(encoding='utf-8')
    assert 'escapes_root' in text and 'audio/garbage.wav' in text
    assert (
        json.loads((fuzz['tmp'] / 'out' / 'report.json').read_text(encoding='utf-8'))['totals']
        == fuzz['result'].report['totals']
    )


def test_every_good_file_and_chunk_lands_in_exactly_one_split(fuzz):
    tmp, report = fuzz['tmp'], fuzz['result'].report
    train, valid = manifest(tmp, 'fuzz', 'train'), manifest(tmp, 'fuzz', 'valid')
    assert train and valid
    paths = [e['path'] for e in train + valid]
    assert len(paths) == len(set(paths))
    sources = {}
    for split, entries in (('train', train), ('valid', valid)):
        for e in entries:
            assert Path(e['path']).is_absolute() and Path(e['path']).is_file()
            assert e['sample_rate'] == SR and e['amplitude'] is None and e['weight'] is None and e['info_path'] is None
            info = sf.info(e['path'])
            assert (info.samplerate, info.channels, info.subtype) == (SR, 1, 'PCM_16')
            assert abs(info.frames / SR - e['duration']) < 1e-9
            sources.setdefault(sidecar(e)['source'], set()).add(split)
    assert set(sources) == fuzz['good']
    assert all(len(splits) == 1 for splits in sources.values()), 'chunks of one file were split across splits'
    long_chunks = [e for e in train + valid if sidecar(e)['source'] == 'audio/long45.wav']
    assert len(long_chunks) == 2 and all(abs(e['duration'] - 22.5) < 1e-3 for e in long_chunks)
    assert all(sidecar(e)['description'] == 'a very long tone' for e in long_chunks)
    assert all(e['duration'] <= 30 for e in train + valid)
    # Duplicate stems produced distinct outputs.
    dup = [e for e in train + valid if sidecar(e)['source'].startswith('audio/dup/')]
    assert len(dup) == 4 and len({Path(e['path']).name for e in dup}) == 4
    assert report['totals']['kept_files'] == len(fuzz['good'])
    assert report['totals']['clips'] == len(paths)


def test_inputs_are_unchanged_and_captions_cleaned(fuzz):
    assert tree_hashes(fuzz['dataset']) == fuzz['before']
    entries = manifest(fuzz['tmp'], 'fuzz', 'train') + manifest(fuzz['tmp'], 'fuzz', 'valid')
    captions = {sidecar(e)['source']: sidecar(e)['description'] for e in entries}
    assert captions['audio/unicode.wav'] == 'Ein Hund bellt 🐕 — 犬が吠える'
    assert len(captions['audio/long_caption.wav']) == 4999


def test_preset_is_written_in_the_dataset_group_shape(fuzz):
    text = (fuzz['tmp'] / 'cfg' / 'fuzz.yaml').read_text(encoding='utf-8')
    assert text.startswith('# @package __global__\n')
    egs = os.path.realpath(fuzz['tmp'] / 'egs' / 'fuzz')
    for key, split in (('train', 'train'), ('valid', 'valid')):
        assert f'  {key}: {egs}/{split}' in text  # egs root outside the project: absolute paths
    assert '  evaluate: null' in text and '  generate: null' in text  # samples come from generate.prompts
    assert 'max_sample_rate: 16000' in text
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(fuzz['tmp'] / 'cfg' / 'fuzz.yaml')
    # From the data: 90 % of the clips fit a segment, and samples use the dataset's own captions.
    assert 1 <= cfg.dataset.segment_duration <= 10 and cfg.generate.duration == cfg.dataset.segment_duration
    assert len(cfg.generate.prompts) == 4 and all(isinstance(p, str) and p for p in cfg.generate.prompts)
    assert cfg.dataset.valid.num_samples is None and cfg.dataset.num_workers >= 0


def test_manifests_load_with_audiocraft_and_sound_dataset_reads_captions(fuzz):
    from audiocraft.data.audio_dataset import load_audio_meta
    from audiocraft.data.sound_dataset import SoundDataset

    for split in ('train', 'valid'):
        metas = load_audio_meta(fuzz['tmp'] / 'egs' / 'fuzz' / split / 'data.jsonl.gz')
        assert metas and all(m.sample_rate == SR for m in metas)
    split = fuzz['result'].report['splits']['audio/unicode.wav']
    dataset = SoundDataset.from_meta(
        fuzz['tmp'] / 'egs' / 'fuzz' / split, segment_duration=None, sample_rate=SR, channels=1, shuffle=False
    )
    index = next(i for i, m in enumerate(dataset.meta) if sidecar({'path': m.path})['source'] == 'audio/unicode.wav')
    wav, info = dataset[index]
    assert wav.shape[0] == 1 and info.description == 'ein hund bellt 🐕 — 犬が吠える'  # audiocraft lower-cases


def test_rerun_converts_nothing_then_only_the_added_file(tmp_path):
    from solvers.demo.synthetic import make_demo_dataset

    dataset = tmp_path / 'dataset'
    make_demo_dataset(dataset, seed=1, per_class=2)
    first = prepare(config_for(tmp_path, dataset, name='re'))
    assert first.exit_code == 0 and first.report['totals']['converted'] == 14
    outputs = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'out' / 'wav').iterdir()}
    second = prepare(config_for(tmp_path, dataset, name='re'))
    assert second.report['totals']['converted'] == 0 and second.report['totals']['unchanged'] == 14
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'out' / 'wav').iterdir()} == outputs
    assert second.report['splits'] == first.report['splits']

    add_clip(dataset, 'new_one.wav', tone(2), meta={'text': 'a new sound'})
    third = prepare(config_for(tmp_path, dataset, name='re'))
    assert third.report['totals']['converted'] == 1 and third.report['totals']['kept_files'] == 15
    moved = {r for r, s in first.report['splits'].items() if third.report['splits'][r] != s}
    assert not moved  # each file keeps the split the state recorded

    # Editing a caption rewrites the sidecar without converting; deleting a file removes its outputs.
    write_meta(dataset / 'metadata' / 'new_one.json', {'text': 'an edited caption'})
    (dataset / 'audio' / 'bell_000.wav').unlink()
    fourth = prepare(config_for(tmp_path, dataset, name='re'))
    assert fourth.report['totals']['converted'] == 0 and fourth.report['totals']['stale_removed'] == 2
    entries = manifest(tmp_path, 're', 'train') + manifest(tmp_path, 're', 'valid')
    captions = {sidecar(e)['source']: sidecar(e)['description'] for e in entries}
    assert captions['audio/new_one.wav'] == 'an edited caption' and 'audio/bell_000.wav' not in captions


def test_sidecar_layout_and_captions_files(tmp_path):
    side = tmp_path / 'side'
    side.mkdir()
    for i in range(3):
        sf.write(side / f's{i}.flac', tone(1.5, 44100, 2, freq=300 + 100 * i), 44100)
        (side / f's{i}.json').write_text(json.dumps({'description': f'sidecar {i}'}))
    rep = prepare(config_for(tmp_path / 'a', side, name='side')).report
    assert rep['layout'] == 'sidecar JSON' and rep['totals']['kept_files'] == 3

    csv_root = tmp_path / 'clotho'
    (csv_root / 'development').mkdir(parents=True)
    for i in range(3):
        sf.write(csv_root / 'development' / f'c{i}.wav', tone(1.5, 48000, freq=500 + 50 * i), 48000)
    (csv_root / 'captions.csv').write_text(
        'file_name,caption_1,caption_2\n'
        'c0.wav,a bird sings,birdsong outside\n'
        'development/c1.wav,"a door, creaking",\n'
        'c2.wav,  ,\n'
        '../etc/passwd,escape,\n'
        'missing.wav,nothing,\n',
        encoding='utf-8',
    )
    rep = prepare(config_for(tmp_path / 'b', csv_root, name='clotho')).report
    assert rep['layout'] == 'captions file' and rep['totals']['kept_files'] == 2
    codes = {(i['path'], i['code']) for i in rep['issues']}
    assert ('development/c2.wav', 'empty_caption') in codes
    assert ('captions.csv:5', 'escapes_root') in codes and ('captions.csv:6', 'caption_for_missing_audio') in codes
    entries = manifest(tmp_path / 'b', 'clotho', 'train') + manifest(tmp_path / 'b', 'clotho', 'valid')
    captions = {sidecar(e)['source']: sidecar(e)['description'] for e in entries}
    assert captions['development/c0.wav'] == ['a bird sings', 'birdsong outside']  # SoundDataset samples one
    assert captions['development/c1.wav'] == 'a door, creaking'

    jsonl_root = tmp_path / 'jsonl'
    jsonl_root.mkdir()
    for i in range(2):
        sf.write(jsonl_root / f'j{i}.ogg', tone(1.5, 22050, freq=300 + 200 * i), 22050)  # not duplicates
    (jsonl_root / 'captions.jsonl').write_text(
        '{"path": "j0.ogg", "text": "first"}\n{"path": "j1", "caption": "second"}\n{broken\n', encoding='utf-8'
    )
    rep = prepare(config_for(tmp_path / 'c', jsonl_root, name='jsonl')).report
    assert rep['totals']['kept_files'] == 2
    assert any(i['path'] == 'captions.jsonl:3' and i['code'] == 'bad_captions_row' for i in rep['issues'])


def test_plan_chunks_never_leaves_a_short_remainder():
    assert plan_chunks(45 * SR, SR, 1, 30) == ([(0, 22.5 * SR), (22.5 * SR, 45 * SR)], 0)
    chunks, dropped = plan_chunks(61 * SR, SR, 1, 30)
    assert len(chunks) == 3 and dropped == 0 and all(b - a >= 20 * SR for a, b in chunks)
    # min > max / 2: equal chunks would be too short, so cut max-long chunks and drop the remainder.
    chunks, dropped = plan_chunks(35 * SR, SR, 20, 30)
    assert chunks == [(0, 30 * SR)] and dropped == 5 * SR
    assert plan_chunks(10 * SR, SR, 1, 30) == ([(0, 10 * SR)], 0)


def test_splits_are_deterministic_and_valid_is_never_empty():
    rels = {f'audio/f{i}.wav': f'f{i}.wav' for i in range(200)}
    captions = {rel: f'sound {i}' for i, rel in enumerate(rels)}
    splits = dataprep.assign_splits(dataprep.families(rels, captions), 0.1, {})
    assert splits == dataprep.assign_splits(dataprep.families(dict(reversed(rels.items())), captions), 0.1, {})
    assert sum(s == 'valid' for s in splits.values()) == 20
    two = dataprep.assign_splits(
        dataprep.families({'a.wav': 'a.wav', 'b.wav': 'b.wav'}, {'a.wav': 'a', 'b.wav': 'b'}), 0.1, {}
    )
    assert sorted(two.values()) == ['train', 'valid']


def run_cli(*args: str, check_code: int | None = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONWARNINGS='ignore')
    proc = subprocess.run(
        [sys.executable, 'scripts/prepare_dataset.py', *args, '--no-progress'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check_code is not None:
        assert proc.returncode == check_code, proc.stdout + proc.stderr
    return proc


def test_cli_end_to_end_preset_strict_and_errors(tmp_path):
    demo = tmp_path / 'demo'
    proc = subprocess.run(
        [sys.executable, 'scripts/make_demo_data.py', str(demo), '--per-class', '2'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    common = [
        '--name',
        'cli',
        '--out',
        str(tmp_path / 'out'),
        '--egs-root',
        str(tmp_path / 'egs'),
        '--config-root',
        str(tmp_path / 'cfg'),
        '--workers',
        '2',
    ]
    proc = run_cli(str(demo), *common)
    assert '14 kept' in proc.stdout and '  dora run solver=audiogen/tiny dataset=cli' in proc.stdout
    assert '  dora run solver=audiogen/train dataset=cli' in proc.stdout
    preset = tmp_path / 'cfg' / 'cli.yaml'
    first = preset.read_text()
    for i in range(3):  # longer clips: the preset's segment length follows the data
        add_clip(demo, f'long{i}.wav', tone(9, freq=200 + 100 * i), meta={'text': 'a long hum'})
    proc = run_cli(str(demo), *common)  # a generated, unedited preset is updated
    assert '(updated; 9 s segments' in proc.stdout and preset.read_text() != first
    preset.write_text(preset.read_text() + '# edited by hand\n')
    proc = run_cli(str(demo), *common)
    assert 'kept: you edited it' in proc.stdout and 'edited by hand' in preset.read_text()
    run_cli(str(demo), *common, '--force')
    assert 'edited by hand' not in preset.read_text()

    add_clip(demo, 'silent.wav', np.zeros((SR * 2, 1), np.float32), meta={'text': 'nothing'})
    run_cli(str(demo), *common)  # a rejection alone is not an error...
    proc = run_cli(str(demo), *common, '--strict', check_code=1)  # ...unless --strict
    assert '--strict' in proc.stderr

    empty = tmp_path / 'empty'
    add_clip(empty, 'a.wav', tone(0.01), meta={'text': 'too short'})
    proc = run_cli(
        str(empty),
        '--name',
        'empty',
        '--out',
        str(tmp_path / 'o2'),
        '--egs-root',
        str(tmp_path / 'e2'),
        '--config-root',
        str(tmp_path / 'c2'),
        check_code=1,
    )
    assert 'no usable file' in proc.stderr
    proc = run_cli(str(tmp_path / 'nope'), '--name', 'x', check_code=2)
    assert 'does not exist' in proc.stderr
    proc = run_cli(str(demo), '--name', 'bad name!', check_code=2)
    assert '--name' in proc.stderr


def test_killed_run_leaves_no_truncated_outputs_and_resumes(tmp_path):
    from solvers.demo.synthetic import make_demo_dataset

    dataset = tmp_path / 'dataset'
    make_demo_dataset(dataset, seed=2, per_class=8)
    args = [
        sys.executable,
        'scripts/prepare_dataset.py',
        str(dataset),
        '--name',
        'kill',
        '--workers',
        '1',
        '--out',
        str(tmp_path / 'out'),
        '--egs-root',
        str(tmp_path / 'egs'),
        '--config-root',
        str(tmp_path / 'cfg'),
        '--no-progress',
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / 'out' / dataprep.STATE_FILE
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b'\n') >= 5:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for wav in (tmp_path / 'out' / 'wav').glob('*.wav'):  # every visible WAV is complete
        data = wav.read_bytes()
        assert len(data) == 44 + int.from_bytes(data[40:44], 'little'), wav
    done = sum(1 for line in journal.read_bytes().splitlines() if line.endswith(b'}')) if journal.exists() else 0
    result = prepare(config_for(tmp_path, dataset, name='kill'))
    assert result.exit_code == 0 and result.report['totals']['kept_files'] == 56
    assert result.report['totals']['converted'] <= 56 - min(done, 56)
    assert not list((tmp_path / 'out').rglob('.*.tmp'))


def test_make_demo_data_is_deterministic_and_varied(tmp_path):
    from solvers.demo.synthetic import CLASSES, make_demo_dataset

    a = make_demo_dataset(tmp_path / 'a', seed=0, per_class=2)
    make_demo_dataset(tmp_path / 'b', seed=0, per_class=2)
    assert tree_hashes(tmp_path / 'a') == tree_hashes(tmp_path / 'b')
    assert len(CLASSES) >= 6 and len(a) == 2 * len(CLASSES)
    for wav in a:
        info = sf.info(wav)
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, 'PCM_16') and 1 <= info.duration <= 4
        meta = json.loads((tmp_path / 'a' / 'metadata' / f'{wav.stem}.json').read_text())
        assert meta['text'] and meta['sample_rate'] == SR and abs(meta['duration'] - info.duration) < 1e-3
