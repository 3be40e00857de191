"""Evaluation (solvers/evaluation/{evaluate,listening}.py, scripts/evaluate.py): the solver's evaluate stage on a
tiny model, best-by-metric, the report CLI as a subprocess, and its listening page in headless Chromium."""

from __future__ import annotations

import html.parser
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, subprocess_env

from solvers import project
from solvers.evaluation import evaluate as evaluation
from solvers.evaluation import listening, metrics


@pytest.fixture(scope='session')
def tiny_clap(tmp_path_factory) -> Path:
    """A random few-thousand-parameter CLAP model + processor in a temporary folder (no download)."""
    return metrics.build_tiny_clap(tmp_path_factory.mktemp('clap') / 'tiny_clap', seed=0)


def eval_overrides(tiny_clap: Path) -> list[str]:
    """A small evaluation: 2 valid captions x 2 seeds of 1 s, every score on (PaSST KL skips itself here)."""
    return [
        f'evaluate.clap.model={tiny_clap}',
        'evaluate.num_prompts=2',
        'evaluate.seeds=[0,1]',
        'evaluate.duration=1.0',
        'evaluate.metrics.fad=true',
        'evaluate.metrics.kld=true',
    ]


class Tags(html.parser.HTMLParser):
    """Counts start tags and collects the text of the metric table."""

    def __init__(self):
        super().__init__()
        self.count: dict[str, int] = {}
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.count[tag] = self.count.get(tag, 0) + 1
        self.sources += [value for key, value in attrs if key == 'src']


def parse(text: str) -> Tags:
    tags = Tags()
    tags.feed(text)
    return tags


# ---------------------------------------------------------------------------------------------------- settings
def test_settings_come_from_the_evaluate_block():
    cfg = project.compose(['solver=audiogen/train'])  # the base evaluate block (the CPU presets turn CLAP off)
    settings = evaluation.EvalSettings.from_config(cfg)
    assert settings.seeds == (0, 1) and settings.num_prompts == 8
    assert settings.duration == cfg.generate.duration  # evaluate.duration: null
    assert settings.metrics == {'clap', 'kad', 'codec'} and settings.clap_model == metrics.DEFAULT_CLAP
    cfg.evaluate.metrics.fad = True
    cfg.evaluate.clap.model = None
    settings = evaluation.EvalSettings.from_config(cfg)
    assert 'fad' in settings.metrics and settings.clap_model is None


@pytest.mark.parametrize(
    'key, value, expected',
    [
        ('metrics.base', True, 'evaluate.metrics.base=true is not supported'),
        ('metrics.text_consistency', True, 'use evaluate.metrics.clap'),
        ('seeds', [1, 1], 'evaluate.seeds=[1, 1]: give a list of distinct non-negative integers'),
        ('num_prompts', 0, 'evaluate.num_prompts=0: give an integer >= 1'),
        ('duration', -1.0, 'must be a positive number of seconds'),
    ],
)
def test_bad_evaluate_keys_are_one_sentence(key, value, expected):
    from omegaconf import OmegaConf

    cfg = project.compose(['solver=audiogen/demo'])
    OmegaConf.update(cfg, f'evaluate.{key}', value)
    with pytest.raises(metrics.MetricsError) as err:
        evaluation.EvalSettings.from_config(cfg)
    assert expected in str(err.value) and '\n' not in str(err.value)


def test_check_models_fails_before_training_on_an_uncached_clap():
    cfg = project.compose(['solver=audiogen/demo'])
    cfg.evaluate.clap.model = 'laion/a-clap-nobody-cached'
    with pytest.raises(metrics.MetricsError, match='laion/a-clap-nobody-cached is not in the Hugging Face cache'):
        evaluation.check_models(cfg)


# ---------------------------------------------------------------------------------------------------- best state
HISTORY = [
    {'valid': {'ce': 2.0}},
    {'valid': {'ce': 1.5}, 'evaluate': {'clap': 0.20, 'kad': 9.0}},
    {'valid': {'ce': 1.2}},
    {'valid': {'ce': 1.1}, 'evaluate': {'clap': 0.35, 'kad': 4.0}},
    {'valid': {'ce': 1.0}, 'evaluate': {'clap': 0.30, 'kad': 3.0}},
]


def test_best_epoch_follows_each_metrics_direction():
    assert evaluation.best_epoch(HISTORY, 'valid/ce') == 5
    assert evaluation.best_epoch(HISTORY, 'evaluate/clap') == 4  # higher is better
    assert evaluation.best_epoch(HISTORY, 'evaluate/kad') == 5  # lower is better
    assert evaluation.best_epoch(HISTORY, 'evaluate/fad') is None  # never computed
    assert evaluation.metric_mode('evaluate/codec_pesq') == 'max' and evaluation.metric_mode('valid/ce') == 'min'
    with pytest.raises(metrics.MetricsError, match='needs its stage'):
        evaluation.metric_mode('clap')


def test_new_best_only_on_an_epoch_that_beats_the_past():
    by_clap = [evaluation.is_new_best(HISTORY[:i], HISTORY[i], 'evaluate/clap') for i in range(len(HISTORY))]
    assert by_clap == [False, True, False, True, False]  # epochs without an evaluation keep the best where it was
    by_ce = [evaluation.is_new_best(HISTORY[:i], HISTORY[i], 'valid/ce') for i in range(len(HISTORY))]
    assert by_ce == [True] * 5


# ---------------------------------------------------------------------------------------------------- the stage
def test_evaluate_stage_on_the_tiny_model(in_xp, demo_overrides, tiny_clap, caplog):
    solver = in_xp(demo_overrides + eval_overrides(tiny_clap))
    solver.restore()
    solver.model.train()
    with torch.no_grad():
        first = evaluation.evaluate_stage(solver)
        loads = metrics.get_clap.cache_info().misses
        second = evaluation.evaluate_stage(solver)
    assert solver.model.training, 'the stage gives the model back in the mode it found it'
    assert set(first) == {'clap', 'clap_real', 'kad', 'fad', 'codec_pesq', 'codec_stoi', 'codec_sisdr', 'codec_mel'}
    assert all(isinstance(v, float) and math.isfinite(v) for v in first.values())
    assert -1 <= first['clap'] <= 1 and -1 <= first['clap_real'] <= 1 and first['fad'] >= 0
    assert second == first, 'fixed seeds and unchanged weights give the same scores'
    assert metrics.get_clap.cache_info().misses == loads, 'CLAP loads once per process'
    if metrics.passt_unavailable() is not None:  # the KL is asked for: skipped with its one-line reason, no crash
        assert 'kld' not in first and 'PaSST KL skipped' in caplog.text
    # The evaluation never enters the checkpoint.
    assert not any('clap' in key or 'evaluat' in key for key in solver.state_dict())


@pytest.mark.slow
def test_training_logs_evaluation_to_history_and_tensorboard(in_xp, demo_overrides, tiny_clap):
    """In-process (the solver's run inside its XP, as `dora run` runs it; tests/test_train_e2e.py runs `dora run`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from solvers.training import curves

    solver = in_xp(demo_overrides + eval_overrides(tiny_clap) + ['evaluate.every=1'])
    solver.run()
    curves.installed(solver.result_logger).writer.flush()  # a `dora run` flushes it as its process ends
    folder = solver.folder
    history = json.loads((folder / 'history.json').read_text())
    assert len(history) == 2
    for epoch in history:
        scores = epoch['evaluate']
        for key in ('clap', 'clap_real', 'kad', 'fad', 'codec_pesq', 'codec_stoi', 'codec_sisdr', 'codec_mel'):
            assert math.isfinite(scores[key]), (key, scores)
    acc = EventAccumulator(str(folder / 'tensorboard'), size_guidance={'scalars': 0})
    acc.Reload()
    for tag in ('quality/clap', 'quality/kad', 'quality/codec_pesq'):
        assert [e.step for e in acc.Scalars(tag)] == [4, 8], tag  # per epoch, on the update axis


# ---------------------------------------------------------------------------------------------------- listening page
def test_spectrogram_is_an_image_of_the_clip():
    import numpy as np

    t = torch.arange(16000) / 16000
    chirp = torch.sin(2 * math.pi * (200 + 3000 * t) * t)[None] * 0.5
    image = np.asarray(listening.spectrogram_image(chirp, 16000))
    assert image.shape == (120, 320, 3) and image.std() > 10
    silent = np.asarray(listening.spectrogram_image(torch.zeros(1, 8000), 16000))
    assert (silent == silent[0, 0]).all() and silent[0, 0].sum() < 30  # nothing to show: uniformly dark


def test_page_has_one_player_per_clip_and_escapes_prompts():
    report = {
        'created': 'now',
        'prompts': ['a <b>dog</b> & cat'],
        'seeds': [0, 1],
        'params': {'duration': 1.0},
        'clap_model': 'tiny',
        'dataset': 'egs/x/valid',
        'skipped': {'kld': 'PaSST KL skipped: not installed.'},
        'models': [
            {'label': 'base', 'metrics': {'clap': 0.1, 'kad': 2.0}, 'n_clips': 2, 'folder': 'clips/01'},
            {'label': 'tuned', 'metrics': {'clap': 0.3, 'kad': 1.0}, 'n_clips': 2, 'folder': 'clips/02'},
        ],
        'clips': [
            {
                'model': m,
                'prompt': 'a <b>dog</b> & cat',
                'seed': s,
                'file': f'clips/0{m}/{s}.wav',
                'spectrogram': f'clips/0{m}/{s}.png',
                'clap': 0.2,
            }
            for m in (0, 1)
            for s in (0, 1)
        ],
        'real': {
            'metrics': {'clap_real': 0.4, 'n_real': 3},
            'clips': [{'prompt': 'a <b>dog</b> & cat', 'file': 'real/a.wav', 'spectrogram': 'real/a.png', 'clap': 0.4}],
        },
    }
    text = listening.page(report)
    tags = parse(text)
    assert tags.count['audio'] == 5 and tags.count['img'] == 5 and tags.count['table'] == 2
    assert '<b>' not in text and 'a &lt;b&gt;dog&lt;/b&gt; &amp; cat' in text
    assert '<td class=best>0.300</td>' in text and '<td class=best>1.000</td>' in text  # CLAP up, KAD down
    summary = listening.markdown(report)
    assert '| model | CLAP ↑ | KAD ↓ | clips |' in summary and '| tuned | **0.300** | **1.000** | 2 |' in summary
    assert 'PaSST KL skipped: not installed.' in summary


# ---------------------------------------------------------------------------------------------------- the CLI
def run_cli(args: list[str], outputs: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'scripts.evaluate', *args],
        cwd=ROOT,
        env=subprocess_env(outputs),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope='module')
def report_folder(tmp_path_factory, tiny_package, tiny_dataset, tiny_clap) -> Path:
    """One `scripts/evaluate.py` run comparing two tiny packages on the tiny dataset's valid split."""
    from solvers.demo.tiny import build_tiny_package

    base = tmp_path_factory.mktemp('evaluate')
    other = build_tiny_package(base / 'other', seed=1)
    proc = run_cli(
        [
            str(tiny_package),
            str(other),
            '--dataset',
            str(tiny_dataset['valid']),
            '--num-prompts',
            '2',
            '--batch_size',
            '2',
            '--duration',
            '1',
            '--clap-model',
            str(tiny_clap),
            '--device',
            'cpu',
            '--out',
            str(base / 'evaluations'),
            '--no-progress',
        ],
        base / 'outputs',
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'Listening page:' in proc.stdout and '| model | CLAP ↑ | KAD ↓ | FAD ↓ |' in proc.stdout
    folders = list((base / 'evaluations').iterdir())
    assert len(folders) == 1
    return folders[0]


@pytest.mark.slow
def test_report_holds_every_clip_and_score(report_folder, tiny_package):
    report = json.loads((report_folder / 'report.json').read_text())
    assert [m['kind'] for m in report['models']] == ['package', 'package']
    assert len(report['prompts']) == 2 and report['seeds'] == [0, 1]
    assert len(report['clips']) == 2 * 2 * 2
    for clip in report['clips']:
        assert (report_folder / clip['file']).is_file() and (report_folder / clip['spectrogram']).is_file()
        assert -1 <= clip['clap'] <= 1
    for model in report['models']:
        assert {'clap', 'kad', 'fad', 'codec_pesq', 'codec_stoi', 'codec_sisdr', 'codec_mel'} <= set(model['metrics'])
    assert len(report['real']['clips']) == 2 and -1 <= report['real']['metrics']['clap_real'] <= 1
    assert 'kld' not in report['models'][0]['metrics']  # not asked for
    assert (report_folder / 'summary.md').read_text().startswith('# Evaluation report')
    tags = parse((report_folder / 'index.html').read_text())
    assert tags.count['audio'] == 8 + 2
    assert all((report_folder / src).is_file() for src in tags.sources)


@pytest.mark.slow
def test_report_clips_are_what_generate_writes(report_folder, tiny_package, tmp_path):
    """The report's clip of (prompt, seed) is bit-identical to scripts/generate.py's file for that seed."""
    import soundfile

    report = json.loads((report_folder / 'report.json').read_text())
    clip = report['clips'][1]
    sidecar = json.loads((report_folder / clip['sidecar']).read_text())
    assert sidecar['reproduce'].startswith('audiogen-generate ')
    out = tmp_path / 'generate'
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'scripts.generate',
            clip['prompt'],
            '--model',
            str(tiny_package),
            '--seeds',
            str(clip['seed']),
            '--duration',
            '1',
            '--device',
            'cpu',
            '--out',
            str(out),
            '--no-progress',
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    regenerated = next(out.rglob(f'{clip["seed"]}.wav'))
    ours, _ = soundfile.read(report_folder / clip['file'], dtype='int16')
    theirs, _ = soundfile.read(regenerated, dtype='int16')
    assert (ours == theirs).all()


def chromium() -> str | None:
    return shutil.which('chromium') or shutil.which('chromium-browser')


@pytest.mark.slow
@pytest.mark.skipif(
    chromium() is None and os.environ.get('AUDIOGEN_REQUIRE_CHROMIUM') != '1',
    reason='headless Chromium is not installed (apt-get install chromium; .ci/run does)',
)
def test_listening_page_renders_in_headless_chromium(report_folder, tmp_path_factory):
    """The page opens in a real browser: one <audio> per clip in the rendered DOM, and a screenshot that shows the
    metric table (kept as a test artifact in pytest's temporary folder, never in git)."""
    import numpy as np
    from PIL import Image

    assert chromium() is not None, 'AUDIOGEN_REQUIRE_CHROMIUM=1 but no chromium binary is on PATH'
    artifacts = tmp_path_factory.mktemp('listening_page')
    screenshot = artifacts / 'index.png'
    flags = [
        chromium(),
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        f'--user-data-dir={artifacts / "profile"}',
        '--window-size=1400,1000',
    ]
    url = (report_folder / 'index.html').as_uri()
    dom = subprocess.run([*flags, '--dump-dom', url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    tags = parse(dom.stdout)
    report = json.loads((report_folder / 'report.json').read_text())
    assert tags.count.get('audio') == len(report['clips']) + len(report['real']['clips'])
    assert 'id="metrics"' in dom.stdout and 'KAD ↓' in dom.stdout
    shot = subprocess.run([*flags, f'--screenshot={screenshot}', url], capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    image = np.asarray(Image.open(screenshot).convert('RGB')).astype(int)
    assert image.shape[:2] == (1000, 1400) and image.std() > 20, 'a blank screenshot'
    header = (image[:300] == (0xDB, 0xE9, 0xF7)).all(-1)  # the metric table's header colour, near the top
    assert header.sum() > 2000, f"no metric table in the screenshot's top 300 px (kept at {screenshot})"
    print(f'screenshot: {screenshot}')


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_and_exit_2(capsys, tiny_package, tmp_path):
    from scripts import evaluate

    cases = [
        (['no-such-model', '--prompt', 'x'], "Unknown model 'no-such-model'"),
        ([str(tiny_package)], 'No prompt: pass --dataset NAME'),
        ([str(tiny_package), '--dataset', 'nosuchset'], 'Unknown preset dataset=nosuchset'),
        ([str(tiny_package), '--prompt', 'x', '--duration', '0'], '--duration must be a positive number'),
        (
            [str(tiny_package), '--prompt', 'x', '--clap-model', 'laion/uncached-clap', '--out', str(tmp_path)],
            'The evaluation model laion/uncached-clap is not in the Hugging Face cache',
        ),
    ]
    for argv, expected in cases:
        assert evaluate.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith('audiogen-evaluate: error: ') and expected in err and '\n' not in err, (argv, err)
    assert not any(tmp_path.iterdir()), 'nothing is written when the CLAP model is missing'


@pytest.mark.parametrize('clap, new_best', [(0.4, False), (0.6, True)])
def test_best_state_follows_the_configured_metric(in_xp, demo_overrides, tiny_clap, clap, new_best):
    """checkpoint.best_metric=evaluate/clap: an epoch is the new best only when its CLAP beats the past, whatever
    its valid ce; the best state then holds this epoch's weights."""
    solver = in_xp(
        demo_overrides + eval_overrides(tiny_clap) + ['checkpoint.best_metric=evaluate/clap', 'evaluate.every=1']
    )
    solver.restore()
    with torch.no_grad():
        for param in solver.model.parameters():
            param.add_(0.01)  # this epoch's weights differ from the best state's
    solver.history.append({'valid': {'ce': 9.0}, 'evaluate': {'clap': 0.5}})
    solver.run_stage('valid', lambda: {'ce': 1.0})  # this epoch's stages, as flashy records them
    solver.run_stage('evaluate', lambda: {'clap': clap})
    assert solver.update_best_state() is new_best
    best = solver.best_state.state_dict()['model']
    current = solver.model.state_dict()
    assert all(torch.equal(best[k], current[k]) for k in current) is new_best


def test_a_best_metric_that_is_never_computed_is_refused(in_xp, demo_overrides):
    from solvers.errors import AudiogenError

    with pytest.raises(AudiogenError, match='needs an evaluation every few epochs'):
        in_xp(demo_overrides + ['checkpoint.best_metric=evaluate/clap', 'evaluate.clap.model=tiny'])
    with pytest.raises(AudiogenError, match='evaluate/codec_pesq is not computed'):
        in_xp(demo_overrides + ['checkpoint.best_metric=evaluate/codec_pesq', 'evaluate.every=1'])


@pytest.mark.slow
def test_the_evaluate_stages_clip_is_the_clis_clip(in_xp, demo_overrides, tmp_path, monkeypatch):
    """One generation path: for one tiny XP and one seed, the clip the evaluate stage scores is bit for bit the file
    `python -m scripts.generate <caption> --model <sig>` writes with training's sampling settings."""
    import soundfile

    from solvers.generation import audio_io

    replaced = ('dataset.segment_duration', 'optim.epochs', 'optim.updates_per_epoch', 'schedule.cosine.warmup')
    overrides = [o for o in demo_overrides if not o.startswith(replaced)] + [
        'dataset.segment_duration=2.5',  # the CLI needs a window longer than audiocraft's 2 s sliding stride
        'optim.epochs=1',
        'optim.updates_per_epoch=1',
        'schedule.cosine.warmup=0',
        'generate.prompts=[]',
        'evaluate.num_prompts=1',
        'evaluate.seeds=[3]',
        'evaluate.duration=1.0',
        'evaluate.clap.model=null',  # no CLAP: the stage still generates and scores (codec) its clips
    ]
    scored: list = []
    score = evaluation.Judge.score

    def spy(judge, prompts, wavs, sample_rate, partners=None):
        scored.extend(zip(prompts, wavs))
        return score(judge, prompts, wavs, sample_rate, partners)

    monkeypatch.setattr(evaluation.Judge, 'score', spy)
    solver = in_xp(overrides)
    solver.run()  # one epoch: its evaluate stage scores the EMA weights that became the best state
    assert len(scored) == 1
    prompt, stage_clip = scored[0]
    lm, coef = solver.cfg.generate.lm, solver.cfg.classifier_free_guidance.inference_coef
    sampling = ['--top_k', str(lm.top_k), '--top_p', str(lm.top_p), '--temperature', str(lm.temp)]
    out = tmp_path / 'cli'
    proc = subprocess.run(
        [sys.executable, '-m', 'scripts.generate', prompt, '--model', solver.xp.sig, '--seeds', '3']
        + ['--duration', '1', '--cfg_coef', str(coef), *sampling, '--device', 'cpu', '--out', str(out)]
        + ['--no-progress'],
        cwd=ROOT,
        env=subprocess_env(),  # AUDIOGEN_OUTPUTS: in_xp's outputs, where the XP is
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli_file = next(out.rglob('3.wav'))
    assert json.loads(cli_file.with_suffix('.json').read_text())['decoder'] == 'fast'
    stage_file = audio_io.write_audio(tmp_path / 'stage.wav', stage_clip, solver.compression_model.sample_rate)
    ours, _ = soundfile.read(stage_file, dtype='int16')
    theirs, _ = soundfile.read(cli_file, dtype='int16')
    assert ours.shape == theirs.shape and (ours == theirs).all()
