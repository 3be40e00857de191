"""The demo's judge: a fixed spectral classifier that names the synthetic sound class of a clip.

Features are log-mel statistics of the clip's active frames (loudness- and silence-invariant); the classifier is a
multinomial logistic regression trained once, with a fixed seed, on clean synthetic clips of all classes of
:mod:`solvers.demo.synthetic`, and cached (see :mod:`solvers.demo.build_cache`). It never sees generated audio: it only
answers "which of the synthetic classes does this sound like", which is what the demo's prompt accuracy needs.

The clean clips are heard through the demo's codec (``heard_through: tiny_codec``: encoded and decoded by
:mod:`solvers.demo.tiny_codec`), because every clip the stand-in generates comes out of that decoder: the tiny codec,
trained for minutes, renders tones as noisy approximations that a judge of raw clips would call rain. The judge
thus answers "which class, as this codec renders it, does the clip sound like".
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import numpy as np
import torch

from solvers.demo import build_cache
from solvers.demo import synthetic as demo_data

SAMPLE_RATE = demo_data.SAMPLE_RATE
RECIPE = {
    'seconds': 2.0,  # clips are judged on their first 2 s, zero-padded: what the demo generates
    'n_fft': 1024,  # 64 ms frames: resolves the engine's 35-70 Hz fundamental
    'hop': 256,  # 16 ms: footsteps' and barks' onsets stay visible
    'n_mels': 64,
    'active_db': 40.0,  # frames within 40 dB of the loudest count as sound; the rest is padding or silence
    'train_seed': 101,  # clip seeds, disjoint from the demo dataset (0) and the tests (0-2)
    'train_per_class': 40,
    'test_seed': 102,
    'test_per_class': 12,
    'weight_decay': 1e-3,  # a little L2 keeps the 131 weights per class from memorising 40 clips
    'steps': 300,  # full-batch Adam steps: the loss is flat long before
    'heard_through': 'tiny_codec',  # or None: judge raw clips (see the module docstring)
}


def features(wav: np.ndarray | torch.Tensor, recipe: dict = RECIPE) -> torch.Tensor:
    """Log-mel statistics of one mono clip (any length, 16 kHz), invariant to gain and to trailing silence.

    Returns:
        A float32 vector: the mean and std over active frames of each log-mel band (shape of the spectrum and its
        movement), the active fraction, the std of the active frames' energy and its mean frame-to-frame change
        (rhythm: steps and barks against steady hums and tones).
    """
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32)).flatten()
    x = demo_data_window(x, recipe['seconds'])
    x = x - x.mean()
    x = x / (x.pow(2).mean().sqrt() + 1e-8)
    mel = _mel(recipe['n_fft'], recipe['hop'], recipe['n_mels'])(x)  # [n_mels, frames]
    logmel = 10 * torch.log10(mel + 1e-8)
    energy = 10 * torch.log10(mel.sum(0) + 1e-8)
    active = energy > energy.max() - recipe['active_db']
    if int(active.sum()) < 2:
        active = torch.ones_like(active)
    frames = logmel[:, active]
    e = energy[active]
    rhythm = (energy[1:] - energy[:-1]).abs().mean()
    extra = torch.stack([active.float().mean(), e.std() / 10, rhythm / 10])
    return torch.cat([frames.mean(1) / 10, frames.std(1) / 10, extra]).float()


def demo_data_window(x: torch.Tensor, seconds: float) -> torch.Tensor:
    """The first ``seconds`` of a clip, zero-padded."""
    n = int(round(seconds * SAMPLE_RATE))
    return torch.nn.functional.pad(x[:n], (0, max(0, n - x.numel())))


@functools.cache
def _mel(n_fft: int, hop: int, n_mels: int):
    import torchaudio

    return torchaudio.transforms.MelSpectrogram(
        SAMPLE_RATE, n_fft=n_fft, hop_length=hop, n_mels=n_mels, f_min=20.0, power=2.0
    )


def clean_clips(seed: int, per_class: int, heard_through: str | None = None) -> tuple[list[np.ndarray], list[int]]:
    """Synthetic clips of every class and their class indices (in :data:`demo_data.CLASS_NAMES` order).

    Args:
        seed: clip seed.
        per_class: clips per class.
        heard_through: ``tiny_codec`` to return the clips as the trained tiny codec reconstructs them.
    """
    clips, labels = [], []
    for label, cls in enumerate(demo_data.CLASSES):
        for i in range(per_class):
            clips.append(demo_data.synthesize_clip(cls, seed, i)[0])
            labels.append(label)
    if heard_through == 'tiny_codec':
        from solvers.demo import tiny_codec

        clips = tiny_codec.reconstruct(tiny_codec.load(tiny_codec.trained()), clips)
    elif heard_through is not None:
        raise ValueError(f"heard_through={heard_through!r}: use 'tiny_codec' or None.")
    return clips, labels


@dataclasses.dataclass
class Classifier:
    """Standardised features → logits of the :data:`demo_data.CLASS_NAMES` classes."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    recipe: dict

    def logits(self, wavs: list) -> torch.Tensor:
        """Class logits [N, classes] of N mono clips."""
        feats = torch.stack([features(w, self.recipe) for w in wavs])
        return ((feats - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, wavs: list) -> list[str]:
        """The class name of each clip."""
        return [demo_data.CLASS_NAMES[i] for i in self.logits(wavs).argmax(1).tolist()]

    def accuracy(self, wavs: list, labels: list[int]) -> float:
        """Fraction of clips assigned to their class."""
        predicted = self.logits(wavs).argmax(1)
        return float((predicted == torch.as_tensor(labels)).float().mean())


def train(recipe: dict = RECIPE) -> dict:
    """Fit the classifier on clean clips (deterministic); returns its state and its held-out clean accuracy."""
    with build_cache.single_thread():
        torch.manual_seed(recipe['train_seed'])
        clips, labels = clean_clips(recipe['train_seed'], recipe['train_per_class'], recipe['heard_through'])
        feats = torch.stack([features(c, recipe) for c in clips])
        y = torch.as_tensor(labels)
        mean, std = feats.mean(0), feats.std(0) + 1e-3
        z = (feats - mean) / std
        linear = torch.nn.Linear(z.shape[1], len(demo_data.CLASSES))
        opt = torch.optim.Adam(linear.parameters(), lr=0.05, weight_decay=recipe['weight_decay'])
        for _ in range(recipe['steps']):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(linear(z), y).backward()
            opt.step()
        state = {
            'mean': mean,
            'std': std,
            'weight': linear.weight.detach().clone(),
            'bias': linear.bias.detach().clone(),
        }
        model = Classifier(**state, recipe=recipe)
        test_clips, test_labels = clean_clips(recipe['test_seed'], recipe['test_per_class'], recipe['heard_through'])
        return {**state, 'clean_accuracy': model.accuracy(test_clips, test_labels)}


def _state(recipe: dict) -> dict:
    from solvers.demo import tiny_codec

    key = {**recipe, 'codec': tiny_codec.RECIPE} if recipe['heard_through'] else recipe
    modules = [sys.modules[__name__], demo_data] + ([tiny_codec] if recipe['heard_through'] else [])
    return build_cache.load_or_build('demo_classifier', key, modules, lambda: train(recipe), 'the demo classifier')


def load(recipe: dict = RECIPE) -> Classifier:
    """The cached classifier (trained on first use, in a few seconds)."""
    state = _state(recipe)
    return Classifier(mean=state['mean'], std=state['std'], weight=state['weight'], bias=state['bias'], recipe=recipe)


def clean_accuracy(recipe: dict = RECIPE) -> float:
    """The classifier's accuracy on held-out clean clips (heard through the codec), as measured when it was built."""
    return float(_state(recipe)['clean_accuracy'])
