"""A new user's first hour, run exactly as the README and the CLIs' "Next:" lines print the commands.

The user's data lives under a temporary $AUDIOGEN_HOME (the documented variable that moves egs/, data/,
config/dataset/ and outputs/); no command gets an override the user wouldn't type.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import ROOT, command_argv

SR = 16000
CAPTIONS = {  # short sound effects, as sound designers make them: blips, clicks, hits, short tones
    'blip': ('a short electronic blip', 880.0, 0.12),
    'click': ('a sharp mouse click', 3000.0, 0.05),
    'chime': ('a soft notification chime', 1320.0, 0.8),
    'thud': ('a dull low thud', 90.0, 0.4),
    'buzz': ('an error buzzer', 220.0, 1.2),
}


def make_sounds(root: Path, per_class: int = 5) -> None:
    """A folder in the README's audio/ + metadata/ layout, with a silent file and a garbage file among them."""
    rng = np.random.default_rng(0)
    (root / 'audio').mkdir(parents=True)
    (root / 'metadata').mkdir()
    for name, (caption, freq, seconds) in CAPTIONS.items():
        for i in range(per_class):
            n = int(seconds * rng.uniform(0.8, 1.2) * SR)
            t = np.arange(n) / SR
            x = np.sin(2 * np.pi * freq * t) * np.exp(-t * 4 / seconds) + 0.05 * rng.standard_normal(n)
            sf.write(root / 'audio' / f'{name}_{i}.wav', (0.5 * x).astype(np.float32), SR, subtype='PCM_16')
            (root / 'metadata' / f'{name}_{i}.json').write_text(json.dumps({'text': caption}))
    sf.write(root / 'audio' / 'silence.wav', np.zeros(SR, np.float32), SR)
    (root / 'metadata' / 'silence.json').write_text(json.dumps({'text': 'nothing'}))
    (root / 'audio' / 'broken.wav').write_bytes(b'RIFF not really a wave file')
    (root / 'metadata' / 'broken.json').write_text(json.dumps({'text': 'broken'}))


def run(
    command: str, env: dict, check: bool = True, timeout: float = 1800, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    proc = subprocess.run(command_argv(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{command} failed ({proc.returncode}):\n{proc.stderr[-6000:]}')
    return proc


def printed_commands(output: str, header: str) -> list[str]:
    """The indented commands under the last line of ``output`` that holds ``header`` (e.g. "Next:")."""
    lines = re.sub(r'\x1b\[[0-9;]*m', '', output).splitlines()  # without the log's colours
    start = max(i for i, line in enumerate(lines) if header in line)
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith('  '):
            break
        block.append(line.strip())
    return block


@pytest.fixture()
def user_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith('AUDIOGEN_')}
    env.update(AUDIOGEN_HOME=str(tmp_path / 'home'), HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    env.pop('PYTHONWARNINGS', None)  # the user's shell has no warning filter: start-up must be quiet on its own
    return env


def history(folder: Path) -> list:
    return json.loads((folder / 'history.json').read_text())


@pytest.mark.slow
def test_prepare_train_resume_export_generate_on_a_cpu(tmp_path, user_env):
    sounds = tmp_path / 'my_sounds'
    make_sounds(sounds)
    home = Path(user_env['AUDIOGEN_HOME'])

    # README, step 1.
    proc = run(f'python -m scripts.prepare_dataset {sounds} --name mysounds', user_env)
    assert 'rejected silent x1' in proc.stdout and 'rejected unreadable x1' in proc.stdout
    assert '25 kept' in proc.stdout  # every blip and click (0.04-1.4 s) is kept
    commands = printed_commands(proc.stdout, 'Next, on this CPU')
    assert commands == ['python -m scripts.make_tiny_package', 'dora run solver=audiogen/tiny dataset=mysounds']
    run(commands[0], user_env)
    train = commands[1]

    # Train with the printed command; a crash (SIGKILL) after the first epoch's checkpoint.
    job = subprocess.Popen(
        command_argv(train),
        cwd=ROOT,
        env=user_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    folder = None
    try:
        deadline = time.time() + 1500
        while time.time() < deadline and job.poll() is None:
            found = list((home / 'outputs' / 'xps').glob('*/history.json'))
            if found and history(found[0].parent) and (found[0].parent / 'checkpoint.th').exists():
                folder = found[0].parent
                break
            time.sleep(0.2)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert folder is not None, 'the first epoch never completed'
    first = history(folder)
    assert 1 <= len(first) < 4 and all('valid' in epoch for epoch in first)  # validation ran with the preset as is

    # The same command resumes and finishes; start-up prints no warning a user can't act on.
    proc = run(train, user_env)
    log = proc.stderr + proc.stdout
    assert 'Loading existing checkpoint' in log or 'Resuming epoch' in log
    head = log.split('world_size is 1')[0]
    assert 'Warning' not in head and 'WARNING' not in head and 'warn' not in head, head[-3000:]
    final = history(folder)
    assert len(final) == 4 and final[: len(first)] == first
    assert final[-1]['train']['ce'] < final[0]['train']['ce']

    # Samples speak of the user's sounds; TensorBoard lists the run by dataset name.
    samples = sorted((folder / 'samples' / 'epoch_004').glob('*.wav'))
    captions = {c for c, _, _ in CAPTIONS.values()}
    assert len(samples) == 4
    assert all(any(p.name[3:].startswith(c.replace(' ', '_')[:20]) for c in captions) for p in samples), samples
    assert (home / 'outputs' / 'tensorboard' / f'mysounds_{folder.name}').is_symlink()

    # Running it again says it is complete instead of replaying silently, and prints what to do next.
    events = sorted((folder / 'tensorboard').glob('events.out.tfevents.*'))
    proc = run(train, user_env)
    assert 'is complete' in proc.stderr + proc.stdout
    assert len(history(folder)) == 4
    assert sorted((folder / 'tensorboard').glob('events.out.tfevents.*')) == events  # no empty event file added
    following = printed_commands(proc.stderr + proc.stdout, 'Next:')
    assert [shlex.split(c)[:3] for c in following[:3]] == [
        ['tensorboard', '--logdir', str(home / 'outputs' / 'tensorboard')],
        ['python', '-m', 'scripts.generate'],
        ['python', '-m', 'scripts.export'],
    ]
    # Offline, no CLAP model is cached: the base-vs-fine-tune line says what it can't compare instead.
    assert following[3].startswith('# base vs fine-tune needs a CLAP model') and 'scripts.evaluate tiny' in following[3]

    # Generate, export and evaluate exactly as printed, from another folder (the editable install finds the clone):
    # their outputs land beside the user.
    work = tmp_path / 'work'
    work.mkdir()
    elsewhere = {k: v for k, v in user_env.items() if k != 'PYTHONPATH'}
    for command in following[1:3]:
        proc = run(command, elsewhere, cwd=work)
        assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    clips = sorted((work / 'out').rglob('*.wav'))
    assert len(clips) == 5
    wav, sr = sf.read(clips[0], dtype='float32')
    assert sr == SR and abs(float(np.mean(wav))) < 1e-3  # no DC offset left after loudness normalisation
    assert (work / 'exported' / 'mysounds' / 'state_dict.bin').exists()

    # Batch-generate from the export (README "Generate and export").
    proc = run(
        'python -m scripts.generate "a soft notification chime" --model exported/mysounds --batch_size 2 --duration 1',
        elsewhere,
        cwd=work,
    )
    assert len(sorted((work / 'out').rglob('*.wav'))) == 7 and 'Traceback' not in proc.stderr


@pytest.mark.parametrize(
    'override, expected',
    [
        (
            'optim.lrr=1',
            "error: Unknown config key 'optim.lrr': no preset or base config defines it. Did you mean optim.lr?",
        ),
        ('dataset=mysoundz', 'error: Unknown preset dataset=mysoundz: config/dataset/ has'),
    ],
)
def test_config_mistakes_in_dora_run_are_one_line(user_env, override, expected):
    proc = run(f'dora run solver=audiogen/tiny {override}', user_env, check=False, timeout=300)
    assert proc.returncode == 2  # every config mistake: one exit status (tests/test_run_errors.py: no XP folder)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU: device=cuda is valid here')
def test_the_gpu_preset_on_a_cpu_machine_says_so_in_one_line(user_env):
    proc = run('dora run solver=audiogen/train', user_env, check=False, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if 'ERROR' in line or 'error' in line]
    assert len(errors) == 1 and 'torch sees no CUDA GPU on this machine' in errors[0], proc.stderr[-3000:]
    assert 'solver=audiogen/tiny' in errors[0]
