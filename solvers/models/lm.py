"""Build audiocraft's LM from a config, with its T5 text encoder explained when it is missing or broken offline.

audiocraft's T5Conditioner loads ``T5Tokenizer`` and ``T5EncoderModel`` from the Hugging Face hub or cache. Offline,
two failures reach a user today: an uncached model raises a transformers OSError that never names the model; and a
cache holding the weights but not the tokenizer files (spiece.model / tokenizer.json) makes transformers 5 build an
empty tokenizer, so every word becomes ``<unk>`` and the model silently ignores the text. Both become one sentence.
"""

from __future__ import annotations

import os
import typing as tp

from omegaconf import DictConfig, OmegaConf

from solvers.errors import AudiogenError

# Ordinary caption words: any real T5 vocabulary splits them into known pieces.
PROBE_TEXT = 'a dog barks in the heavy rain near a car'


class TextEncoderError(AudiogenError):
    """The text encoder (T5) of a model can't be loaded, or its tokenizer is broken."""


def t5_names(cfg: DictConfig) -> list[str]:
    """The T5 models the config's text conditioners load (empty for LUT conditioners)."""
    names = []
    for conditioner in (cfg.get('conditioners') or {}).values():
        if conditioner is not None and conditioner.get('model') == 't5':
            names.append(str(conditioner.t5.name))
    return names


def fetch_hint(name: str) -> str:
    """How to put a T5 model in the Hugging Face cache."""
    return (
        f'On a machine with internet run once: python -c "from transformers import T5EncoderModel, '
        f"T5Tokenizer; T5Tokenizer.from_pretrained('{name}'); T5EncoderModel.from_pretrained('{name}')\", then "
        f'copy the cache (~/.cache/huggingface, or $HF_HOME) to this machine. It is read from '
        f'{os.environ.get("HF_HOME", "~/.cache/huggingface")} (HF_HUB_OFFLINE='
        f'{os.environ.get("HF_HUB_OFFLINE", "unset")}).'
    )


def build_lm_model(
    cfg: DictConfig, state: dict | None = None, device: str | None = None, dtype: str | None = None
) -> tp.Any:
    """The one LM builder: ``audiocraft.models.builders.get_lm_model(cfg)``, with T5 loading failures explained.

    Training, generation, the memory planner (on the meta device) and the tiny packages all build through here.

    Args:
        cfg: the LM config (audiocraft's flat keys), never modified: a copy takes ``device`` and ``dtype``.
        state: weights to load; the LM is then put in eval mode and ``lm.cfg`` set to the config, as
            ``audiocraft.models.loaders.load_lm_model`` does (``AudioGen`` reads its window and codec wrapping there).
        device: where to build it (``cfg.device`` when None), ``meta`` for shapes only.
        dtype: its parameters' dtype (``cfg.dtype`` when None).

    Raises:
        TextEncoderError: a T5 model is neither cached nor reachable, or its tokenizer maps ordinary words to <unk>.
    """
    from audiocraft.models import builders

    if device is not None or dtype is not None:
        cfg = cfg.copy()  # the caller's config stays as it is (the solver's own is used as is: its reads are tracked)
        OmegaConf.set_struct(cfg, False)
        cfg.device = str(device) if device is not None else cfg.device
        cfg.dtype = dtype if dtype is not None else cfg.dtype
    names = t5_names(cfg)
    try:
        lm = builders.get_lm_model(cfg)
    except OSError as err:
        if not names:
            raise
        raise TextEncoderError(
            f"The text encoder {', '.join(names)} of this model is not in the Hugging Face cache and the hub can't "
            f'be reached ({str(err).strip().splitlines()[0]}). {fetch_hint(names[0])}'
        ) from None
    check_text_conditioners(lm)
    if state is not None:
        lm.load_state_dict(state)
        lm.eval()
        lm.cfg = cfg  # type: ignore[assignment]  # what audiocraft.models.loaders.load_lm_model sets too
    return lm


def check_text_conditioners(lm: tp.Any) -> None:
    """Refuse a T5 tokenizer that maps ordinary words to <unk> (its vocabulary files were missing at load)."""
    from audiocraft.modules.conditioners import T5Conditioner

    for conditioner in lm.condition_provider.conditioners.values():
        if not isinstance(conditioner, T5Conditioner):
            continue
        tokenizer = conditioner.t5_tokenizer
        ids = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
        unknown = sum(1 for i in ids if i == tokenizer.unk_token_id)
        if not ids or unknown * 2 >= len(ids):
            raise TextEncoderError(
                f'The tokenizer of the text encoder {conditioner.name} maps ordinary words to <unk> ({unknown} of '
                f"{len(ids)} pieces of '{PROBE_TEXT}'): its vocabulary files (spiece.model / tokenizer.json) are "
                f'missing from the cache, so the model would ignore every prompt. {fetch_hint(conditioner.name)}'
            )
