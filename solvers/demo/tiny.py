"""A tiny stand-in for facebook/audiogen-medium, in the same package layout, built offline in seconds."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from solvers import project
from solvers.demo import tiny_codec
from solvers.models import package
from solvers.models.lm import build_lm_model

# A SEANet EnCodec at 16 kHz with the medium codec's stride (8*5*4*2 = 320 samples: 50 Hz) and 4 codebooks: the
# demo's trained codec (tiny_codec.CODEC_CONFIG) at half its width, a few thousand random parameters. Codebooks start
# uniform rather than by k-means so the build is deterministic.
TINY_CODEC = copy.deepcopy(tiny_codec.CODEC_CONFIG)
TINY_CODEC['seanet'].update(dimension=32, n_filters=4)


def tiny_lm_config(overrides: tuple[str, ...] = ()) -> DictConfig:
    """The LM config of the tiny package: the `model=tiny` preset composed with the demo solver.

    The dataset is the committed template, whatever the user prepared: a package is a function of its seed alone
    (XPs pin its checksum, solvers/models/identity.py).
    """
    cfg = project.compose(['solver=audiogen/demo', 'dataset=template', *overrides])
    cfg.device = 'cpu'
    cfg.dtype = 'float32'
    return cfg


def build_tiny_package(out_dir: str | os.PathLike, seed: int = 0, overrides: tuple[str, ...] = ()) -> Path:
    """Build a randomly initialised tiny package that AudioGen.get_pretrained and the solver both load.

    Args:
        out_dir: destination directory.
        seed: torch seed for the initial weights (the package is a deterministic function of it).
        overrides: extra config overrides, e.g. ``('transformer_lm.num_layers=3',)`` for a mismatched package.
    """
    from audiocraft.models import builders

    torch.manual_seed(seed)
    lm_cfg = tiny_lm_config(overrides)
    lm = build_lm_model(lm_cfg)
    codec_cfg = OmegaConf.create(TINY_CODEC)
    codec = builders.get_compression_model(codec_cfg)
    assert codec.cardinality == lm_cfg.transformer_lm.card and codec.num_codebooks == lm_cfg.transformer_lm.n_q
    # Only what a package needs: the architecture and the conditioner, without data paths of this machine.
    OmegaConf.set_struct(lm_cfg, False)
    # AudioGen.get_pretrained takes its generation window from dataset.segment_duration: use the medium model's 10 s.
    lm_cfg.dataset.segment_duration = 10.0
    for key in ('datasource', 'slurm', 'dora'):
        lm_cfg.pop(key, None)
    return package.write(out_dir, lm_cfg, lm.state_dict(), codec_cfg, codec.state_dict())
