"""What trains in a fine-tune: LoRA adapters over audiocraft's LM (peft), frozen parts, and the trainable state.

LoRA targets, by name (``adapter.targets``):

- ``self_qkv`` / ``cross_qkv``: the fused q/k/v projection of self- and cross-attention. audiocraft's custom
  attention (``memory_efficient: true``, what facebook/audiogen-medium runs) keeps q, k and v in one
  ``in_proj_weight`` Parameter that it slices, not in ``nn.Linear`` modules, so peft targets the Parameter itself
  (``LoraConfig.target_parameters``): the module sees ``W + scale * B @ A`` for the whole [3D, D] matrix, i.e. q, k
  and v are all adapted (one shared A). peft's parameter LoRA has no dropout: ``adapter.dropout`` applies to the
  Linear targets below, which peft holds as a second adapter (:data:`MODULE_ADAPTER`) next to :data:`PARAM_ADAPTER`.
- ``self_out`` / ``cross_out``: the attention output projections (``out_proj``, ``nn.Linear``).
- ``ffn``: the feed-forward ``linear1`` and ``linear2``.
- ``heads``: the per-codebook output heads (``linears.N``), optional.
- ``text_proj``: the text conditioner's ``output_proj`` (T5 width to the LM width), optional.

The base stays frozen; only adapter parameters reach the optimizer, the EMA, the gradient clipping, the best state
and the checkpoint, through :class:`TrainableState` (registered by the solver as ``adapter``). A LoRA checkpoint is
therefore megabytes; the base weights come from the package its config names (``pretrained``).

:func:`merge_state` folds adapter weights into a base state dict with the same arithmetic as peft's merge
(``W += scaling * B @ A``), without building the model (which would load T5); the round-trip test checks it
against the unmerged peft model token for token.
"""

from __future__ import annotations

import logging
import typing as tp

import torch
from omegaconf import DictConfig, OmegaConf

from solvers.errors import AudiogenError

logger = logging.getLogger(__name__)

MODULE_ADAPTER = 'lora'  # peft adapter holding the nn.Linear targets (with dropout)
PARAM_ADAPTER = 'lora_qkv'  # peft adapter holding the fused in_proj_weight targets (no dropout in peft)
PARAM_TARGETS = {'self_qkv': 'self_attn.in_proj_weight', 'cross_qkv': 'cross_attention.in_proj_weight'}
MODULE_TARGETS = {  # regular expressions over LMModel module names (peft matches them in full)
    'self_out': r'transformer\.layers\.\d+\.self_attn\.out_proj',
    'cross_out': r'transformer\.layers\.\d+\.cross_attention\.out_proj',
    'ffn': r'transformer\.layers\.\d+\.linear[12]',
    'heads': r'linears\.\d+',
    'text_proj': r'condition_provider\.conditioners\.\w+\.output_proj',
}
TARGETS = tuple(PARAM_TARGETS) + tuple(MODULE_TARGETS)
BASE_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


class AdapterError(AudiogenError, ValueError):
    """An adapter or freezing setting that can't be honoured; the message names the key and the fix."""


def enabled(cfg: DictConfig) -> bool:
    """True when the config asks for LoRA adapters (``adapter.kind: lora``)."""
    kind = OmegaConf.select(cfg, 'adapter.kind', default='none')
    if kind not in ('none', 'lora'):
        raise AdapterError(f'adapter.kind={kind}: choose none (full fine-tune) or lora (adapter=lora).')
    return kind == 'lora'


def check_settings(cfg: DictConfig) -> None:
    """Refuse adapter values that can't work, naming the key (called before anything is built)."""
    if not enabled(cfg):
        return
    settings = cfg.adapter
    frozen = [f'freeze.{k}={v}' for k, v in cfg.freeze.items() if v]
    if frozen:
        raise AdapterError(
            f'{" ".join(frozen)} freezes parts of a full fine-tune, but adapter=lora already freezes '
            'every base weight: drop the freeze.* override(s), or use adapter=none.'
        )
    unknown = [t for t in settings.targets if t not in TARGETS]
    if unknown or not settings.targets:
        raise AdapterError(
            f'adapter.targets={list(settings.targets)}: choose among {", ".join(TARGETS)} '
            f'(unknown: {", ".join(unknown) or "none given"}).'
        )
    if int(settings.rank) < 1:
        raise AdapterError(f'adapter.rank={settings.rank} must be a positive integer (8-64 is usual).')
    if not 0.0 <= float(settings.dropout) < 1.0:
        raise AdapterError(f'adapter.dropout={settings.dropout} must be within [0, 1).')
    if settings.base_dtype not in BASE_DTYPES:
        raise AdapterError(f'adapter.base_dtype={settings.base_dtype}: choose one of {", ".join(BASE_DTYPES)}.')
    if not bool(OmegaConf.select(cfg, 'transformer_lm.memory_efficient', default=False)) and any(
        t in PARAM_TARGETS for t in settings.targets
    ):
        raise AdapterError(
            "adapter.targets asks for the fused q/k/v projections, which exist in audiocraft's custom attention "
            'only: set transformer_lm.memory_efficient=true (what facebook/audiogen-medium uses) or drop '
            'self_qkv/cross_qkv from adapter.targets.'
        )


def lora_configs(settings: DictConfig) -> dict[str, tp.Any]:
    """The peft LoraConfig of each adapter name the settings need."""
    from peft import LoraConfig

    common: dict[str, tp.Any] = {
        'r': int(settings.rank),
        'lora_alpha': float(settings.alpha),
        'use_rslora': bool(settings.rslora),
        'init_lora_weights': True,
    }
    configs = {}
    modules = [MODULE_TARGETS[t] for t in settings.targets if t in MODULE_TARGETS]
    params = [PARAM_TARGETS[t] for t in settings.targets if t in PARAM_TARGETS]
    if modules:
        configs[MODULE_ADAPTER] = LoraConfig(
            target_modules='|'.join(f'(?:{m})' for m in modules), lora_dropout=float(settings.dropout), **common
        )
    if params:
        configs[PARAM_ADAPTER] = LoraConfig(target_modules=[], target_parameters=params, lora_dropout=0.0, **common)
    return configs


def inject_lora(lm: torch.nn.Module, settings: DictConfig) -> tp.Any:
    """Add LoRA adapters to ``lm`` in place (the model stays an ``LMModel``), freeze everything else.

    Returns:
        The peft tuner (``LoraModel``) that owns the injection; keep it for merging.
    """
    from peft.tuners.lora import LoraModel

    configs = lora_configs(settings)
    names = list(configs)
    tuner = LoraModel(lm, configs[names[0]], names[0])
    for name in names[1:]:
        tuner.peft_config[name] = configs[name]
        tuner.inject_adapter(lm, name)
    tuner.set_adapter(names)  # all active and trainable
    for name, param in lm.named_parameters():
        param.requires_grad_('.lora_' in name)
    return tuner


def hold_base_in(lm: torch.nn.Module, dtype_name: str, device: str) -> None:
    """Cast the frozen base weights to ``dtype_name`` (bf16 halves them on a GPU); adapters stay fp32."""
    dtype = BASE_DTYPES[dtype_name]
    if dtype is torch.float32:
        return
    if not str(device).startswith('cuda'):
        logger.info('adapter.base_dtype=%s applies on CUDA only: the base stays float32 on %s.', dtype_name, device)
        return
    for param in lm.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


def layout(lm: torch.nn.Module) -> list[list]:
    """Where each adapter applies: ``[base state key, lora_A key, lora_B key, scaling]`` per adapted weight."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    out = []
    for name, module in lm.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        stripped = name.replace('.base_layer', '')
        base_key = f'{stripped}.{module.parameter_name}' if isinstance(module, ParamWrapper) else f'{stripped}.weight'
        for adapter in module.lora_A:
            out.append(
                [
                    base_key,
                    f'{name}.lora_A.{adapter}.weight',
                    f'{name}.lora_B.{adapter}.weight',
                    float(module.scaling[adapter]),
                ]
            )
    return out


def merge_state(base_state: dict, adapter_state: dict, adapter_layout: list[list]) -> dict:
    """The base LM state with the adapters folded in: ``W += scaling * B @ A`` (peft's merge, fp32 arithmetic).

    Args:
        base_state: the base package's LM state dict (not modified).
        adapter_state: trainable state (``lora_A``/``lora_B`` weights by their names in the injected model).
        adapter_layout: from :func:`layout` (stored in LoRA checkpoints and adapter exports).
    Raises:
        AdapterError: the adapter doesn't fit the base (a key or shape is missing).
    """
    merged = dict(base_state)
    for base_key, a_key, b_key, scaling in adapter_layout:
        if base_key not in merged or a_key not in adapter_state or b_key not in adapter_state:
            missing = next(k for k in (base_key, a_key, b_key) if k not in (merged if k == base_key else adapter_state))
            raise AdapterError(
                f"The adapter doesn't fit its base: {missing} is missing. Was it trained over another "
                'package? Use the package its XP config names (pretrained=...).'
            )
        weight = merged[base_key]
        delta = adapter_state[b_key].float() @ adapter_state[a_key].float() * scaling
        if delta.shape != weight.shape:
            raise AdapterError(
                f'The adapter for {base_key} has shape {tuple(delta.shape)} but the base weight is '
                f'{tuple(weight.shape)}: it was trained over another package.'
            )
        merged[base_key] = (weight.float() + delta).to(weight.dtype)
    return merged


class TrainableState(torch.nn.Module):
    """The trainable parameters of a model seen as one state source, by their names in the model.

    The solver registers it (as ``adapter``) for the optimizer, the EMA, the best state and the checkpoint, so none
    of them holds a copy of the frozen base. Loading copies values into the model's own Parameters.
    """

    _params: dict[str, torch.nn.Parameter]  # kept out of nn.Module's registries (they belong to the model)

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.__dict__['_params'] = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def named_parameters(
        self,
        prefix: str = '',
        recurse: bool = True,  # type: ignore[override]
        remove_duplicate: bool = True,
    ) -> tp.Iterator[tuple[str, torch.nn.Parameter]]:
        yield from ((prefix + name, param) for name, param in self._params.items())

    def parameters(self, recurse: bool = True) -> tp.Iterator[torch.nn.Parameter]:  # type: ignore[override]
        yield from self._params.values()

    def named_buffers(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        return iter(())

    def state_dict(self, *args: tp.Any, keep_vars: bool = False, **kwargs: tp.Any) -> dict:  # type: ignore[override]
        return {name: param if keep_vars else param.detach() for name, param in self._params.items()}

    def load_state_dict(
        self,
        state_dict: tp.Mapping[str, tp.Any],
        strict: bool = True,  # type: ignore[override]
        assign: bool = False,
    ) -> tp.Any:
        missing = sorted(set(self._params) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self._params))
        if strict and (missing or unexpected):
            raise AdapterError(
                f"The adapter state doesn't match this model's adapters (missing {missing[:3]}, unexpected "
                f'{unexpected[:3]}): it was saved with other adapter.targets or adapter.rank.'
            )
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in self._params:
                    self._params[name].copy_(value)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    def numel(self) -> int:
        """Number of trainable values."""
        return sum(p.numel() for p in self._params.values())


def freeze(lm: tp.Any, cfg: DictConfig) -> list[str]:
    """Freeze parts of a full fine-tune (``freeze.*``); returns the names of the frozen parameter groups.

    Raises:
        AdapterError: ``freeze.first_layers`` is not below the layer count.
    """
    frozen = []
    settings = cfg.freeze
    layers = lm.transformer.layers
    first = int(settings.first_layers)
    if not 0 <= first < len(layers):
        raise AdapterError(
            f'freeze.first_layers={first} must be within [0, {len(layers) - 1}]: the model has '
            f'{len(layers)} layers and at least one must train.'
        )
    parts: list[tuple[str, torch.nn.Module]] = [(f'transformer.layers.{i}', layers[i]) for i in range(first)]
    if settings.embeddings:
        parts.append(('emb', lm.emb))
    if settings.conditioner:
        for name, conditioner in lm.condition_provider.conditioners.items():
            if hasattr(conditioner, 'output_proj'):
                parts.append((f'condition_provider.conditioners.{name}.output_proj', conditioner.output_proj))
    for name, module in parts:
        for param in module.parameters():
            param.requires_grad_(False)
        frozen.append(name)
    return frozen


def count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@torch.no_grad()
def probe_logits(lm: tp.Any) -> torch.Tensor:
    """The LM's logits for a fixed short input (eval mode: no dropout), to compare models exactly."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    was_training = lm.training
    lm.eval()
    try:
        provider = lm.condition_provider
        tokenized = provider.tokenize([ConditioningAttributes(text={'description': 'a dog barks in the rain'})])
        device = next(iter(lm.parameters())).device
        codes = torch.arange(4 * 8, device=device).reshape(1, 4, 8) % lm.card
        codes = codes[:, : lm.num_codebooks]
        return lm.compute_predictions(codes, [], provider(tokenized)).logits.float().cpu()
    finally:
        lm.train(was_training)


def attach_lora(lm: torch.nn.Module, settings: DictConfig, device: str) -> tuple[tp.Any, TrainableState, list[list]]:
    """Add LoRA adapters to an LM holding its base weights, prove the output didn't change, hold the base in
    ``adapter.base_dtype``.

    Args:
        lm: the LM, its package weights loaded.
        settings: the ``adapter`` block.
        device: where the LM is.
    Returns:
        The peft tuner, the adapters' state module (what the checkpoint, EMA and best state hold), and the adapter
        layout (for merging at export).
    Raises:
        AdapterError: the adapters changed the output before any training (a bug).
    """
    before = probe_logits(lm)
    lora = inject_lora(lm, settings)
    after = probe_logits(lm)
    # NaN marks the positions the delay pattern leaves undefined: equal there too.
    if not torch.allclose(before, after, rtol=0, atol=0, equal_nan=True):
        raise AdapterError(
            f"LoRA changed the model's output before any training (max difference "
            f'{(before - after).nan_to_num().abs().max().item():.3g}); this is a bug, please report it with '
            'the config.'
        )
    hold_base_in(lm, settings.base_dtype, device)
    adapter_layout = layout(lm)
    logger.info(
        "LoRA rank %d on %s: %d adapted weights; the output equals the base model's before the first step.",
        settings.rank,
        ', '.join(settings.targets),
        len(adapter_layout),
    )
    return lora, TrainableState(lm), adapter_layout
