"""The demo's story: data of known/new classes, the fixed classifier, the build cache, and `make demo`'s commands."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, subprocess_env

from solvers.demo import build_cache
from solvers.demo import classifier as demo_classifier
from solvers.demo import synthetic as demo_data


def test_known_and_new_classes_partition_the_demo_classes():
    assert set(demo_data.KNOWN_CLASSES) | set(demo_data.NEW_CLASSES) == set(demo_data.CLASS_NAMES)
    assert not set(demo_data.KNOWN_CLASSES) & set(demo_data.NEW_CLASSES)
    assert [c.name for c in demo_data.select_classes('new')] == list(demo_data.NEW_CLASSES)
    assert [c.name for c in demo_data.select_classes('bell, engine')] == ['bell', 'engine']
    with pytest.raises(ValueError, match='Unknown sound class nope'):
        demo_data.select_classes('bell,nope')


def test_new_captions_start_from_embeddings_the_pretraining_never_touched():
    """The LUT conditioner hashes each caption into a bucket: no new caption may share one with a known caption
    (or with the null condition, bucket 0), else the base model would already 'know' it."""
    from audiocraft.modules.conditioners import hash_trick

    from solvers.demo.tiny import tiny_lm_config

    n_bins = int(tiny_lm_config().conditioners.description.lut.n_bins)

    def buckets(names):
        return {hash_trick(c, n_bins) for cls in demo_data.select_classes(','.join(names)) for c in cls.captions}

    known, new = buckets(demo_data.KNOWN_CLASSES), buckets(demo_data.NEW_CLASSES)
    assert len(new) == 3 * len(demo_data.NEW_CLASSES) and not known & new and 0 not in known | new


def test_captions_take_turns_so_three_clips_carry_every_caption():
    for cls in demo_data.CLASSES:
        assert {demo_data.synthesize_clip(cls, 0, i)[1] for i in range(3)} == set(cls.captions)


def test_make_demo_data_writes_the_chosen_classes_and_removes_stale_clips(tmp_path):
    from scripts import make_demo_data

    assert make_demo_data.main([str(tmp_path), '--per-class', '2']) == 0
    assert make_demo_data.main([str(tmp_path), '--per-class', '1', '--classes', 'new']) == 0
    stems = sorted(p.stem for p in (tmp_path / 'audio').glob('*.wav'))
    assert stems == [f'{name}_000' for name in demo_data.NEW_CLASSES]
    assert sorted(p.stem for p in (tmp_path / 'metadata').glob('*.json')) == stems


def test_build_cache_builds_once_and_keys_on_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv(build_cache.CACHE_ENV, str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return {'w': torch.ones(2)}

    first = build_cache.load_or_build('thing', {'a': 1}, [demo_data], build, 'a thing')
    again = build_cache.load_or_build('thing', {'a': 1}, [demo_data], build, 'a thing')
    other = build_cache.load_or_build('thing', {'a': 2}, [demo_data], build, 'a thing')
    assert len(calls) == 2 and torch.equal(first['w'], again['w']) and torch.equal(other['w'], first['w'])
    assert len(list(tmp_path.glob('thing-*.pt'))) == 2
    with build_cache.single_thread():
        assert torch.get_num_threads() == 1


def test_classifier_features_ignore_gain_and_trailing_silence():
    clip, _ = demo_data.synthesize_clip(demo_data.CLASSES[0], 5, 0)
    padded = np.concatenate([0.5 * clip, np.zeros(8000, dtype=np.float32)])
    assert torch.allclose(
        demo_classifier.features(clip[:16000]), demo_classifier.features(padded[:16000] * 2), atol=1e-3
    )


def test_classifier_names_clean_clips_it_never_saw(tmp_path, monkeypatch):
    """The judge's features separate the classes: >= 95 % on clean held-out clips (the raw-clip variant, trained in
    seconds; the demo's judge hears the clips through the trained codec, checked by the slow test)."""
    monkeypatch.setenv(build_cache.CACHE_ENV, str(tmp_path))
    recipe = {**demo_classifier.RECIPE, 'heard_through': None}
    classifier = demo_classifier.load(recipe)
    clips, labels = demo_classifier.clean_clips(seed=3, per_class=4)
    assert classifier.accuracy(clips, labels) >= 0.95
    assert demo_classifier.clean_accuracy(recipe) >= 0.95
    assert set(classifier.predict(clips)) == set(demo_data.CLASS_NAMES)
    with pytest.raises(ValueError, match='heard_through'):
        demo_classifier.clean_clips(seed=3, per_class=1, heard_through='mp3')


def makefile_demo_commands() -> list[list[str]]:
    """The commands of the Makefile's demo target, with make's variables replaced by this interpreter."""
    lines = (ROOT / 'Makefile').read_text().split('\ndemo:', 1)[1].split('\n\n', 1)[0].splitlines()[1:]
    commands = []
    for line in lines:
        line = line.strip().lstrip('@').replace('$(PY)', sys.executable).replace('$(DATA)/', '')
        line = line.replace('$(VENV)/bin/dora', f'{sys.executable} -m dora')
        commands.append(shlex.split(line))
    return commands


@pytest.mark.slow
def test_make_demo_learns_the_new_classes(tmp_path):
    """`make demo`'s commands, run as the Makefile runs them (data in a temporary AUDIOGEN_HOME; the codec and the
    pretrained LM come from the user's build cache, built on first use): after the fine-tune the fixed classifier
    hears the new classes in >= 80 % of the clips generated from their captions, before it in few of them.

    The builds and the fine-tune are deterministic on one CPU model, but each CPU model's kernels round differently:
    6 epochs gave 97 % on one AMD EPYC VM and 89 % on another (docs/demo.md), so the bar is set below both."""
    env = subprocess_env(tmp_path / 'outputs')
    env['AUDIOGEN_HOME'] = str(tmp_path)
    log = []
    for command in makefile_demo_commands():
        # Relative data paths (data/demo_raw) go to the temporary home, as AUDIOGEN_HOME moves data/ there.
        command = [str(tmp_path / a) if a.startswith('data/') else a for a in command]
        # A guard against hangs only: the first build of the demo's models takes ~8 min on a quiet 2-core machine,
        # and CI may share the machine with other work (5x slower).
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        log.append(proc.stdout + proc.stderr[-3000:])
        assert proc.returncode == 0, f'{shlex.join(command)} failed:\n{log[-1]}'
    report_path = next((tmp_path / 'outputs' / 'xps').glob('*/demo_report.json'))
    report = json.loads(report_path.read_text())
    # The judge itself, as built by the demo (cached): held-out clean clips heard through the codec.
    assert demo_classifier.clean_accuracy() >= 0.9
    assert report['new_classes_after'] >= 0.8, log[-1]
    assert report['new_classes_before'] <= 0.3, log[-1]
    # The last lines are commands that work: generate from the fine-tuned XP.
    next_lines = log[-1].split('Next:', 1)[1].strip().splitlines()
    generate = shlex.split(next_lines[0].strip())
    assert generate[:3] == ['python', '-m', 'scripts.generate']
    proc = subprocess.run(
        [sys.executable, *generate[1:], '--out', str(tmp_path / 'gen')],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / 'gen').rglob('*.wav'))) == 6
