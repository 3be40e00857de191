"""Layer 2: the evaluation metrics (solvers/evaluation/metrics.py) on a tiny random CLAP built offline and on synthetic
audio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from solvers.evaluation import metrics

SR = 16000


@pytest.fixture(scope='session')
def tiny_clap(tmp_path_factory):
    """A random few-thousand-parameter CLAP model + processor saved to a temporary folder (no download)."""
    return metrics.build_tiny_clap(tmp_path_factory.mktemp('clap') / 'tiny_clap', seed=0)


@pytest.fixture(scope='session')
def scorer(tiny_clap):
    return metrics.ClapScorer.load(str(tiny_clap), 'cpu', batch_size=2)


def speech_like(seconds: float = 3.0, seed: int = 0) -> torch.Tensor:
    """A voiced, syllable-rate modulated harmonic tone: enough like speech for PESQ's and STOI's voice detection."""
    t = torch.arange(int(seconds * SR)) / SR
    harmonics = sum(torch.sin(2 * math.pi * 140 * k * t) / k for k in range(1, 15))
    envelope = (0.5 * (1 - torch.cos(2 * math.pi * 3 * t))) ** 2
    return (0.1 * harmonics * envelope)[None]


def with_noise(wav: torch.Tensor, level: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return wav + level * torch.randn(wav.shape, generator=gen)


# ---------------------------------------------------------------------------------------------------- CLAP
def test_clap_scores_are_finite_cosines(scorer):
    t = torch.arange(2 * SR) / SR
    clips = [
        torch.sin(2 * math.pi * 440 * t)[None] * 0.3,
        with_noise(torch.zeros(1, 3 * SR), 0.1),
        speech_like(1.0),
        torch.zeros(1, 800),
    ]  # a tone, noise, a voice-like sound, 50 ms of silence
    scores = scorer.score(['a beep', 'static noise', 'a man talking', 'nothing'], clips, SR)
    assert scores.shape == (4,)
    assert torch.isfinite(scores).all() and (scores.abs() <= 1).all()
    text, audio = scorer.embed_text(['a beep']), scorer.embed_audio(clips[:1], SR)
    assert torch.allclose(text.norm(dim=-1), torch.ones(1)) and torch.allclose(audio.norm(dim=-1), torch.ones(1))
    assert float(scores[0]) == pytest.approx(float(metrics.clap_cosine(text, audio)[0]), abs=1e-6)


def test_clap_resamples_to_the_model_rate_and_is_deterministic(scorer):
    """A 16 kHz clip is resampled to the extractor's 48 kHz; a clip longer than the 10 s window is cut, not
    cropped at random (the extractor's rand_trunc would otherwise make scores vary between calls)."""
    import torchaudio.functional as AF

    assert scorer.sample_rate == 48000
    clip = speech_like(2.0)
    ours = scorer.embed_audio([clip], SR)
    upsampled = scorer.embed_audio([AF.resample(clip, SR, 48000)], 48000)
    assert torch.allclose(ours, upsampled, atol=1e-6)
    long = with_noise(speech_like(14.0), 0.05)
    assert torch.equal(scorer.embed_audio([long], SR), scorer.embed_audio([long], SR))


def test_tiny_clap_is_built_once_under_the_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(tmp_path / 'outputs'))
    folder = metrics.resolve_clap('tiny')
    assert folder == str(tmp_path / 'outputs' / 'pretrained' / 'tiny_clap')
    stamp = (tmp_path / 'outputs' / 'pretrained' / 'tiny_clap' / 'config.json').stat().st_mtime_ns
    assert metrics.resolve_clap('tiny') == folder
    assert (tmp_path / 'outputs' / 'pretrained' / 'tiny_clap' / 'config.json').stat().st_mtime_ns == stamp


def test_a_missing_clap_model_is_one_sentence_with_the_prefetch_command():
    with pytest.raises(metrics.MetricsError) as err:
        metrics.ClapScorer.load('laion/clap-that-is-not-cached', 'cpu')
    message = str(err.value)
    assert '\n' not in message
    assert 'laion/clap-that-is-not-cached' in message and 'HF_HUB_OFFLINE=1' in message
    assert "ClapModel.from_pretrained('laion/clap-that-is-not-cached')" in message


def test_offline_a_cached_config_without_weights_is_caught_early(tmp_path, monkeypatch):
    """check_cached_weights (run before training) finds a hub snapshot whose weights never arrived."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    snapshot = tmp_path / 'models--laion--half-fetched' / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / 'models--laion--half-fetched' / 'refs').mkdir()
    (tmp_path / 'models--laion--half-fetched' / 'refs' / 'main').write_text('0' * 40)
    (snapshot / 'config.json').write_text('{}')
    with pytest.raises(metrics.MetricsError, match='laion/half-fetched has no weights in the Hugging Face cache'):
        metrics.check_cached_weights('laion/half-fetched')
    (snapshot / 'model.safetensors').write_bytes(b'')
    metrics.check_cached_weights('laion/half-fetched')


def test_a_clap_folder_without_config_is_refused(tmp_path):
    with pytest.raises(metrics.MetricsError, match='has no config.json'):
        metrics.resolve_clap(str(tmp_path))
    with pytest.raises(metrics.MetricsError, match='neither a directory'):
        metrics.resolve_clap('no/such/dir/here')


# ---------------------------------------------------------------------------------------------------- FAD
def test_fad_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    x = np.random.default_rng(0).normal(size=(64, 8))
    assert metrics.frechet_distance(x, x) == pytest.approx(0, abs=1e-9)
    shifted = [metrics.frechet_distance(x, x + delta) for delta in (0.1, 0.5, 1.0)]
    assert shifted == pytest.approx([8 * d**2 for d in (0.1, 0.5, 1.0)])  # same covariance: |mean shift|^2
    assert shifted[0] < shifted[1] < shifted[2]


def test_fad_matches_the_closed_form_and_the_classic_sqrtm_formula():
    # Independent coordinates: FD = |mu_x - mu_y|^2 + sum_i (sigma_x,i - sigma_y,i)^2.
    x = np.array([[0, 0], [2, 0], [0, 2], [2, 2]], dtype=float)  # mean (1, 1), variances 4/3
    y = 2 * x + [5, 0]  # mean (7, 2), variances 16/3
    assert metrics.frechet_distance(x, y) == pytest.approx(36 + 1 + 2 * (4 / 3) * (1 - 2) ** 2)
    # Against pytorch-fid's formula (scipy.linalg.sqrtm of the covariance product) on correlated data.
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.3
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    classic = diff @ diff + np.trace(sa) + np.trace(sb) - 2 * np.trace(linalg.sqrtm(sa @ sb).real)
    assert metrics.frechet_distance(a, b) == pytest.approx(classic, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- KAD
def test_kad_matches_a_hand_computed_value():
    x = np.array([[0.0], [1.0]])
    y = np.array([[3.0], [5.0]])  # median pairwise distance of y: 2, so gamma = 1 / (2 * 2^2) = 1/8
    k_xx = math.exp(-1 / 8)  # |0 - 1|^2 = 1
    k_yy = math.exp(-4 / 8)  # |3 - 5|^2 = 4
    k_xy = (math.exp(-9 / 8) + math.exp(-25 / 8) + math.exp(-4 / 8) + math.exp(-16 / 8)) / 4
    expected = 100 * (k_xx + k_yy - 2 * k_xy)
    assert metrics.median_pairwise_distance(y) == pytest.approx(2.0)
    assert metrics.kernel_audio_distance(x, y) == pytest.approx(expected)
    assert metrics.kernel_audio_distance(x, y, bandwidth=2.0, scale=1.0) == pytest.approx(expected / 100)


def test_unbiased_mmd_matches_torchmetrics_kid_estimator():
    """torchmetrics' KID uses the same unbiased MMD^2 estimator (on equal-size sets)."""
    from torchmetrics.image.kid import maximum_mean_discrepancy

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 0.5
    kernel = lambda a, b: (a @ b.T / 4 + 1) ** 3  # noqa: E731  (KID's polynomial kernel)
    reference = float(
        maximum_mean_discrepancy(*(torch.from_numpy(k) for k in (kernel(x, x), kernel(x, y), kernel(y, y))))
    )
    assert metrics.mmd_unbiased(kernel(x, x), kernel(y, y), kernel(x, y)) == pytest.approx(reference)


def test_kad_is_near_zero_for_two_samples_of_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(40, 16))
    same = metrics.kernel_audio_distance(rng.normal(size=(40, 16)), ref)
    apart = [metrics.kernel_audio_distance(rng.normal(size=(40, 16)) + d, ref) for d in (0.3, 1.0)]
    assert abs(same) < apart[0] < apart[1]


def test_distances_refuse_sets_of_one_clip():
    with pytest.raises(ValueError, match='N >= 2'):
        metrics.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match='bandwidth is 0'):
        metrics.kernel_audio_distance(np.ones((3, 4)), np.ones((3, 4)))


# ---------------------------------------------------------------------------------------------------- codec
def test_pesq_stoi_sisdr_mel_are_at_their_best_for_identical_clips_and_drop_with_noise():
    clean = speech_like()
    light, heavy = with_noise(clean, 0.005), with_noise(clean, 0.05)
    pesq = [metrics.pesq_wb(clean, x) for x in (clean, light, heavy)]
    stoi = [metrics.stoi_score(clean, x) for x in (clean, light, heavy)]
    sdr = [metrics.si_sdr(clean, x) for x in (clean, light, heavy)]
    mel = [metrics.mel_distance(clean, x) for x in (clean, light, heavy)]
    assert pesq[0] == pytest.approx(4.64, abs=0.01) and pesq[0] > pesq[1] > pesq[2]
    assert stoi[0] == pytest.approx(1.0, abs=1e-6) and stoi[0] > stoi[1] > stoi[2]
    assert sdr[0] > 60 and sdr[0] > sdr[1] > sdr[2]
    assert mel[0] == 0 and mel[0] < mel[1] < mel[2]


def test_pesq_and_stoi_say_nan_when_they_cannot_measure():
    short = speech_like(0.1)
    assert math.isnan(metrics.pesq_wb(short, short))  # under PESQ's minimum length
    assert math.isnan(metrics.stoi_score(short, short))  # too few STFT frames
    assert math.isnan(metrics.pesq_wb(speech_like(), speech_like(), sample_rate=22050))  # wb PESQ is 16 kHz only


def test_codec_fidelity_of_the_tiny_codec(tiny_package):
    from solvers.models import package

    codec = package.load_compression_model(str(tiny_package))
    clips = [speech_like(1.5), with_noise(speech_like(2.0), 0.01)]
    rebuilt = metrics.reconstruct(codec, clips[0])
    assert rebuilt.shape == clips[0].shape
    scores = metrics.codec_fidelity(codec, clips, SR)
    assert set(scores) == set(metrics.CODEC_METRICS)
    assert all(math.isfinite(v) for v in scores.values())
    assert scores['codec_pesq'] < 4.0  # a random codec mangles the clip: far from the identical-clip 4.64


# ---------------------------------------------------------------------------------------------------- PaSST
def test_passt_kl_is_skipped_with_a_reason_without_its_package_or_weights(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec('hear21passt') is None:
        reason = metrics.passt_unavailable()
        assert reason is not None and 'hear21passt' in reason and '\n' not in reason
        with pytest.raises(metrics.MetricsError, match='hear21passt'):
            metrics.PasstKL('cpu')
    # With the package importable but no weights in torch hub's cache: the reason names the file and its URL.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, 'find_spec', lambda name, *a: object() if name == 'hear21passt' else real_find_spec(name, *a)
    )
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    reason = metrics.passt_unavailable()
    assert reason is not None and str(tmp_path / 'torch' / 'hub' / 'checkpoints' / metrics.PASST_WEIGHTS) in reason
    assert metrics.PASST_URL in reason and '\n' not in reason
