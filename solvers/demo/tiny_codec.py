"""The tiny stand-in codec: audiocraft's EnCodec (SEANet + RVQ) shrunk to CPU size, trained on the synthetic sounds.

Same structure as facebook/audiogen-medium's codec (16 kHz, 320-sample hop → 50 Hz frames, 4 residual codebooks),
trained from scratch with audiocraft's own encodec losses (waveform L2 and L1, multi-scale mel spectrogram, the RVQ
commitment penalty; no adversarial losses: they need far more steps than a demo has) on clips of every class of
:mod:`solvers.demo.synthetic`, for about 6 minutes on one thread. It is rough (tones come back noisy, about 1.4 dB SNR),
so the demo's judge (:mod:`solvers.demo.classifier`) hears clean clips through it.
Built deterministically (seeded, one thread) and cached by :mod:`solvers.demo.build_cache`.
"""

from __future__ import annotations

import copy
import sys
import typing as tp

import numpy as np
import torch
from omegaconf import OmegaConf

from solvers.demo import build_cache
from solvers.demo import synthetic as demo_data

# The package's codec config, read by audiocraft.models.builders.get_compression_model. k-means initialisation is a
# training option (see train()); the package says False so that loading it runs no k-means and a random build
# (tests) has uniform codebooks.
CODEC_CONFIG: dict[str, tp.Any] = {
    'compression_model': 'encodec',
    'sample_rate': 16000,
    'channels': 1,
    'device': 'cpu',
    'dtype': 'float32',
    'encodec': {
        'autoencoder': 'seanet',
        'quantizer': 'rvq',
        'sample_rate': 16000,
        'channels': 1,
        'causal': False,
        'renormalize': False,
    },
    'seanet': {
        'dimension': 64,
        'channels': 1,
        'causal': False,
        'n_filters': 8,
        'n_residual_layers': 1,
        'ratios': [8, 5, 4, 2],
        'activation': 'ELU',
        'activation_params': {'alpha': 1.0},
        'norm': 'weight_norm',
        'norm_params': {},
        'kernel_size': 7,
        'residual_kernel_size': 3,
        'last_kernel_size': 7,
        'dilation_base': 2,
        'pad_mode': 'constant',
        'true_skip': True,
        'compress': 2,
        'lstm': 0,
        'disable_norm_outer_blocks': 0,
        'decoder': {'trim_right_ratio': 1.0, 'final_activation': None, 'final_activation_params': None},
        'encoder': {},
    },
    'rvq': {
        'n_q': 4,
        'q_dropout': False,
        'bins': 256,
        'decay': 0.99,
        'kmeans_init': False,
        'kmeans_iters': 50,
        'threshold_ema_dead_code': 2,
        'orthogonal_reg_weight': 0.0,
        'orthogonal_reg_active_codes_only': False,
    },
}

RECIPE: dict[str, tp.Any] = {
    'config': CODEC_CONFIG,
    'seed': 7,
    'clip_seed': 201,  # synthetic clips disjoint from the demo dataset, the tests and the classifier
    'clips_per_class': 24,  # 168 clips of 1-4 s: every class in many variants
    'pad_seconds': 0.3,  # silence after each clip: segments of short clips end in padding
    'steps': 3000,  # about 6 minutes on one CPU thread; 800 left every tone as noise
    'batch_size': 8,
    'crop_seconds': 0.32,  # 16 frames per crop: a short crop is cheap, and the codec is convolutional
    'lr': 2e-3,  # Adam, audiocraft's betas; higher than its 3e-4 because the run is short
    'betas': [0.5, 0.9],
    'kmeans_init': True,  # codebooks start at k-means of the first batch: usable codes from the first step
    # audiocraft's encodec losses without the adversaries (they need far more steps). The waveform L2 leads: from a
    # near-silent initial output the log-mel part of msspec pushes towards silence, L2 towards the signal.
    'weights': {'l2': 100.0, 'l1': 0.1, 'msspec': 0.5, 'penalty': 1.0},
}


def build_codec(config: dict | None = None):
    """A randomly initialised codec of :data:`CODEC_CONFIG` (torch's current seed)."""
    from audiocraft.models import builders

    return builders.get_compression_model(OmegaConf.create(config or CODEC_CONFIG))


def training_bank(recipe: dict) -> list[np.ndarray]:
    """The training clips, each followed by a little silence (segments of short clips end in padding)."""
    pad = np.zeros(int(recipe['pad_seconds'] * demo_data.SAMPLE_RATE), dtype=np.float32)
    return [
        np.concatenate([demo_data.synthesize_clip(cls, recipe['clip_seed'], i)[0], pad])
        for cls in demo_data.CLASSES
        for i in range(recipe['clips_per_class'])
    ]


def random_crops(bank: list[np.ndarray], rng: np.random.Generator, batch_size: int, seconds: float) -> torch.Tensor:
    """A batch [B, 1, T] of random crops of random clips."""
    n = int(seconds * demo_data.SAMPLE_RATE)
    crops = []
    for i in rng.integers(0, len(bank), batch_size):
        clip = bank[i]
        start = int(rng.integers(0, len(clip) - n + 1))
        crops.append(clip[start : start + n])
    return torch.from_numpy(np.stack(crops))[:, None]


def train(recipe: dict = RECIPE, log: tp.Callable[[str], None] = print) -> dict:
    """Train the codec from scratch; returns ``{'xp.cfg': YAML, 'best_state': weights}`` (deterministic)."""
    from audiocraft import losses

    with build_cache.single_thread():
        torch.manual_seed(recipe['seed'])
        rng = np.random.default_rng(recipe['seed'])
        config = copy.deepcopy(recipe['config'])
        config['rvq']['kmeans_init'] = recipe['kmeans_init']
        model = build_codec(config)
        model.train()
        bank = training_bank(recipe)
        msspec = losses.MultiScaleMelSpectrogramLoss(
            demo_data.SAMPLE_RATE, range_start=8, range_end=11, n_mels=64, f_min=64, normalized=True, alphas=False
        )
        weights = recipe['weights']
        opt = torch.optim.Adam(model.parameters(), lr=recipe['lr'], betas=tuple(recipe['betas']))
        for step in range(recipe['steps']):
            x = random_crops(bank, rng, recipe['batch_size'], recipe['crop_seconds'])
            result = model(x)
            y = result.x
            loss = (
                weights['msspec'] * msspec(y, x)
                + weights['l1'] * torch.nn.functional.l1_loss(y, x)
                + weights['l2'] * torch.nn.functional.mse_loss(y, x)
                + weights['penalty'] * result.penalty
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 500 == 0:
                log(f'  codec step {step + 1}/{recipe["steps"]}: loss {loss.item():.3f}')
        model.eval()
    return {
        'xp.cfg': OmegaConf.to_yaml(OmegaConf.create(recipe['config'])),
        'best_state': {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def trained(recipe: dict = RECIPE) -> dict:
    """The trained codec's ``{'xp.cfg', 'best_state'}``, from the cache (trained on first use)."""
    return build_cache.load_or_build(
        'tiny_codec', recipe, [sys.modules[__name__], demo_data], lambda: train(recipe), 'the tiny codec'
    )


def load(state: dict):
    """The codec of a ``trained()`` state, in eval mode."""
    model = build_codec(OmegaConf.to_container(OmegaConf.create(state['xp.cfg'])))  # type: ignore[arg-type]
    model.load_state_dict(state['best_state'])
    return model.eval()


@torch.no_grad()
def reconstruct(model, wavs: list[np.ndarray]) -> list[np.ndarray]:
    """Encode and decode clips one by one (each padded to whole frames)."""
    out = []
    for wav in wavs:
        x = torch.as_tensor(wav, dtype=torch.float32)[None, None]
        hop = int(np.prod(CODEC_CONFIG['seanet']['ratios']))
        x = torch.nn.functional.pad(x, (0, (-x.shape[-1]) % hop))
        codes, scale = model.encode(x)
        out.append(model.decode(codes, scale)[0, 0, : len(wav)].numpy())
    return out
