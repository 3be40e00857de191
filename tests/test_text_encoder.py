"""The T5 text-conditioning path offline: a tiny random T5 in a Hugging Face cache built here, and the two ways an
offline cache fails (model absent; tokenizer files absent) explained in one line by training and generation."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, subprocess_env

from solvers.models import lm

T5_NAME = 't5-small'  # a name audiocraft's T5Conditioner accepts; the weights are a tiny random stand-in
WORDS = (
    'a dog barking in the distance heavy rain on tin roof car engine starting footsteps wooden floor bell '
    'ringing siren wailing short electronic blip mouse click notification chime dull thud error buzzer'
).split()


def build_hf_cache(home: Path, name: str = T5_NAME) -> Path:
    """A tiny random T5 encoder and a SentencePiece tokenizer trained here, in HF's cache layout under ``home``."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    work = home / 'work'
    work.mkdir(parents=True)
    rng = random.Random(0)
    (work / 'corpus.txt').write_text('\n'.join(' '.join(rng.choice(WORDS) for _ in range(8)) for _ in range(400)))
    spm.SentencePieceTrainer.train(
        input=str(work / 'corpus.txt'),
        model_prefix=str(work / 'spiece'),
        vocab_size=64,
        model_type='unigram',
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(work / 'spiece.model'))
    # transformers 5's T5Tokenizer takes the pieces and scores (a `vocab_file` argument is silently ignored).
    tokenizer = T5Tokenizer(
        vocab=[(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], extra_ids=0
    )
    config = T5Config(vocab_size=len(tokenizer), d_model=512, d_kv=16, d_ff=64, num_layers=1, num_heads=2)
    repo = home / 'hub' / f'models--{name.replace("/", "--")}'
    snapshot = repo / 'snapshots' / ('0' * 40)
    T5EncoderModel(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text('0' * 40)
    shutil.rmtree(work)
    return snapshot


@pytest.fixture(scope='module')
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp('hf_home')
    build_hf_cache(home)
    return home


@pytest.fixture(scope='module')
def t5_package(tmp_path_factory, hf_home) -> Path:
    """A tiny package whose text conditioner is T5 (the conditioner type of facebook/audiogen-medium)."""
    out = tmp_path_factory.mktemp('t5_package') / 'pkg'
    code = (
        'import sys; from solvers.demo.tiny import build_tiny_package; build_tiny_package(sys.argv[1], overrides=('
        f"'conditioners.description.model=t5', 'conditioners.description.t5.name={T5_NAME}'))"
    )
    env = dict(subprocess_env(), HF_HOME=str(hf_home))
    proc = subprocess.run(
        [sys.executable, '-c', code, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_t5_conditioned_package_loads_from_the_offline_cache(t5_package, hf_home):
    # A subprocess: huggingface_hub reads HF_HOME once, at import.
    code = (
        'import sys; from audiocraft.modules.conditioners import T5Conditioner; '
        'from solvers.models import lm, package; '
        'model = lm.build_lm_model(package.lm_config(sys.argv[1])); '
        "c = model.condition_provider.conditioners['description']; assert isinstance(c, T5Conditioner); "
        'ids = c.t5_tokenizer(lm.PROBE_TEXT, add_special_tokens=False).input_ids; '
        'assert c.t5_tokenizer.unk_token_id not in ids, ids; print(c.name)'
    )
    env = dict(subprocess_env(), HF_HOME=str(hf_home))
    proc = subprocess.run(
        [sys.executable, '-c', code, str(t5_package)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == T5_NAME, proc.stderr[-3000:]


def _generate(package_dir: Path, home: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(subprocess_env(), HF_HOME=str(home))
    return subprocess.run(
        [
            sys.executable,
            '-m',
            'scripts.generate',
            'a dog barking',
            '--model',
            str(package_dir),
            '--batch_size',
            '1',
            '--duration',
            '0.5',
            '--out',
            str(tmp_path / 'out'),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_an_uncached_t5_is_named_with_how_to_fetch_it(t5_package, tmp_path):
    proc = _generate(t5_package, tmp_path / 'empty_hf_home', tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f'The text encoder {T5_NAME}' in lines[0] and 'HF_HUB_OFFLINE=1' in lines[0]
    assert f"T5EncoderModel.from_pretrained('{T5_NAME}')" in lines[0]
    assert not (tmp_path / 'out').exists()


def test_a_cache_without_tokenizer_files_is_refused(t5_package, hf_home, tmp_path):
    broken = tmp_path / 'hf_home'
    shutil.copytree(hf_home, broken)
    for path in broken.rglob('tokenizer*'):
        path.unlink()  # weights cached, vocabulary lost: transformers would build an empty tokenizer
    proc = _generate(t5_package, broken, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'maps ordinary words to <unk>' in lines[0], proc.stderr[-3000:]


def test_a_t5_config_needs_no_hub_to_be_recognised():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {'conditioners': {'description': {'model': 't5', 't5': {'name': 't5-large'}}, 'other': {'model': 'lut'}}}
    )
    assert lm.t5_names(cfg) == ['t5-large']
    assert lm.fetch_hint('t5-large').count("from_pretrained('t5-large')") == 2
