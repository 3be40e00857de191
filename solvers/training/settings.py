"""Config checks before a run builds anything: settings this solver can't honour stop it by name.

:func:`check` is what the solver's ``__init__`` calls (so a notebook's ``get_solver_from_sig`` checks too); each part
takes the config and can be called alone. Decoder names are checked by
:func:`solvers.generation.fastgen.check_decoder`, the one decoder check of the project.
"""

from __future__ import annotations

import logging

import omegaconf
import torch

from solvers.errors import AudiogenError
from solvers.evaluation import evaluate as evaluation
from solvers.generation import fastgen
from solvers.models import adapters

logger = logging.getLogger(__name__)


class SettingsError(AudiogenError, ValueError):
    """A config value the run can't honour; the message names the key and the fix."""


# Evaluation scores that can choose the best state (the codec scores are fixed for a run; clap_real too).
BEST_EVALUATE_METRICS = ('clap', 'kad', 'fad', 'kld')
# audiocraft keys that this solver's hooks replace, with why; a value other than the default stops the run by name.
REPLACED_AUDIOCRAFT_KEYS = {
    'compression_model_n_q': "the LM predicts every codebook of the package's codec",
    'interleave_stereo_codebooks.use': 'AudioGen is mono (channels: 1)',
    'checkpoint.keep_every_states': 'keep epoch checkpoints with checkpoint.save_every and checkpoint.keep_last',
    'cache.path': "audiocraft's batch cache is not read by this solver's training loop; use token_cache=true",
}


def check(cfg: omegaconf.DictConfig) -> None:
    """Every check below, then the precision this machine supports (``cfg`` is updated in place).

    Args:
        cfg: the whole solver config.
    """
    refuse_unsupported(cfg)
    resolve_precision(cfg)


def refuse_unsupported(cfg: omegaconf.DictConfig) -> None:
    """Config values this solver can't honour stop the run by name, rather than being silently ignored."""
    if cfg.fsdp.use:
        raise adapters.AdapterError(
            "fsdp.use=true is not supported: audiocraft's FSDP wrapper needs one CUDA device per process and refuses "
            "autocast, and this solver's checkpoints, EMA and LoRA are not sharded. To fine-tune medium on one "
            '24-48 GB GPU use adapter=lora; on several GPUs with a full copy each, `dora run -d` (data parallel).'
        )
    adapters.check_settings(cfg)
    check_evaluation(cfg)
    fastgen.check_decoder(str(cfg.generate.get('decoder') or 'fast'), str(cfg.device), naming='config')
    refuse_audiocraft_keys(cfg)
    check_token_cache(cfg)
    check_optim(cfg.optim)


def check_optim(optim: omegaconf.DictConfig) -> None:
    """The ``optim`` block: accumulation, eager sync and the divergence guard's patience."""
    if optim.grad_accum_steps < 1:
        raise SettingsError(f'optim.grad_accum_steps={optim.grad_accum_steps}: it must be at least 1.')
    if optim.eager_sync and optim.grad_accum_steps > 1:
        raise adapters.AdapterError(
            f'optim.eager_sync=true all-reduces gradients during the backward, which gradient accumulation '
            f"(optim.grad_accum_steps={optim.grad_accum_steps}) can't do: the earlier micro-batches' gradients "
            'would be skipped. Set optim.eager_sync=false (one all-reduce per update) or optim.grad_accum_steps=1.'
        )
    if int(optim.max_bad_steps) < 1:
        raise AudiogenError(
            f'optim.max_bad_steps={optim.max_bad_steps}: it must be at least 1 (consecutive '
            'non-finite steps before the run stops).'
        )


def check_token_cache(cfg: omegaconf.DictConfig) -> None:
    """``token_cache`` is true or false, and not combined with audio-space augmentation (``dataset.train.aug_p``)."""
    value = cfg.token_cache
    if not isinstance(value, bool):
        raise SettingsError(
            f'token_cache={value}: use token_cache=true (read the token cache) or false (encode audio).'
        )
    if value and float(cfg.dataset.train.get('aug_p') or 0) > 0:
        raise SettingsError(
            f'token_cache=true with dataset.train.aug_p={cfg.dataset.train.aug_p}: audio mixing has no token-space '
            'form. Set dataset.train.aug_p=0, or token_cache=false.'
        )


def refuse_audiocraft_keys(cfg: omegaconf.DictConfig) -> None:
    """audiocraft keys that this solver's hooks replace: a value other than the default stops the run by name."""
    for key, why in REPLACED_AUDIOCRAFT_KEYS.items():
        value = omegaconf.OmegaConf.select(cfg, key)
        if value not in (None, False, [], ''):
            raise AudiogenError(f'{key}={value} is not supported: {why}. Remove the override.')
    codec = omegaconf.OmegaConf.select(cfg, 'compression_model_checkpoint')
    if codec is not None and str(codec) != str(cfg.pretrained):
        raise AudiogenError(
            f'compression_model_checkpoint={codec}: the codec always comes from the pretrained '
            f'package ({cfg.pretrained}), the one its LM was trained on. Remove the override.'
        )


def check_evaluation(cfg: omegaconf.DictConfig) -> None:
    """Check `checkpoint.best_metric` and the evaluate block before training, not at the last epoch.

    An evaluation model (CLAP) that isn't available offline only disables the scores that need it, with a warning,
    unless the best state is chosen by one of them.
    """
    name = str(cfg.checkpoint.best_metric)
    evaluation.metric_mode(name)
    stage, _, key = name.partition('/')
    if stage == 'valid' and key != 'ce':
        raise evaluation.MetricsError(
            f'checkpoint.best_metric={name}: the valid stage reports ce (valid/ce); '
            'evaluation scores are evaluate/<key>.'
        )
    if stage == 'evaluate':
        _check_best_evaluate_metric(cfg, name, key)
    elif stage != 'valid':
        raise evaluation.MetricsError(f'checkpoint.best_metric={name}: use valid/ce or evaluate/<key>.')
    try:
        evaluation.check_models(cfg)
    except evaluation.MetricsError as err:
        if stage == 'evaluate':
            raise
        logger.warning('%s The CLAP-based evaluation scores are skipped in this run.', err)
        cfg.evaluate.clap.model = None


def _check_best_evaluate_metric(cfg: omegaconf.DictConfig, name: str, key: str) -> None:
    """``checkpoint.best_metric=evaluate/<key>``: the score must be computed, by a CLAP when it needs one, often."""
    settings = evaluation.EvalSettings.from_config(cfg)
    if key not in BEST_EVALUATE_METRICS or key not in settings.metrics:
        raise evaluation.MetricsError(
            f'checkpoint.best_metric={name}: evaluate/{key} is not computed; choose valid/ce or one of '
            f'{", ".join("evaluate/" + k for k in BEST_EVALUATE_METRICS)} with evaluate.metrics.<key>=true.'
        )
    if key in evaluation.CLAP_METRICS and not settings.clap_model:
        raise evaluation.MetricsError(
            f'checkpoint.best_metric={name} needs a CLAP model: set evaluate.clap.model (an HF id or a local dir).'
        )
    if not cfg.evaluate.every:
        raise evaluation.MetricsError(
            f'checkpoint.best_metric={name} needs an evaluation every few epochs: set evaluate.every (e.g. 1); '
            'otherwise only the last epoch is evaluated.'
        )


def resolve_precision(cfg: omegaconf.DictConfig) -> None:
    """fp32 on CPU; bf16 autocast where the GPU supports it, else fp16 (which brings a grad scaler)."""
    if not cfg.autocast:
        return
    if not str(cfg.device).startswith('cuda'):
        logger.info('Autocast disabled on %s: training in fp32.', cfg.device)
        cfg.autocast = False
    elif cfg.autocast_dtype == 'bfloat16' and not torch.cuda.is_bf16_supported():
        logger.warning('This GPU has no bf16 support: using fp16 autocast with a grad scaler.')
        cfg.autocast_dtype = 'float16'


def check_schedule(schedule: omegaconf.DictConfig, total_updates: int) -> None:
    """A warmup as long as the run would never decay: refuse it with the numbers.

    Args:
        schedule: the ``schedule`` block.
        total_updates: optimizer updates of the whole run.
    """
    name = schedule.lr_scheduler
    warmup = schedule.get(name, {}).get('warmup') if name else None
    if name in ('cosine', 'polynomial_decay') and warmup is not None and warmup >= total_updates:
        raise SettingsError(
            f'schedule.{name}.warmup={warmup} must be below the {total_updates} updates of the run '
            f'(optim.epochs x optim.updates_per_epoch): lower the warmup or train longer.'
        )
