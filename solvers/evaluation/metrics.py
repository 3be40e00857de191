"""Evaluation metrics without TensorFlow or system binaries: CLAP score, FAD and KAD, codec fidelity, PaSST KL.

- Text-audio alignment: the CLAP score, cosine of a caption's and a clip's embeddings from a ``transformers``
  ``ClapModel`` (default ``laion/larger_clap_general``, a general-audio checkpoint; audiocraft's text consistency
  uses a music one). :class:`ClapScorer` takes an HF id, a local dir, or ``tiny`` (a random offline stand-in).
- Distribution distances between generated and real clips on the same CLAP audio embeddings:
  :func:`frechet_distance` (FAD) and :func:`kernel_audio_distance` (KAD: an unbiased MMD with a Gaussian kernel,
  meaningful on the small valid sets users have).
- Codec fidelity: PESQ (wide band), STOI, SI-SDR and a log-mel distance between clips and their reconstruction by
  the 16 kHz codec (:func:`codec_fidelity`), the ceiling on what fine-tuning the LM can reach.
- Optional KL divergence of PaSST label distributions, as audiocraft computes it (:class:`PasstKL`), only where
  ``hear21passt`` and its weights are on this machine (:func:`passt_unavailable` says why not, in one line).

Heavy imports (transformers, pesq, pystoi, hear21passt) happen inside the functions that need them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import typing as tp
from pathlib import Path

import numpy as np
import torch

from solvers.errors import AudiogenError

logger = logging.getLogger(__name__)

DEFAULT_CLAP = 'laion/larger_clap_general'
TINY_CLAP = 'tiny'  # a random CLAP built offline in <outputs>/pretrained/tiny_clap: runs the code, scores nothing
KAD_SCALE = 100.0  # kadtk's convention: KAD = 100 x MMD^2, so typical values read like FAD's
PASST_WEIGHTS = 'passt-s-f128-p16-s10-ap.476-swa.pt'  # the 10 s AudioSet PaSST that audiocraft's KL uses
PASST_URL = f'https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/{PASST_WEIGHTS}'


# Every score the evaluation logs (history['evaluate'], TensorBoard quality/<key>, report.json): True when higher
# is better. clap_real is the CLAP score of the real valid clips with their own captions: what a perfect model reaches.
HIGHER_IS_BETTER: dict[str, bool] = {
    'clap': True,
    'clap_real': True,
    'fad': False,
    'kad': False,
    'kld': False,
    'codec_pesq': True,
    'codec_stoi': True,
    'codec_sisdr': True,
    'codec_mel': False,
}


class MetricsError(AudiogenError, RuntimeError):
    """An evaluation model or input is missing or unusable; the message names it and the fix."""


# ---------------------------------------------------------------------------------------------------- CLAP
def prefetch_command(model_id: str) -> str:
    """The command that puts a CLAP checkpoint into the Hugging Face cache (run it where there is internet)."""
    return (
        f'python -c "from transformers import ClapModel, ClapProcessor; '
        f"ClapModel.from_pretrained('{model_id}'); ClapProcessor.from_pretrained('{model_id}')\""
    )


def tiny_clap_dir() -> Path:
    """Where ``tiny`` lives: ``<outputs>/pretrained/tiny_clap``, beside the tiny stand-in LM package."""
    from solvers.models.package import local_packages_dir

    return local_packages_dir() / 'tiny_clap'


def resolve_clap(ref: str) -> str:
    """An existing local dir (absolute), ``tiny`` (built on first use), or an HF id, unchanged.

    Raises:
        MetricsError: a path that doesn't exist and doesn't read as an HF id.
    """
    from solvers.models.package import is_hub_id

    text = str(ref).strip()
    if text == TINY_CLAP:
        folder = tiny_clap_dir()
        if not (folder / 'config.json').is_file():
            build_tiny_clap(folder)
        return str(folder)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / 'config.json').is_file():
            raise MetricsError(
                f'CLAP model directory {path} has no config.json: pass a folder written by '
                'ClapModel.save_pretrained + ClapProcessor.save_pretrained, or an HF id.'
            )
        return str(path.resolve())
    if is_hub_id(text):
        return text
    raise MetricsError(
        f"CLAP model '{text}' is neither a directory (looked for {path.resolve()}) nor a Hugging Face "
        f'id: pass {DEFAULT_CLAP}, a local folder, or tiny (a random offline stand-in).'
    )


def load_pretrained(cls: tp.Any, ref: str) -> tp.Any:
    """``cls.from_pretrained(ref)`` with an uncached hub id explained in one sentence."""
    try:
        return cls.from_pretrained(ref)
    except OSError as err:
        if Path(ref).is_dir():
            raise MetricsError(f'Cannot load the CLAP model from {ref}: {str(err).splitlines()[0]}') from err
        offline = os.environ.get('HF_HUB_OFFLINE', 'unset')
        raise MetricsError(
            f"The evaluation model {ref} is not in the Hugging Face cache and the hub can't be reached "
            f'(HF_HUB_OFFLINE={offline}): pre-fetch it once on a machine with internet with `{prefetch_command(ref)}` '
            '(then copy ~/.cache/huggingface or $HF_HOME), or pass a local folder.'
        ) from err


def check_cached_weights(ref: str) -> None:
    """Offline (``HF_HUB_OFFLINE``), a hub id's weights must be in the cache: say so now rather than at the first
    evaluation, hours into a training run. A no-op for local dirs and online."""
    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE or os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES', 'TRUE')
    if Path(ref).is_dir() or not offline:
        return
    weights = ('model.safetensors', 'pytorch_model.bin')
    if not any(isinstance(try_to_load_from_cache(ref, name), str) for name in weights):
        raise MetricsError(
            f"The evaluation model {ref} has no weights in the Hugging Face cache and the hub can't be reached "
            f'(HF_HUB_OFFLINE={os.environ.get("HF_HUB_OFFLINE", "unset")}): pre-fetch it once on a machine with '
            f'internet with `{prefetch_command(ref)}` (then copy ~/.cache/huggingface or $HF_HOME), or pass a local '
            'folder.'
        )


def _features(output: tp.Any) -> torch.Tensor:
    """transformers 5 returns a model output whose ``pooler_output`` is the embedding; 4.x returns the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClapScorer:
    """CLAP text and audio embeddings, L2-normalised, and their cosine (the CLAP score).

    Args:
        model: a ``transformers.ClapModel`` in eval mode.
        processor: its ``ClapProcessor`` (feature extractor + tokenizer).
        device: where the model runs.
        name: the reference it was loaded from (recorded in reports).
        batch_size: clips or captions per forward pass.
    """

    def __init__(self, model: tp.Any, processor: tp.Any, device: str, name: str, batch_size: int = 16):
        self.model, self.processor, self.device, self.name = model, processor, device, name
        self.batch_size = max(1, int(batch_size))
        extractor = processor.feature_extractor
        self.sample_rate = int(extractor.sampling_rate)
        # The extractor crops longer audio at random (rand_trunc, fusion): we cut to its window first, so a clip's
        # embedding is a function of the clip.
        self.max_samples = int(extractor.nb_max_samples)

    @classmethod
    def load(cls, ref: str, device: str = 'cpu', batch_size: int = 16) -> ClapScorer:
        """Load a CLAP model and processor from an HF id, a local dir or ``tiny`` (see :func:`resolve_clap`)."""
        from transformers import ClapModel, ClapProcessor

        resolved = resolve_clap(ref)
        processor = load_pretrained(ClapProcessor, resolved)
        model = load_pretrained(ClapModel, resolved).to(device).eval()
        return cls(model, processor, device, str(ref), batch_size)

    @torch.inference_mode()
    def embed_text(self, texts: tp.Sequence[str]) -> torch.Tensor:
        """[N, D] float32 CPU embeddings of captions, unit norm."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.processor.tokenizer(
                list(texts[i : i + self.batch_size]), padding=True, truncation=True, return_tensors='pt'
            ).to(self.device)
            out.append(_features(self.model.get_text_features(**tokens)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1) if out else torch.empty(0, 0)

    @torch.inference_mode()
    def embed_audio(self, wavs: tp.Sequence[torch.Tensor], sample_rate: int) -> torch.Tensor:
        """[N, D] float32 CPU embeddings of clips ([C, T] or [T] at ``sample_rate``), unit norm.

        Each clip is downmixed, resampled to the model's rate and cut to its window.
        """
        import torchaudio.functional as AF

        arrays = []
        for wav in wavs:
            mono = wav.detach().float().cpu().reshape(-1, wav.shape[-1]).mean(0)
            if sample_rate != self.sample_rate:
                mono = AF.resample(mono, sample_rate, self.sample_rate)
            arrays.append(mono[: self.max_samples].numpy())
        out = []
        for i in range(0, len(arrays), self.batch_size):
            inputs = self.processor.feature_extractor(
                arrays[i : i + self.batch_size], sampling_rate=self.sample_rate, return_tensors='pt'
            ).to(self.device)
            out.append(_features(self.model.get_audio_features(**inputs)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1) if out else torch.empty(0, 0)

    def score(self, texts: tp.Sequence[str], wavs: tp.Sequence[torch.Tensor], sample_rate: int) -> torch.Tensor:
        """[N] CLAP scores of clip ``i`` with caption ``i``, each in [-1, 1] (higher: the clip fits its caption)."""
        if len(texts) != len(wavs):
            raise ValueError(f'{len(texts)} captions for {len(wavs)} clips')
        return clap_cosine(self.embed_text(texts), self.embed_audio(wavs, sample_rate))


def clap_cosine(text_embeddings: torch.Tensor, audio_embeddings: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two [N, D] embedding matrices, clamped to [-1, 1] against rounding."""
    t = torch.nn.functional.normalize(text_embeddings.float(), dim=-1)
    a = torch.nn.functional.normalize(audio_embeddings.float(), dim=-1)
    return (t * a).sum(-1).clamp(-1.0, 1.0)


@functools.lru_cache(maxsize=2)
def get_clap(ref: str, device: str = 'cpu', batch_size: int = 16) -> ClapScorer:
    """:meth:`ClapScorer.load`, once per process for a given model and device (training evaluates every N epochs)."""
    return ClapScorer.load(ref, device, batch_size)


def build_tiny_clap(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised, few-thousand-parameter CLAP model and processor that load offline.

    The same classes and files as ``laion/larger_clap_general`` (HTSAT audio tower, RoBERTa text tower, a
    ClapFeatureExtractor at 48 kHz and a byte-level BPE tokenizer), so the real loading and scoring code runs on it.
    Its scores carry no meaning.

    Args:
        out_dir: destination folder (created).
        seed: torch seed of the weights.
    """
    from tokenizers import pre_tokenizers
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ['<pad>', '<unk>', '<s>', '</s>', '<mask>']
    # Byte-level BPE without merges: every byte is a token, so any caption tokenizes without a trained vocabulary.
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=128)
    text_config = dict(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=132,
        projection_dim=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # HTSAT needs its 256 x 256 spectrogram image and 64 mel bins; the tower itself is two one-block stages.
    audio_config = dict(
        hidden_size=16,
        depths=[1, 1],
        num_attention_heads=[1, 2],
        patch_embeds_hidden_size=8,
        projection_dim=16,
        enable_fusion=False,
        window_size=8,
        spec_size=256,
        num_mel_bins=64,
    )
    torch.manual_seed(seed)
    model = ClapModel(ClapConfig(text_config=text_config, audio_config=audio_config, projection_dim=16)).eval()
    processor = ClapProcessor(feature_extractor=ClapFeatureExtractor(truncation='rand_trunc'), tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------- distances
def _as_matrix(x: tp.Any, name: str, min_rows: int = 2) -> np.ndarray:
    array = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < min_rows:
        raise ValueError(f'{name} must be [N, D] embeddings with N >= {min_rows}, got shape {array.shape}')
    return array


def frechet_distance(x: tp.Any, y: tp.Any) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets [N, D] and [M, D] (FAD on audio embeddings).

    ``|mu_x - mu_y|^2 + tr(S_x) + tr(S_y) - 2 tr((S_x^1/2 S_y S_x^1/2)^1/2)``, in float64 through symmetric
    eigendecompositions (no complex ``sqrtm``). The estimate is biased upwards for small N: compare values computed
    on the same numbers of clips.
    """
    x, y = _as_matrix(x, 'x'), _as_matrix(y, 'y')
    if x.shape[1] != y.shape[1]:
        raise ValueError(f'embedding sizes differ: {x.shape[1]} and {y.shape[1]}')
    mu = x.mean(0) - y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    sx, sy = np.atleast_2d(sx), np.atleast_2d(sy)
    w, v = np.linalg.eigh(sx)
    root_x = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root_x @ sy @ root_x)
    value = float(mu @ mu + np.trace(sx) + np.trace(sy) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())
    return max(value, 0.0)


def median_pairwise_distance(x: tp.Any) -> float:
    """Median Euclidean distance between distinct rows of [N, D] (the Gaussian kernel's bandwidth heuristic)."""
    x = _as_matrix(x, 'x')
    sq = (x * x).sum(1)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None)
    upper = d2[np.triu_indices(len(x), k=1)]
    return float(np.sqrt(np.median(upper)))


def mmd_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """Unbiased MMD^2 from kernel matrices: off-diagonal means of K_xx and K_yy, minus twice the mean of K_xy."""
    m, n = len(k_xx), len(k_yy)
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(xx + yy - 2 * k_xy.mean())


def kernel_audio_distance(x: tp.Any, y: tp.Any, bandwidth: float | None = None, scale: float = KAD_SCALE) -> float:
    """Kernel audio distance: ``scale`` x unbiased MMD^2 with ``k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2))``.

    Follows the KAD paper's toolkit (kadtk): the bandwidth defaults to the median pairwise distance of the
    reference set ``y``, and the result is scaled by 100. Unbiased, so two samples of one distribution score about 0
    (slightly negative values happen), whatever the number of clips: the small-sample alternative to FAD.

    Args:
        x: generated embeddings [N, D], N >= 2.
        y: reference embeddings [M, D], M >= 2.
        bandwidth: kernel width; None: median pairwise distance of ``y``.
        scale: multiplier of MMD^2.
    """
    x, y = _as_matrix(x, 'x'), _as_matrix(y, 'y')
    if bandwidth is None:
        bandwidth = median_pairwise_distance(y)
    if not bandwidth > 0:
        raise ValueError('the reference clips all have the same embedding: the kernel bandwidth is 0')
    gamma = 1.0 / (2.0 * bandwidth**2)

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return np.exp(-gamma * np.clip(d2, 0, None))

    return scale * mmd_unbiased(kernel(x, x), kernel(y, y), kernel(x, y))


# ---------------------------------------------------------------------------------------------------- codec fidelity
def _mono(wav: torch.Tensor) -> np.ndarray:
    return wav.detach().float().cpu().reshape(-1, wav.shape[-1]).mean(0).numpy().astype(np.float64)


def pesq_wb(reference: torch.Tensor, degraded: torch.Tensor, sample_rate: int = 16000) -> float:
    """Wide-band PESQ (ITU-T P.862.2) of ``degraded`` against ``reference``, from about 1.0 to 4.64 (identical).

    PESQ models speech perception; on other sounds read it as a rough proxy. NaN when PESQ can't score the pair
    (silence, clips under a quarter second, or a sample rate other than 16 kHz).
    """
    from pesq import pesq

    if sample_rate != 16000:
        return float('nan')
    ref, deg = _mono(reference), _mono(degraded)
    n = min(len(ref), len(deg))
    try:
        return float(pesq(sample_rate, ref[:n], deg[:n], 'wb'))
    except Exception as err:  # pesq raises its own NoUtterancesError, BufferTooShortError, ...
        logger.debug('PESQ skipped a clip: %s', err)
        return float('nan')


def stoi_score(reference: torch.Tensor, degraded: torch.Tensor, sample_rate: int = 16000) -> float:
    """Short-time objective intelligibility, 0 to 1 (identical); NaN for clips too short to measure (< ~0.4 s)."""
    import warnings

    from pystoi import stoi

    ref, deg = _mono(reference), _mono(degraded)
    n = min(len(ref), len(deg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        value = float(stoi(ref[:n], deg[:n], sample_rate, extended=False))
    # pystoi warns and returns 1e-5 when a clip has too few non-silent frames: that is "can't measure", not 0.
    if any('Not enough STFT frames' in str(w.message) for w in caught):
        return float('nan')
    return value


def si_sdr(reference: torch.Tensor, degraded: torch.Tensor, eps: float = 1e-8) -> float:
    """Scale-invariant signal-to-distortion ratio in dB (higher is better; +inf-like for identical clips)."""
    ref, deg = _mono(reference), _mono(degraded)
    n = min(len(ref), len(deg))
    ref, deg = ref[:n] - ref[:n].mean(), deg[:n] - deg[:n].mean()
    target = (deg @ ref) / (ref @ ref + eps) * ref
    noise = deg - target
    return float(10 * np.log10((target @ target + eps) / (noise @ noise + eps)))


@functools.lru_cache(maxsize=4)
def _mel_transform(sample_rate: int) -> tp.Any:
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=1024, hop_length=256, n_mels=64, power=1.0
    )


def mel_distance(reference: torch.Tensor, degraded: torch.Tensor, sample_rate: int = 16000) -> float:
    """Mean absolute difference of log10 mel magnitudes (64 bands, 1024-point FFT): 0 for identical clips."""
    ref = torch.from_numpy(_mono(reference)).float()
    deg = torch.from_numpy(_mono(degraded)).float()
    n = min(len(ref), len(deg))
    mel = _mel_transform(sample_rate)
    floor = 1e-5  # -100 dB: silence in both clips counts as equal
    a, b = mel(ref[:n]).clamp_min(floor).log10(), mel(deg[:n]).clamp_min(floor).log10()
    return float((a - b).abs().mean())


CODEC_METRICS: dict[str, tp.Callable[[torch.Tensor, torch.Tensor, int], float]] = {
    'codec_pesq': pesq_wb,
    'codec_stoi': stoi_score,
    'codec_sisdr': lambda ref, deg, sr: si_sdr(ref, deg),
    'codec_mel': mel_distance,
}


@torch.no_grad()
def reconstruct(compression_model: tp.Any, wav: torch.Tensor) -> torch.Tensor:
    """Encode and decode a [C, T] clip with the codec; [C, T] float32 on the CPU."""
    device = next(iter(compression_model.parameters())).device
    codes, scale = compression_model.encode(wav[None].to(device))
    out = compression_model.decode(codes, scale)[0].float().cpu()
    if out.shape[-1] < wav.shape[-1]:
        out = torch.nn.functional.pad(out, (0, wav.shape[-1] - out.shape[-1]))
    return out[..., : wav.shape[-1]]


def codec_fidelity(compression_model: tp.Any, clips: tp.Sequence[torch.Tensor], sample_rate: int) -> dict[str, float]:
    """PESQ, STOI, SI-SDR and mel distance of each clip against its codec reconstruction, averaged.

    A metric that can't score a clip (too short, silent) leaves it out of that metric's mean; a metric that scores no
    clip is absent from the result.

    Args:
        compression_model: the package's codec (an audiocraft CompressionModel).
        clips: [C, T] waveforms at ``sample_rate`` (the codec's rate).
        sample_rate: their sample rate.
    """
    values: dict[str, list[float]] = {key: [] for key in CODEC_METRICS}
    for clip in clips:
        rebuilt = reconstruct(compression_model, clip)
        for key, fn in CODEC_METRICS.items():
            values[key].append(fn(clip, rebuilt, sample_rate))
    return {
        key: float(np.mean(finite)) for key, vals in values.items() if (finite := [v for v in vals if math.isfinite(v)])
    }


# ---------------------------------------------------------------------------------------------------- PaSST KL
def passt_weights_path() -> Path:
    """Where hear21passt looks for its AudioSet weights: torch hub's checkpoint cache ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / 'checkpoints' / PASST_WEIGHTS


def passt_unavailable() -> str | None:
    """None when the PaSST KL can run here, else the one-line reason it is skipped."""
    import importlib.util

    if importlib.util.find_spec('hear21passt') is None:
        return (
            'PaSST KL skipped: the hear21passt package is not installed (pip install hear21passt, and put its '
            f'weights at {passt_weights_path()}).'
        )
    path = passt_weights_path()
    if not path.is_file():
        return (
            f'PaSST KL skipped: its weights are not on this machine ({path}); download {PASST_URL} there on a '
            'machine with internet.'
        )
    return None


class PasstKL:
    """KL divergence between PaSST's AudioSet label distributions of generated clips and their real counterparts.

    audiocraft's ``PasstKLDivergenceMetric`` (the same model, segmenting and ``kld`` definition as its MusicGen and
    AudioGen evaluations: KL(real || generated), averaged over pairs), built only when :func:`passt_unavailable` is
    None, so it never downloads.

    Args:
        device: where PaSST runs.
    """

    def __init__(self, device: str = 'cpu'):
        reason = passt_unavailable()
        if reason:
            raise MetricsError(reason)
        from audiocraft.metrics.kld import PasstKLDivergenceMetric

        self.metric = PasstKLDivergenceMetric().to(device)

    def __call__(
        self, generated: tp.Sequence[torch.Tensor], real: tp.Sequence[torch.Tensor], sample_rate: int
    ) -> float:
        """Mean KL over (generated, real) pairs of [C, T] clips at ``sample_rate`` (each pair cut to its shorter)."""
        self.metric.reset()
        for gen, ref in zip(generated, real):
            n = min(gen.shape[-1], ref.shape[-1])
            sizes, rates = torch.tensor([n]), torch.tensor([sample_rate])
            self.metric.update(gen[None, :1, :n].float(), ref[None, :1, :n].float(), sizes, rates)
        return float(self.metric.compute()['kld'])
