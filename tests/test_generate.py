"""Batch generation (scripts/generate.py, solvers/generation/generate.py) on the tiny package, offline, on the CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch
from helpers import ROOT, subprocess_env

from scripts import generate as generate_cli
from solvers import atomic
from solvers.generation import audio_io
from solvers.generation import generate as generation
from solvers.models import package

PROMPTS = ['dog barking', 'sirens of an emergency vehicle']
SIDECAR_KEYS = {
    'prompt',
    'seed',
    'file',
    'model',
    'model_kind',
    'model_path',
    'weights',
    'params',
    'duration',
    'sample_rate',
    'channels',
    'lufs',
    'target_lufs',
    'peak_dbfs',
    'format',
    'device',
    'versions',
    'created',
    'reproduce',
}


def run_cli(*args: str) -> int:
    return generate_cli.main([*args, '--no-progress', '--device', 'cpu'])


def read(path: Path) -> torch.Tensor:
    data, sr = soundfile.read(path, dtype='float32', always_2d=True)
    assert sr == 16000
    return torch.from_numpy(data.T)


@pytest.fixture(scope='session')
def first_run(tmp_path_factory, tiny_package) -> dict:
    """Two prompts x 3 seeds in batches of 4, 1 s clips."""
    out = tmp_path_factory.mktemp('gen') / 'out'
    args = [
        *PROMPTS,
        '--model',
        str(tiny_package),
        '--batch_size',
        '3',
        '--duration',
        '1',
        '--max-batch',
        '4',
        '--out',
        str(out),
    ]
    assert run_cli(*args) == 0
    return {'out': out, 'args': args}


def run_folder(out: Path, prompt: str, index: int = 0) -> Path:
    runs = sorted((out / audio_io.slugify(prompt)).iterdir())
    return runs[index]


def test_layout_sidecars_and_loudness(first_run, tiny_package):
    out = first_run['out']
    assert sorted(p.name for p in out.iterdir()) == sorted(audio_io.slugify(p) for p in PROMPTS)
    for prompt in PROMPTS:
        folder = run_folder(out, prompt)
        assert sorted(p.name for p in folder.iterdir()) == ['0.json', '0.wav', '1.json', '1.wav', '2.json', '2.wav']
        for seed in range(3):
            wav = read(folder / f'{seed}.wav')
            assert wav.shape == (1, 16000) and wav.abs().max() < 1.0
            assert abs(audio_io.loudness(wav, 16000) + 14.0) <= 1.0
            meta = json.loads((folder / f'{seed}.json').read_text())
            assert SIDECAR_KEYS <= set(meta)
            assert meta['prompt'] == prompt and meta['seed'] == seed and meta['file'] == f'{seed}.wav'
            assert meta['model_kind'] == 'package' and meta['model_path'] == str(tiny_package)
            assert meta['params']['duration'] == 1.0 and meta['params']['top_k'] == 250
            assert meta['params']['extend_stride'] == 2.0 and meta['params']['max_duration'] == 10.0
            assert meta['sample_rate'] == 16000 and meta['duration'] == 1.0 and meta['target_lufs'] == -14.0
            assert abs(meta['lufs'] + 14.0) <= 1.0 and meta['peak_dbfs'] <= -1.0 + 1e-3
            assert meta['versions']['audiocraft'] == '1.3.0' and meta['versions']['audiogen_finetune']
            assert f'--seeds {seed}' in meta['reproduce']
    # variations differ from each other
    folder = run_folder(out, PROMPTS[0])
    assert not torch.equal(read(folder / '0.wav'), read(folder / '1.wav'))


def test_same_command_and_single_seed_reproduce_the_files(first_run, tmp_path):
    out = first_run['out']
    assert run_cli(*first_run['args']) == 0  # same command, same out: a new timestamp folder, nothing overwritten
    for prompt in PROMPTS:
        runs = sorted((out / audio_io.slugify(prompt)).iterdir())
        assert len(runs) == 2
        for seed in range(3):
            assert torch.equal(read(runs[0] / f'{seed}.wav'), read(runs[1] / f'{seed}.wav')), (prompt, seed)
    # One seed of one prompt, alone in its batch and without the other prompt: the same file as in the first run.
    single = tmp_path / 'single'
    args = first_run['args']
    model = args[args.index('--model') + 1]
    assert (
        run_cli(
            PROMPTS[1], '--model', model, '--seeds', '2', '--duration', '1', '--max-batch', '1', '--out', str(single)
        )
        == 0
    )
    rerun = run_folder(single, PROMPTS[1])
    assert [p.name for p in sorted(rerun.iterdir())] == ['2.json', '2.wav']
    assert torch.equal(read(rerun / '2.wav'), read(run_folder(out, PROMPTS[1]) / '2.wav'))


def test_timestamp_collisions_get_a_suffix(tmp_path):
    first = generation.allocate_folder(tmp_path, 'Dog barking!', '20250101-000000')
    second = generation.allocate_folder(tmp_path, 'dog barking', '20250101-000000')
    assert first.name == '20250101-000000' and second.name == '20250101-000000-1' and first.parent == second.parent
    (first / '0.json').write_text('{}')
    with pytest.raises(FileExistsError):
        atomic.write_json(first / '0.json', {'a': 1}, overwrite=False)
    assert (first / '0.json').read_text() == '{}'


def test_sampler_draws_the_right_distribution_per_item():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]).expand(3, 2000, 5).clone()
    sampler = generation.PerItemSampler([0, 1, 2])
    with sampler:
        from audiocraft.utils import utils

        assert utils.multinomial == sampler.multinomial
        tokens = utils.sample_top_k(probs.clone(), k=3)  # goes through the patched function
    assert utils.multinomial is not sampler.multinomial  # restored
    assert tokens.shape == (3, 2000, 1)
    counts = torch.bincount(tokens.flatten(), minlength=5).float() / tokens.numel()
    assert counts[1] == 0 and counts[4] == 0
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]), atol=0.02, rtol=0)
    # an item's draws depend on its own seed only, not on its neighbours
    alone = generation.PerItemSampler([1]).multinomial(probs[:1].clone(), 1)
    assert torch.equal(alone, tokens[1:2])


def test_batches_only_mix_prompts_with_the_same_conditioning_shape():
    items = [generation.Item(p, s) for p in ['a', 'bb', 'c', 'dd'] for s in range(3)]
    batches = generation.plan_batches(items, 4, key=len)
    assert [[(i.prompt, i.seed) for i in b] for b in batches] == [
        [('a', 0), ('a', 1), ('a', 2), ('c', 0)],
        [('c', 1), ('c', 2)],
        [('bb', 0), ('bb', 1), ('bb', 2), ('dd', 0)],
        [('dd', 1), ('dd', 2)],
    ]


def test_prompts_file_and_seeds(tmp_path):
    path = tmp_path / 'prompts.txt'
    path.write_text(
        '# effects for the trailer\n\nwind through pines\n  café terrace chatter  \n#done\n', encoding='utf-8'
    )
    assert generation.read_prompts_file(path) == ['wind through pines', 'café terrace chatter']
    assert generation.make_seeds(3, 10) == [10, 11, 12]
    assert generation.make_seeds(25, 0, [7, 3]) == [7, 3]
    assert generation.check_prompts(['a', ' a ', 'b']) == ['a', 'b']


def test_sliding_window_beyond_the_model_window(tmp_path, tiny_package):
    """A package with a 2.5 s window generates 3.5 s clips by extension, reproducibly, at the requested length."""
    short = tmp_path / 'short'
    cfg = package.lm_config(str(tiny_package))
    cfg.dataset.segment_duration = 2.5  # AudioGen itself needs a window > 2 s (its default extend_stride)
    codec = torch.load(tiny_package / package.COMPRESSION_FILE, weights_only=True)
    package.write(short, cfg, package.lm_state(str(tiny_package)), codec['xp.cfg'], codec['best_state'])
    for _ in range(2):
        assert (
            run_cli(
                'footsteps', '--model', str(short), '--seeds', '5', '--duration', '3.5', '--out', str(tmp_path / 'out')
            )
            == 0
        )
    runs = sorted((tmp_path / 'out' / 'footsteps').iterdir())
    meta = json.loads((runs[0] / '5.json').read_text())
    assert meta['params']['max_duration'] == 2.5 and meta['params']['extend_stride'] == 1.25
    wavs = [read(run / '5.wav') for run in runs]
    assert wavs[0].shape == (1, 56000) and torch.equal(wavs[0], wavs[1])


def test_formats(tmp_path, tiny_package):
    for fmt in ('flac', 'mp3'):
        assert (
            run_cli(
                'a bell',
                '--model',
                str(tiny_package),
                '--seeds',
                '0',
                '--duration',
                '1',
                '--format',
                fmt,
                '--out',
                str(tmp_path),
            )
            == 0
        )
    files = sorted(p.name for p in (tmp_path / 'a_bell').rglob('0.*'))
    assert files == ['0.flac', '0.json', '0.json', '0.mp3']
    assert read(next((tmp_path / 'a_bell').rglob('0.flac'))).shape == (1, 16000)


@pytest.mark.parametrize(
    'args, message',
    [
        ([], 'No prompt given'),
        (['dog', '   '], 'Prompt 2 of 2 is empty'),
        (['dog', '--duration', '0'], '--duration must be a positive'),
        (['dog', '--duration', '-1'], '--duration must be a positive'),
        (['dog', '--batch_size', '0'], '--batch_size must be >= 1'),
        (['dog', '--max-batch', '0'], '--max-batch must be >= 1'),
        (['dog', '--top_p', '1.5'], '--top_p must be within'),
        (['dog', '--model', 'not a model!'], "Unknown model 'not a model!'"),
        (['dog', '--model', 'nobody/no-such-audiogen'], 'HF_HUB_OFFLINE=1'),
        (['dog', '--model', 'c0ffee00'], 'No XP with signature c0ffee00'),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(tmp_path / 'outputs'))
    out = tmp_path / 'out'
    assert run_cli(*args, '--out', str(out)) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err
    assert not out.exists()


def test_weights_apply_to_xps_only(tmp_path, tiny_package, capsys):
    assert run_cli('dog', '--model', str(tiny_package), '--weights', 'ema', '--out', str(tmp_path / 'out')) == 2
    assert '--weights ema applies to training XPs' in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_cli_subprocess_rejects_an_empty_prompt(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'scripts.generate', '  ', '--out', str(tmp_path / 'out')],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert 'Prompt 1 of 1 is empty' in proc.stderr and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'out').exists()


def test_fake_xp_weights_are_recorded(tmp_path, tiny_package, monkeypatch):
    from helpers import make_fake_xp

    make_fake_xp(tmp_path / 'outputs', tiny_package, sig='abcdef12')
    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(tmp_path / 'outputs'))
    clips = {}
    for weights in ('best', 'ema'):
        out = tmp_path / weights
        assert (
            run_cli(
                'dog',
                '--model',
                'abcdef12',
                '--weights',
                weights,
                '--seeds',
                '0',
                '--duration',
                '0.5',
                '--out',
                str(out),
            )
            == 0
        )
        folder = run_folder(out, 'dog')
        meta = json.loads((folder / '0.json').read_text())
        assert meta['model_kind'] == 'xp' and meta['xp_sig'] == 'abcdef12' and meta['weights'] == weights
        assert meta['xp_epoch'] == 2 and meta['pretrained'] == str(tiny_package)
        assert '--model abcdef12 --weights ' + weights in meta['reproduce']
        clips[weights] = read(folder / '0.wav')
    assert not torch.equal(clips['best'], clips['ema'])


@pytest.mark.slow
def test_generate_from_a_trained_xp_signature(trained_xp, tmp_path):
    """`generate.py --model <sig>` on the XP that `dora run` trained, as a user runs it (a subprocess)."""
    sig = trained_xp['folder'].name
    out = tmp_path / 'out'
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'scripts.generate',
            'a dog barking',
            '--model',
            sig,
            '--batch_size',
            '2',
            '--duration',
            '1',
            '--out',
            str(out),
            '--no-progress',
        ],
        cwd=ROOT,
        env=subprocess_env(trained_xp['outputs']),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = run_folder(out, 'a dog barking')
    assert sorted(p.name for p in folder.iterdir()) == ['0.json', '0.wav', '1.json', '1.wav']
    meta = json.loads((folder / '1.json').read_text())
    assert meta['model_kind'] == 'xp' and meta['xp_sig'] == sig and meta['weights'] == 'best'
    assert meta['xp_epoch'] == 2 and math.isfinite(meta['lufs']) and abs(meta['lufs'] + 14) <= 1


def test_progress_in_a_log_is_one_line_per_batch(tmp_path, tiny_package, capsys):
    """stderr that isn't a terminal (a SLURM log, a pipe) gets one line per batch, never a bar's carriage returns."""
    assert (
        generate_cli.main(
            [
                'dog',
                '--model',
                str(tiny_package),
                '--seeds',
                '0',
                '1',
                '2',
                '--duration',
                '0.5',
                '--max-batch',
                '2',
                '--device',
                'cpu',
                '--out',
                str(tmp_path / 'out'),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert '\r' not in err
    lines = [line for line in err.splitlines() if line.startswith('generating: ')]
    assert [line.split(' in ')[0] for line in lines] == [
        'generating: batch 1/2 (2 clips)',
        'generating: batch 2/2 (1 clip)',
    ], err


def test_a_model_load_reads_each_package_file_once(tiny_package, monkeypatch):
    """Config and weights come from one read of state_dict.bin, the codec from one of compression_state_dict.bin."""
    reads: list[str] = []
    original = package.load_file

    def counting(pkg: str, filename: str) -> dict:
        reads.append(filename)
        return original(pkg, filename)

    monkeypatch.setattr(package, 'load_file', counting)
    generation.load_model(generation.resolve_model(str(tiny_package)), 'cpu')
    assert sorted(reads) == sorted([package.LM_FILE, package.COMPRESSION_FILE])
