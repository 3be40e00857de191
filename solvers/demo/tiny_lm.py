"""The demo's "pretrained" stand-in: the tiny LM trained on the known demo classes over the trained tiny codec.

``make demo`` plays what a user does with facebook/audiogen-medium: start from a model that knows some sounds
(:data:`solvers.demo.synthetic.KNOWN_CLASSES`) and fine-tune it on sounds it doesn't know (``NEW_CLASSES``). The
pretraining here is a plain loop over pre-encoded tokens with the LM's own conditioning and classifier-free-guidance
dropout and the cross entropy the solver uses, so it takes about a minute; its result is cached by
:mod:`solvers.demo.build_cache`, and :func:`build_trained_package` writes it in facebook/audiogen-medium's file layout.
"""

from __future__ import annotations

import math
import os
import sys
import typing as tp
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from solvers.demo import build_cache, tiny, tiny_codec
from solvers.demo import synthetic as demo_data
from solvers.models import package
from solvers.models.lm import build_lm_model

RECIPE: dict[str, tp.Any] = {
    'classes': demo_data.KNOWN_CLASSES,
    'seed': 11,
    'clip_seed': 301,  # clips disjoint from the demo dataset (0), the classifier (101, 102) and the codec (201)
    'clips_per_class': 32,  # 128 clips, every caption ~10 times
    'segment_seconds': 4.0,  # the demo preset's segment (prepare_dataset: 90 % of the 1-4 s clips fit); padded
    'steps': 500,
    'batch_size': 16,
    'lr': 2e-3,  # AdamW, cosine to 10 %; high because the model is tiny and the run short
    'warmup': 40,
}
# The config keys that shape the LM (hashed into the cache key; data paths and devices don't matter).
ARCH_KEYS = (
    'transformer_lm',
    'codebooks_pattern',
    'conditioners',
    'fuser',
    'classifier_free_guidance',
    'attribute_dropout',
    'lm_model',
)


def lm_config() -> DictConfig:
    """The tiny LM's config: the ``model=tiny`` preset, as in :func:`solvers.demo.tiny.build_tiny_package`."""
    return tiny.tiny_lm_config()


def encode_bank(codec, recipe: dict) -> tuple[torch.Tensor, list[str]]:
    """Tokens [N, K, T] of the training segments (each clip from its start, zero-padded) and their captions."""
    wavs, captions = [], []
    for cls in demo_data.select_classes(','.join(recipe['classes'])):
        for i in range(recipe['clips_per_class']):
            wav, caption = demo_data.synthesize_clip(cls, recipe['clip_seed'], i)
            wavs.append(demo_data.window(wav, recipe['segment_seconds']))
            captions.append(caption)
    codes = []
    with torch.no_grad():
        for start in range(0, len(wavs), 16):
            x = torch.from_numpy(np.stack(wavs[start : start + 16]))[:, None]
            codes.append(codec.encode(x)[0])
    return torch.cat(codes), captions


def lm_loss(lm, codes: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """The solver's training loss: conditioning with CFG/attribute dropout, then the masked cross entropy."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    attributes = [ConditioningAttributes(text={'description': c}) for c in captions]
    attributes = lm.att_dropout(lm.cfg_dropout(attributes))
    condition_tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
    out = lm.compute_predictions(codes, [], condition_tensors)
    return torch.nn.functional.cross_entropy(out.logits[out.mask], codes[out.mask])


def pretrain(recipe: dict, codec_state: dict, log: tp.Callable[[str], None] = print) -> dict:
    """Train the tiny LM from its seed on ``recipe['classes']``; returns ``{'best_state': weights}``."""
    with build_cache.single_thread():
        torch.manual_seed(recipe['seed'])
        rng = np.random.default_rng(recipe['seed'])
        lm = build_lm_model(lm_config())
        codes, captions = encode_bank(tiny_codec.load(codec_state), recipe)
        opt = torch.optim.AdamW(lm.parameters(), lr=recipe['lr'], betas=(0.9, 0.95), weight_decay=0.0)
        steps, warmup = recipe['steps'], recipe['warmup']

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        lm.train()
        for step in range(steps):
            idx = rng.integers(0, len(captions), recipe['batch_size'])
            loss = lm_loss(lm, codes[idx], [captions[i] for i in idx])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            opt.step()
            schedule.step()
            if (step + 1) % 100 == 0:
                log(f'  LM step {step + 1}/{steps}: ce {loss.item():.3f}')
        lm.eval()
    return {'best_state': {k: v.detach().clone() for k, v in lm.state_dict().items()}}


def pretrained(recipe: dict = RECIPE) -> tuple[dict, dict]:
    """The trained codec's state and the pretrained LM's state, from the cache (built on first use)."""
    codec_state = tiny_codec.trained()
    cfg = lm_config()
    key = {
        **recipe,
        'codec': tiny_codec.RECIPE,
        'lm': OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in ARCH_KEYS if k in cfg]), resolve=True),
    }
    state = build_cache.load_or_build(
        'tiny_lm',
        key,
        [sys.modules[__name__], tiny_codec, demo_data],
        lambda: pretrain(recipe, codec_state),
        'the pretrained tiny LM',
    )
    return codec_state, state


def build_trained_package(out_dir: str | os.PathLike) -> Path:
    """Write the demo's stand-in package: the trained codec and the LM pretrained on the known classes.

    Args:
        out_dir: destination directory; the same layout as :func:`solvers.demo.tiny.build_tiny_package`.
    """
    codec_state, lm_state = pretrained()
    lm_cfg = lm_config()
    OmegaConf.set_struct(lm_cfg, False)
    lm_cfg.dataset.segment_duration = 10.0  # AudioGen.get_pretrained's window, as in the medium package
    for key in ('datasource', 'slurm', 'dora'):
        lm_cfg.pop(key, None)
    codec_cfg = OmegaConf.create(codec_state['xp.cfg'])
    return package.write(out_dir, lm_cfg, lm_state['best_state'], codec_cfg, codec_state['best_state'])
