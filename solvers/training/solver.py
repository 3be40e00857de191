"""The AudioGen fine-tuning solver: audiocraft's AudioGenSolver with hooks for fine-tuning on a modern stack.

What it changes, hook by hook:
- `build_model`: LM architecture and codec come from a pretrained package (HF id or local dir), checked against the
  config; precision is bf16/fp16 autocast on CUDA (fp16 with a grad scaler) and fp32 on CPU.
- `build_dataloaders` + `run_step`: gradient accumulation (N micro-batches per optimizer step, loss scaled by 1/N),
  clipping, a non-finite guard that runs before the optimizer step, and per-update TensorBoard scalars
  (ce, ppl, lr, grad_norm, tokens/s, memory).
- `generate`: fixed prompts from the config, written as -14 LUFS WAVs (no ffmpeg) and logged to TensorBoard.
- `state_dict` / `load_checkpoints` / `save_checkpoints`: checkpoints that `torch.load(weights_only=True)` reads,
  and `checkpoint.keep_last` applied.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import resource
import shlex
import signal
import time
import typing as tp
from pathlib import Path

import flashy
import omegaconf
import torch
from audiocraft import models
from audiocraft.modules.conditioners import ConditioningAttributes
from audiocraft.solvers import builders
from audiocraft.solvers.audiogen import AudioGenSolver
from audiocraft.utils import checkpoint
from audiocraft.utils.utils import get_dataset_from_loader, with_rank_rng

from solvers import atomic, project
from solvers import data as dataprep
from solvers.errors import AudiogenError
from solvers.evaluation import evaluate as evaluation
from solvers.generation import audio_io, fastgen
from solvers.models import adapters, checkpoint_io, lm, package, references
from solvers.models.checkpoint_io import omegaconf_safe_globals
from solvers.training import checkpoints as ckpt
from solvers.training import curves as tb_curves
from solvers.training.slurm import hand_over_to_submitit

logger = logging.getLogger(__name__)


class MicroBatches:
    """Groups a loader's batches by ``n``: one item per optimizer step, holding its ``n`` micro-batches."""

    def __init__(self, loader: torch.utils.data.DataLoader, n: int):
        self.loader, self.n = loader, n
        self.dataset, self.sampler = loader.dataset, loader.sampler

    def __len__(self) -> int:
        return len(self.loader) // self.n

    def __iter__(self) -> tp.Iterator[list]:
        group: list = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.n:
                yield group
                group = []


def _resolve_precision(cfg: omegaconf.DictConfig) -> None:
    """fp32 on CPU; bf16 autocast where the GPU supports it, else fp16 (which brings a grad scaler)."""
    if not cfg.autocast:
        return
    if not str(cfg.device).startswith('cuda'):
        logger.info('Autocast disabled on %s: training in fp32.', cfg.device)
        cfg.autocast = False
    elif cfg.autocast_dtype == 'bfloat16' and not torch.cuda.is_bf16_supported():
        logger.warning('This GPU has no bf16 support: using fp16 autocast with a grad scaler.')
        cfg.autocast_dtype = 'float16'


def _refuse_unsupported(cfg: omegaconf.DictConfig) -> None:
    """Config values this solver can't honour stop the run by name, rather than being silently ignored."""
    if cfg.fsdp.use:
        raise adapters.AdapterError(
            "fsdp.use=true is not supported: audiocraft's FSDP wrapper needs one CUDA device per process and refuses "
            "autocast, and this solver's checkpoints, EMA and LoRA are not sharded. To fine-tune medium on one "
            '24-48 GB GPU use adapter=lora; on several GPUs with a full copy each, `dora run -d` (data parallel).'
        )
    adapters.check_settings(cfg)
    _check_evaluation(cfg)
    decoder = str(cfg.generate.get('decoder') or 'fast')
    if decoder not in fastgen.DECODERS:
        raise AudiogenError(f'generate.decoder={decoder}: choose one of {", ".join(fastgen.DECODERS)}.')
    if decoder == 'graph' and str(cfg.device) != 'cuda':
        raise AudiogenError(
            'generate.decoder=graph captures CUDA graphs and needs device=cuda; use generate.decoder=fast on the CPU.'
        )
    _refuse_audiocraft_keys(cfg)
    if cfg.optim.eager_sync and cfg.optim.grad_accum_steps > 1:
        raise adapters.AdapterError(
            f'optim.eager_sync=true all-reduces gradients during the backward, which gradient accumulation '
            f"(optim.grad_accum_steps={cfg.optim.grad_accum_steps}) can't do: the earlier micro-batches' gradients "
            'would be skipped. Set optim.eager_sync=false (one all-reduce per update) or optim.grad_accum_steps=1.'
        )


def _refuse_audiocraft_keys(cfg: omegaconf.DictConfig) -> None:
    """audiocraft keys that this solver's hooks replace: a value other than the default stops the run by name."""
    refused = {
        'compression_model_n_q': "the LM predicts every codebook of the package's codec",
        'interleave_stereo_codebooks.use': 'AudioGen is mono (channels: 1)',
        'checkpoint.keep_every_states': 'keep epoch checkpoints with checkpoint.save_every and checkpoint.keep_last',
        'cache.path': "audiocraft's token cache is not read by this solver's training loop",
    }
    for key, why in refused.items():
        value = omegaconf.OmegaConf.select(cfg, key)
        if value not in (None, False, [], ''):
            raise AudiogenError(f'{key}={value} is not supported: {why}. Remove the override.')
    codec = omegaconf.OmegaConf.select(cfg, 'compression_model_checkpoint')
    if codec is not None and str(codec) != str(cfg.pretrained):
        raise AudiogenError(
            f'compression_model_checkpoint={codec}: the codec always comes from the pretrained '
            f'package ({cfg.pretrained}), the one its LM was trained on. Remove the override.'
        )
    if int(cfg.optim.max_bad_steps) < 1:
        raise AudiogenError(
            f'optim.max_bad_steps={cfg.optim.max_bad_steps}: it must be at least 1 (consecutive '
            'non-finite steps before the run stops).'
        )


# Evaluation scores that can choose the best state (the codec scores are fixed for a run; clap_real too).
BEST_EVALUATE_METRICS = ('clap', 'kad', 'fad', 'kld')


def _check_evaluation(cfg: omegaconf.DictConfig) -> None:
    """Check `checkpoint.best_metric` and the evaluate block before training, not at the last epoch.

    An evaluation model (CLAP) that isn't available offline only disables the scores that need it, with a warning,
    unless the best state is chosen by one of them.
    """
    name = str(cfg.checkpoint.best_metric)
    evaluation.metric_mode(name)
    stage, _, key = name.partition('/')
    settings = evaluation.EvalSettings.from_config(cfg)
    if stage == 'valid' and key != 'ce':
        raise evaluation.MetricsError(
            f'checkpoint.best_metric={name}: the valid stage reports ce (valid/ce); '
            'evaluation scores are evaluate/<key>.'
        )
    if stage == 'evaluate':
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
    elif stage not in ('valid', 'evaluate'):
        raise evaluation.MetricsError(f'checkpoint.best_metric={name}: use valid/ce or evaluate/<key>.')
    try:
        evaluation.check_models(cfg)
    except evaluation.MetricsError as err:
        if stage == 'evaluate':
            raise
        logger.warning('%s The CLAP-based evaluation scores are skipped in this run.', err)
        cfg.evaluate.clap.model = None


class AudioGenFinetuneSolver(AudioGenSolver):
    """Fine-tunes a pretrained AudioGen package. See the module docstring for the hooks it overrides."""

    def __init__(self, cfg: omegaconf.DictConfig):
        _refuse_unsupported(cfg)
        _resolve_precision(cfg)
        self._bad_steps = 0
        self.rng = ckpt.RNGState(self._private_generators)
        self.position = ckpt.EpochPosition()  # where the current epoch stands, for step checkpoints
        self._stop_signal: int | None = None  # a preemption/timeout signal waiting for the next update boundary
        self._package_state: dict | None = None  # the package LM weights, between build_model and their first use
        self._epochs_run = 0  # epochs trained by this process (0 after a re-run of a finished XP)
        super().__init__(cfg)
        # RNG states make resume exact: the next epoch sees the same data order and dropout draws.
        self.register_stateful('rng', 'position')

    # ---------------------------------------------------------------- model
    def build_model(self) -> None:
        """Load the codec and LM architecture from the package, then build the LM, optimizer, schedule and scaler."""
        self.package = package.resolve(self.cfg.pretrained, base_dir=project.resolve_path('.'))
        # A package's LM file is read once: its config now, its weights (memory-mapped) by their first user. An
        # adapter export's weights are a merge that a resume never needs: :meth:`_take_package_state` makes it.
        if package.adapter_export(self.package) is None:
            package_cfg, self._package_state = package.load_lm(self.package)
        else:
            package_cfg = package.lm_config(self.package)
        package.check_and_merge(self.cfg, package_cfg, self.cfg.pretrained)
        self.compression_model = package.load_compression_model(self.package, self.device)
        codec = self.compression_model
        for key, ours, theirs in (
            ('sample_rate', self.cfg.sample_rate, codec.sample_rate),
            ('transformer_lm.card', self.cfg.transformer_lm.card, codec.cardinality),
            ('transformer_lm.n_q', self.cfg.transformer_lm.n_q, codec.num_codebooks),
        ):
            if ours != theirs:
                raise package.PackageError(
                    f"{key}={ours} in the config but the codec of '{self.cfg.pretrained}' has {theirs}."
                )
        self.logger.info(
            'Codec: %d codebooks x %d bins at %d Hz frames, %d Hz audio.',
            codec.num_codebooks,
            codec.cardinality,
            codec.frame_rate,
            codec.sample_rate,
        )
        self.model: models.LMModel = lm.build_lm_model(self.cfg).to(self.device)
        self.lora: tp.Any = None  # the peft tuner when adapter=lora
        if adapters.enabled(self.cfg):
            self._build_adapters()
        elif self.cfg.freeze.first_layers or self.cfg.freeze.embeddings or self.cfg.freeze.conditioner:
            self.logger.info('Frozen (freeze.*): %s', ', '.join(adapters.freeze(self.model, self.cfg)))
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        trainable, total = adapters.count(self.model)
        self.logger.info(
            'Trainable parameters: %s of %s (%.2f%%).', f'{trainable:,}', f'{total:,}', 100 * trainable / max(total, 1)
        )
        if self.lora is None:
            self.register_ema('model')
        else:  # the EMA, the checkpoint's `model` and the best state hold the adapters only
            self._ema_sources['model'] = self.adapter
            self.stateful.register('model', self.adapter)
            self.register_stateful('adapter_layout')
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        name = self.cfg.schedule.lr_scheduler
        warmup = self.cfg.schedule.get(name, {}).get('warmup') if name else None
        if name in ('cosine', 'polynomial_decay') and warmup is not None and warmup >= self.total_updates:
            raise ValueError(
                f'schedule.{name}.warmup={warmup} must be below the {self.total_updates} updates of the run '
                f'(optim.epochs x optim.updates_per_epoch): lower the warmup or train longer.'
            )
        self.lr_scheduler = builders.get_lr_scheduler(self.optimizer, self.cfg.schedule, self.total_updates)
        self.register_stateful(*(['model'] if self.lora is None else []), 'optimizer', 'lr_scheduler')
        self.register_best_state('model')
        self.autocast_dtype = {'float16': torch.float16, 'bfloat16': torch.bfloat16}[self.cfg.autocast_dtype]
        # audiocraft annotates the deprecated torch.cuda.amp.GradScaler; torch.amp's is the same class today.
        self.scaler: torch.amp.GradScaler | None = None  # type: ignore[assignment]
        if self.cfg.autocast and self.autocast_dtype is torch.float16:
            self.scaler = torch.amp.GradScaler('cuda')
            self.register_stateful('scaler')

    def _build_adapters(self) -> None:
        """Load the package's weights into the base, add LoRA adapters, and prove the output didn't change."""
        self.model.load_state_dict(self._take_package_state())
        before = self._probe_logits()
        self.lora = adapters.inject_lora(self.model, self.cfg.adapter)
        after = self._probe_logits()
        # NaN marks the positions the delay pattern leaves undefined: equal there too.
        if not torch.allclose(before, after, rtol=0, atol=0, equal_nan=True):
            raise adapters.AdapterError(
                f"LoRA changed the model's output before any training (max difference "
                f'{(before - after).nan_to_num().abs().max().item():.3g}); this is a bug, please report it with '
                'the config.'
            )
        adapters.hold_base_in(self.model, self.cfg.adapter.base_dtype, self.device)
        self.adapter = adapters.TrainableState(self.model)
        self.adapter_layout = adapters.layout(self.model)
        self.logger.info(
            "LoRA rank %d on %s: %d adapted weights; the output equals the base model's before the first step.",
            self.cfg.adapter.rank,
            ', '.join(self.cfg.adapter.targets),
            len(self.adapter_layout),
        )

    @torch.no_grad()
    def _probe_logits(self) -> torch.Tensor:
        """The LM's logits for a fixed short input (eval mode: no dropout), to compare models exactly."""
        was_training = self.model.training
        self.model.eval()
        try:
            provider = self.model.condition_provider
            tokenized = provider.tokenize([ConditioningAttributes(text={'description': 'a dog barks in the rain'})])
            conditions = provider(tokenized)
            codes = torch.arange(4 * 8, device=self.device).reshape(1, 4, 8) % self.cfg.transformer_lm.card
            codes = codes[:, : self.cfg.transformer_lm.n_q]
            return self.model.compute_predictions(codes, [], conditions).logits.float().cpu()
        finally:
            self.model.train(was_training)

    def load_from_pretrained(self, name: str) -> dict:
        """Initial weights for a new XP: another XP's best state when ``name`` is a checkpoint, else a package's LM."""
        if Path(name).is_file():
            with torch.serialization.safe_globals(omegaconf_safe_globals()):
                state = checkpoint.load_checkpoint(Path(name))
            best = {key: state[key] for key in ('best_state', 'fsdp_best_state') if key in state}
            holds_lora = any('.lora_' in key for key in (best.get('best_state') or {}).get('model', {}))
            if holds_lora != (self.lora is not None):
                raise adapters.AdapterError(
                    f'continue_from={self.cfg.continue_from}: that checkpoint holds '
                    f'{"LoRA adapters" if self.lora is None else "a full fine-tune"}, but this run is '
                    f'{"a full fine-tune" if self.lora is None else "a LoRA run"}. Export it (python -m '
                    'scripts.export <sig> DIR --merge) and start from the export with pretrained=DIR instead.'
                )
            return best
        if self.lora is not None:
            if name != self.package:
                raise adapters.AdapterError(
                    f'continue_from={name}: a LoRA run takes its base from `pretrained` ({self.package}); to put '
                    f'adapters over another package, pass pretrained={name} instead.'
                )
            return {'best_state': {'model': {k: v.clone() for k, v in self.adapter.state_dict().items()}}}
        if name == self.package:
            return {'best_state': {'model': self._take_package_state()}}
        pkg = package.resolve(name, base_dir=project.resolve_path('.'))
        return {'best_state': {'model': package.lm_state(pkg)}}

    def _take_package_state(self) -> dict:
        """The package's LM weights read by :meth:`build_model` (handed over once; read again after that)."""
        state, self._package_state = self._package_state, None
        return package.lm_state(self.package) if state is None else state

    def initialize_ema(self) -> None:
        """Build the EMA, and make its step a no-op after an update the non-finite guard skipped."""
        super().initialize_ema()
        every, per_epoch = self.cfg.optim.ema.updates, self.train_updates_per_epoch
        if self.ema is not None and per_epoch and every > per_epoch:
            self.logger.warning(
                'optim.ema.updates=%d is longer than an epoch (%d updates): the EMA is stepped at '
                'the end of each epoch instead.',
                every,
                per_epoch,
            )
        if self.ema is not None:
            ema_step = self.ema.step

            def guarded_step() -> None:
                if self._bad_steps == 0:
                    ema_step()

            self.ema.step = guarded_step  # type: ignore[method-assign]

    def _private_generators(self) -> dict[str, torch.Generator]:
        """Generators owned by modules (audiocraft's dropout modules seed their own), by module name."""
        if not hasattr(self, 'model'):
            return {}
        return {
            name: module.rng
            for name, module in self.model.named_modules()
            if isinstance(getattr(module, 'rng', None), torch.Generator)
        }

    # ---------------------------------------------------------------- data
    def build_dataloaders(self) -> None:
        """audiocraft's loaders, with the train loader grouped into micro-batches for accumulation.

        Splits other than train with ``num_samples: null`` read one segment of every clip of their manifest, in
        manifest order: audiocraft's AudioDataset needs a number (``len(loader)`` fails on None) and otherwise draws
        files at random, with replacement.
        """
        accum = self.cfg.optim.grad_accum_steps
        if accum < 1:
            raise ValueError(f'optim.grad_accum_steps must be >= 1, got {accum}.')
        train = self.cfg.dataset.train
        if train.num_samples is None and self.cfg.optim.updates_per_epoch:
            # Sample exactly the segments an epoch consumes (random files and offsets), whatever the dataset size.
            train.num_samples = (
                flashy.distrib.world_size() * self.cfg.dataset.batch_size * accum * self.cfg.optim.updates_per_epoch
            )
        covered = []
        for split in ('valid', 'evaluate', 'generate'):
            path = self.cfg.datasource.get(split)
            if isinstance(path, str) and self.cfg.dataset[split].num_samples is None:
                self.cfg.dataset[split].num_samples = len(dataprep.read_manifest(path))
                covered.append(split)
        super().build_dataloaders()
        for loader in self.dataloaders.values():
            loader.worker_init_fn = functools.partial(_worker_ignores_ctrl_c, chained=loader.worker_init_fn)
        for split in covered:
            if split in self.dataloaders:
                _read_every_clip_once(get_dataset_from_loader(self.dataloaders[split]))
        if 'train' in self.dataloaders:
            self.dataloaders['train'] = MicroBatches(self.dataloaders['train'], accum)  # type: ignore[assignment]

    # ---------------------------------------------------------------- preemption
    def run(self) -> None:
        """audiocraft's epoch loop, with SIGTERM/SIGUSR2 (SLURM preemption, `scontrol requeue`, submitit's
        pre-timeout signal) and a first Ctrl-C (SIGINT) turned into "checkpoint at the next update boundary, then
        stop"; a second Ctrl-C stops at once."""
        signals = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
        previous = {int(sig): signal.signal(sig, self._on_stop_signal) for sig in signals}
        self._previous_handlers: dict[int, tp.Any] = previous
        try:
            super().run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.epoch <= self.cfg.optim.epochs:
            return
        if self._epochs_run == 0:
            self.logger.info(
                'XP %s is complete: it trained all %d epochs before (%s). Nothing to do. To train on from its best '
                'weights, start a new XP with continue_from=//sig/%s (and e.g. optim.epochs=N).',
                self.xp.sig,
                self.cfg.optim.epochs,
                self.folder,
                self.xp.sig,
            )
        self.logger.info('Next:\n%s', '\n'.join(f'  {line}' for line in self.next_commands()))

    def next_commands(self) -> list[str]:
        """The commands that use this XP (curves, generate, export, evaluate): see :func:`project.next_commands`."""
        return project.next_commands(self.cfg, self.xp.sig, self.sample_prompts())

    def _on_stop_signal(self, signum: int, frame: tp.Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            if self._stop_signal == signal.SIGINT:  # the second Ctrl-C: the user wants out now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.logger.warning(
                'Received Ctrl-C: checkpointing at the next update, then stopping (Ctrl-C again to '
                'stop now, losing the updates since the last checkpoint).'
            )
        else:
            self.logger.warning('Received %s: checkpointing at the next update, then stopping.', name)
        self._stop_signal = signum

    def _stop_if_signalled(self, saved: str) -> None:
        """After a checkpoint boundary: hand over to the previous handler (submitit requeues), then exit."""
        signum = self._stop_signal
        if signum is None:
            return
        self.logger.warning(
            'Stopping on %s; %s. Re-run the same command (SLURM requeues it) to resume.',
            signal.Signals(signum).name,
            saved,
        )
        handler = self._previous_handlers.get(signum)
        if callable(handler) and signum != signal.SIGINT:  # Python's SIGINT handler would raise a traceback
            # submitit's checkpoint_and_try_requeue (USR2) requeues the job and exits
            hand_over_to_submitit(handler, signum)
        raise SystemExit(128 + signum)

    def commit(self, save_checkpoints: bool = True) -> None:
        """audiocraft's commit (history + checkpoints), then honour a pending stop signal."""
        self.position.reset()  # the epoch is complete: its checkpoint resumes at the start of the next one
        super().commit(save_checkpoints)
        self._epochs_run += 1
        self._stop_if_signalled(f'epoch {self.epoch - 1} is checkpointed')

    def run_epoch(self) -> None:
        """audiocraft's epoch; when a stage after training fails, the epoch's trained updates are saved first.

        audiocraft saves checkpoints only at the end of an epoch, after valid/evaluate/generate: a crash in those
        stages would throw the whole epoch of training away. A step checkpoint marked "training done" makes the
        re-run go straight back to the failed stage. It is written here, once the stages' EMA/best-state swaps have
        been undone, so it holds the trained weights.
        """
        try:
            self._run_stages()
        except Exception:
            updates = self.train_updates_per_epoch
            if updates and self.position.update >= updates and flashy.distrib.is_rank_zero():
                self._save_step_checkpoint()
                if self._stop_signal is not None:  # e.g. a Ctrl-C that reached the loader's workers too
                    self._stop_if_signalled(f'the {updates} trained updates of epoch {self.epoch} are checkpointed')
                self.logger.error(
                    'Epoch %d failed after its training (error below). Its %d trained updates are saved in %s: fix '
                    'the cause, then re-run the same command to resume from there.',
                    self.epoch,
                    updates,
                    self.folder / 'checkpoint_step.th',
                )
            raise

    def _run_stages(self) -> None:
        """train, then valid and evaluate on this epoch's (EMA) weights, the best state, then samples of the best.

        audiocraft picks the best state right after valid (by the lowest ``ce``) and evaluates the *best* weights;
        here evaluate scores the weights this epoch produced, so ``checkpoint.best_metric`` can be an evaluation
        score (``evaluate/clap``, ...) as well as ``valid/ce``.
        """
        self.run_stage('train', self.train)
        with torch.no_grad():
            with self.swap_ema_state():
                self.run_stage('valid', self.valid)
                if self.should_run_stage('evaluate'):
                    self.run_stage('evaluate', self.evaluate)
                self._update_best_state()
            with self.swap_best_state():
                if self.should_run_stage('generate'):
                    self.run_stage('generate', with_rank_rng()(self.generate))

    def _update_best_state(self) -> None:
        """Keep the current (EMA) weights as the best when this epoch beats the past on `checkpoint.best_metric`."""
        name = self.cfg.checkpoint.best_metric
        self._new_best_state = evaluation.is_new_best(self.history, self._pending_metrics, name)
        if self._new_best_state:
            stage, _, key = name.partition('/')
            self.logger.info('New best state: %s=%.4f', name, self._pending_metrics[stage][key])
            for source in self.best_state.states.keys():
                self.best_state.update(source, self._get_state_source(source))

    def evaluate(self) -> dict:
        """Seeded clips of the valid captions, scored against the valid clips (solvers/evaluation/evaluate.py)."""
        return evaluation.evaluate_stage(self)

    # ---------------------------------------------------------------- train loop
    def train(self) -> dict:
        """One epoch of updates, resumable mid-epoch from a step checkpoint (same data, same RNG draws, same means).

        audiocraft's `common_train_valid` keeps its position and running means in locals; this loop keeps them in
        `self.position`, registered state that a step checkpoint holds. Valid/evaluate still use audiocraft's loop.
        """
        loader = self.dataloaders['train']
        get_dataset_from_loader(loader).current_epoch = self.epoch  # seeds segment sampling per epoch
        if isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler):
            loader.sampler.set_epoch(self.epoch)
        self.model.train()
        position, updates = self.position, self.train_updates_per_epoch
        start = position.update
        if start:
            assert position.epoch_rng is not None and position.rng is not None
            self.logger.info('Resuming epoch %d at update %d of %d.', self.epoch, start, updates)
            self.rng.load_state_dict(position.epoch_rng)  # the loader draws its order and worker seeds from it
        else:
            position.epoch_rng = self.rng.state_dict()
        average = ckpt.RunningMean(position.average if start else None)
        if start >= updates:  # this epoch's training is done; a later stage failed last time
            self.rng.load_state_dict(position.rng)  # type: ignore[arg-type]
            return flashy.distrib.average_metrics(average.value, updates)
        every = self.cfg.checkpoint.save_every_updates
        lp = self.log_progress('train', loader, total=updates, updates=self.log_updates)
        instant = ckpt.RunningMean()
        with self.profiler, self.deadlock_detect:
            for idx, batch in enumerate(self._batches_until_stopped(lp)):
                if idx >= updates:
                    break
                if idx < start:
                    continue  # already trained before the interruption: only the data is replayed
                if idx == start and start:
                    self.rng.load_state_dict(position.rng)  # type: ignore[arg-type]
                    self._bad_steps = position.bad_steps
                try:
                    metrics = self.run_step(idx, batch, {})
                except torch.OutOfMemoryError as err:
                    raise self._out_of_memory(err) from None
                self._step_ema(idx)
                self.profiler.step()
                if lp.update(**instant.update(metrics)):
                    instant = ckpt.RunningMean()
                average.update(metrics)
                position.update, position.average, position.bad_steps = idx + 1, average.state_dict(), self._bad_steps
                stop = self._stop_signal is not None and idx + 1 < updates
                if stop or (every and (idx + 1) % every == 0 and idx + 1 < updates):
                    self._save_step_checkpoint()
                if stop:
                    self._stop_if_signalled(f'update {idx + 1} of epoch {self.epoch} is checkpointed')
            if self._stop_signal is not None and position.update < updates:  # the loader ended with the signal
                self._save_step_checkpoint()
                self._stop_if_signalled(f'update {position.update} of epoch {self.epoch} is checkpointed')
        return flashy.distrib.average_metrics(average.value, updates)

    def _batches_until_stopped(self, batches: tp.Iterable) -> tp.Iterator:
        """``batches``, ended early when the loader fails after a stop signal.

        A terminal's Ctrl-C reaches the loader's workers too. They ignore it once started
        (:func:`_worker_ignores_ctrl_c`), but one still starting can die of it; the loop then stops at the update
        boundary it is on, which `train` checkpoints.
        """
        iterator = iter(batches)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as err:
                if self._stop_signal is None:
                    raise
                self.logger.warning('The data loader stopped with the signal (%s).', str(err).splitlines()[0][:200])
                return
            yield batch

    def _out_of_memory(self, err: BaseException) -> AudiogenError:
        """A training step ran out of GPU memory: free it, and say what the planner expects and what would fit.

        Nothing of this epoch's step is saved: the last checkpoint on disk is the one a re-run resumes from.
        """
        from solvers.training import memory

        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        gpu_gb = (
            torch.cuda.get_device_properties(self.device).total_memory / memory.GB
            if torch.cuda.is_available() and str(self.device).startswith('cuda')
            else 24.0
        )
        argv = list(getattr(getattr(self, 'xp', None), 'argv', []) or [])
        lines = [
            f'Out of GPU memory in update {self.position.update + 1} of epoch {self.epoch} '
            f'({str(err).splitlines()[0][:160]}).'
        ]
        try:
            lines.append(memory.format_plan(memory.plan(self.cfg, gpu_gb, argv), 'The planner expected'))
            fitted = memory.make_it_fit(argv, gpu_gb, project.compose)
        except Exception as plan_err:  # the advice must never hide the error itself
            self.logger.debug('No memory plan: %s', plan_err)
            fitted = None
        if fitted is not None:
            lines.append('Re-run with: dora run ' + shlex.join(fitted.overrides))
        else:
            lines.append(
                'Re-run with adapter=lora transformer_lm.checkpointing=torch, or a smaller dataset.batch_size '
                'with a larger optim.grad_accum_steps (python -m scripts.plan_memory shows what fits).'
            )
        kept = self.checkpoint_path()
        lines.append(
            f'Nothing was lost: {kept if kept.exists() else "the XP folder"} holds the last checkpoint; '
            'a re-run with the same overrides resumes from it. Changing batch or adapter starts a new XP.'
        )
        return AudiogenError('\n'.join(lines))

    def _step_ema(self, idx: int) -> None:
        """Step the EMA every `optim.ema.updates` updates of the run, and at the end of an epoch that had none.

        Otherwise an epoch (or a whole run) shorter than the EMA period would validate, sample and export the
        EMA's untouched base weights; audiocraft's unbiased EMA takes the weights whole at its first step.
        """
        if self.ema is None:
            return
        every, per_epoch = self.cfg.optim.ema.updates, self.train_updates_per_epoch
        first = (self.epoch - 1) * per_epoch
        update = first + idx + 1
        none_this_epoch = (first + per_epoch) // every == first // every
        if update % every == 0 or (idx + 1 == per_epoch and none_this_epoch):
            self.ema.step()

    # ---------------------------------------------------------------- step
    def run_step(self, idx: int, batch: tp.Any, metrics: dict) -> dict:
        """One optimizer step over ``grad_accum_steps`` micro-batches (train), or one valid batch."""
        if not self.is_training:
            return super().run_step(idx, batch, metrics)
        begin = time.time()
        n = len(batch)
        ce_total = torch.zeros((), device=self.device)
        ce_q_total: list[torch.Tensor] = []
        tokens = 0
        for micro in batch:
            condition_tensors, audio_tokens, padding_mask = self._prepare_tokens_and_attributes(micro)
            with self.autocast:
                output = self.model.compute_predictions(audio_tokens, [], condition_tensors)  # type: ignore
                mask = padding_mask & output.mask
                ce, ce_per_codebook = self._compute_cross_entropy(output.logits, audio_tokens, mask)
            # Equal-length segments give every micro-batch the same token count, so the mean of the N
            # micro-batch means is the mean over one batch N times larger.
            loss = ce / n
            # optim.eager_sync (one micro-batch only, checked at build): all-reduce each gradient as the backward
            # produces it, overlapping communication with compute.
            with flashy.distrib.eager_sync_model(self.model) if self.cfg.optim.eager_sync else contextlib.nullcontext():
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            ce_total += ce.detach() / n
            ce_q_total = [q / n + (ce_q_total[k] if ce_q_total else 0) for k, q in enumerate(ce_per_codebook)]
            tokens += int(mask.sum())
        if not self.cfg.optim.eager_sync:
            flashy.distrib.sync_model(self.model)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.optim.max_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_params, max_norm)
        # The guard runs before the optimizer: a non-finite loss or gradient never reaches the weights,
        # the optimizer moments, the EMA or the LR schedule.
        if not (torch.isfinite(grad_norm) and torch.isfinite(ce_total)):
            self._skip_step(idx, ce_total, grad_norm)
            metrics['skipped'] = 1.0
        else:
            self._bad_steps = 0
            metrics['skipped'] = 0.0
            metrics['lr'] = self.optimizer.param_groups[0]['lr']
            stepped = True
            if self.scaler is None:
                self.optimizer.step()
            else:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                stepped = self.scaler.get_scale() >= scale  # the scaler lowers its scale when it skips a step
                metrics['grad_scale'] = self.scaler.get_scale()
            if stepped and self.lr_scheduler is not None:
                self.lr_scheduler.step()
            metrics['grad_norm'] = grad_norm
        self.optimizer.zero_grad(set_to_none=True)
        metrics['ce'] = ce_total
        metrics['ppl'] = torch.exp(ce_total)
        for k, ce_q in enumerate(ce_q_total):
            metrics[f'ce_q{k + 1}'] = ce_q
            metrics[f'ppl_q{k + 1}'] = torch.exp(ce_q)
        metrics['tokens_per_s'] = tokens * flashy.distrib.world_size() / max(time.time() - begin, 1e-9)
        metrics['mem_gb'] = _peak_memory_gb(self.device)
        self._log_update(idx, metrics)
        return metrics

    def _skip_step(self, idx: int, ce: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self._bad_steps += 1
        if self.scaler is not None:
            self.scaler.update()  # an fp16 overflow: lower the scale and try again next step
        self.logger.warning(
            'Non-finite %s at epoch %d update %d: step skipped (%d in a row).',
            'loss' if not torch.isfinite(ce) else 'gradient',
            self.epoch,
            idx + 1,
            self._bad_steps,
        )
        if self._bad_steps >= self.cfg.optim.max_bad_steps:
            raise RuntimeError(
                f'Training diverged: {self._bad_steps} consecutive non-finite steps, the last at epoch {self.epoch} '
                f'update {idx + 1}. The last good checkpoint is {self.checkpoint_path()}. Lower optim.lr or '
                'optim.max_norm, or use autocast_dtype=bfloat16, then re-run the same command to resume from it.'
            )

    def _log_update(self, idx: int, metrics: dict) -> None:
        """Per-update TensorBoard points, so curves show more than one value per epoch."""
        tb = self._tensorboard()
        if tb is None or not flashy.distrib.is_rank_zero():
            return
        keys = ('ce', 'ppl', 'lr', 'grad_norm', 'tokens_per_s', 'mem_gb', 'skipped', 'grad_scale')
        tb.log_update(
            {key: metrics[key] for key in keys if key in metrics},
            (self.epoch - 1) * self.train_updates_per_epoch + idx + 1,
        )

    def init_tensorboard(self, **kwargs: tp.Any) -> None:
        """One TensorBoard run per XP, with ce/ppl curves first (see solvers/training/curves.py).

        Args:
            kwargs: the `tensorboard` config: ``with_media_logging`` (also log the audio samples) and ``name`` (the
                run's name in ``<outputs>/tensorboard/``, default ``<dataset>_<sig>``).
        """
        with_media_logging, name = kwargs.get('with_media_logging', True), kwargs.get('name')
        folder = self.folder / 'tensorboard'
        folder.mkdir(parents=True, exist_ok=True)
        logger = tb_curves.CurvesLogger(folder, lambda: self.train_updates_per_epoch, with_media_logging)
        self.result_logger._experiment_loggers['tensorboard'] = logger
        if flashy.distrib.is_rank_zero():
            tb_curves.link_run(folder, project.outputs_dir(), name or tb_curves.run_name(self.cfg, self.xp.sig))

    def _tensorboard(self) -> tb_curves.CurvesLogger | None:
        """Our TensorBoard logger (flashy keeps its loggers in a private dict), or None when disabled."""
        return tp.cast('tb_curves.CurvesLogger | None', self.result_logger._experiment_loggers.get('tensorboard'))

    # ---------------------------------------------------------------- samples
    @torch.no_grad()
    def generate(self) -> dict:
        """Generate the sample prompts with the current (EMA/best) weights; write and log -14 LUFS WAVs."""
        prompts = self.sample_prompts()
        if not prompts:
            return {}
        self.model.eval()
        begin = time.time()
        sample_rate = self.compression_model.sample_rate
        duration = float(self.cfg.generate.duration)
        attributes = [ConditioningAttributes(text={'description': p}) for p in prompts]
        gen_len = math.ceil(duration * self.compression_model.frame_rate)
        with self.autocast:  # the fast decoder (solvers/generation/fastgen.py): the same tokens as audiocraft's loop
            tokens = fastgen.generate(
                self.model,
                None,
                attributes,
                max_gen_len=gen_len,
                num_samples=len(prompts),
                decoder=str(self.cfg.generate.get('decoder') or 'fast'),
                **self.generation_params,
            )
        audio = self.compression_model.decode(tokens, None).float().cpu()
        rtf = (time.time() - begin) / (duration * len(prompts))
        metrics = {'rtf': rtf}
        if not flashy.distrib.is_rank_zero():
            return metrics
        folder = self.folder / self.cfg.generate.path / f'epoch_{self.epoch:03d}'
        lufs = []
        tb = self._tensorboard()
        for i, (prompt, wav) in enumerate(zip(prompts, audio)):
            wav = audio_io.normalize_loudness(wav, sample_rate, self.cfg.generate.loudness)
            path = audio_io.write_audio(
                folder / f'{i:02d}_{audio_io.slugify(prompt, 40)}.wav', wav, sample_rate, overwrite=True
            )
            lufs.append(audio_io.loudness(wav, sample_rate))
            if tb is not None:
                tb.log_audio(f'{i:02d}_{audio_io.slugify(prompt, 40)}', 'samples', wav, sample_rate, self.epoch)
            self.logger.info("Sample '%s' -> %s", prompt, path)
        finite = [x for x in lufs if math.isfinite(x)]
        if finite:
            metrics['lufs'] = sum(finite) / len(finite)
        return metrics

    def sample_prompts(self) -> list[str]:
        """`generate.prompts` (``[]``: no samples), or when it is null the first `generate.prompts_from_dataset`
        distinct captions of the valid split (then train): samples that speak of the user's own sounds."""
        if self.cfg.generate.prompts is not None:
            return [str(p) for p in self.cfg.generate.prompts]
        if not hasattr(self, '_dataset_prompts'):
            self._dataset_prompts = dataprep.sample_prompts(self.cfg)
            self.logger.info("Sample prompts from the dataset's captions: %s", self._dataset_prompts)
        return self._dataset_prompts

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The solver state in types that weights_only loading accepts: the config as YAML, plain dicts."""
        state = _plain_dicts(super().state_dict())
        if isinstance(state.get('xp.cfg'), omegaconf.DictConfig):
            state['xp.cfg'] = omegaconf.OmegaConf.to_yaml(state['xp.cfg'])
        return state

    def load_checkpoints(self, load_best: bool = False, ignore_state_keys: list[str] = []) -> dict | None:  # noqa: B006 (audiocraft's signature)
        """Resume this XP, else start from `continue_from`, else from the pretrained package.

        Resuming reads the newest loadable of the step, last and epoch checkpoints (a corrupt one is skipped with a
        warning, never silently ignored), and fails if a part of the state is missing unless
        `checkpoint.reset` names it.
        """
        try:
            return self._load_checkpoints(load_best, ignore_state_keys)
        finally:
            self._package_state = None  # a resume never needs the package's weights: don't hold them

    def _load_checkpoints(self, load_best: bool, ignore_state_keys: list[str]) -> dict | None:
        folder = self.folder
        stale = ckpt.clean_stale_tmp(folder) if flashy.distrib.is_rank_zero() else []
        if stale:
            self.logger.warning(
                'Removed %d temporary file(s) left by an interrupted save: %s',
                len(stale),
                ', '.join(p.name for p in stale),
            )
        candidates = self._resume_candidates()
        if candidates and not load_best:
            state = self._load_resume_state(candidates)
            self.load_state_dict(state)
            return state
        if not candidates:
            # audiocraft resolves other continue_from values through `audiocraft.train`, which can't be imported
            # here; route every source through load_from_pretrained instead.
            source = self.cfg.continue_from or self.package
            if not str(source).startswith('//pretrained/'):
                self.logger.info('New XP: initialising the LM from %s', source)
                self.cfg.continue_from = f'//pretrained/{references.continue_source(source, self.package)}'
        # audiocraft then notes "Ignoring 'load_best' and 'ignore_state_keys' params", about parameters no user set.
        quiet = _DropMessage("Loading a pretrained model. Ignoring 'load_best'")
        self.logger.addFilter(quiet)
        try:
            with torch.serialization.safe_globals(omegaconf_safe_globals()):
                return super().load_checkpoints(load_best, ignore_state_keys)
        finally:
            self.logger.removeFilter(quiet)

    def _resume_candidates(self) -> list[Path]:
        """Checkpoints of this XP, newest position first: step, last, then epoch checkpoints by epoch."""
        folder = self.folder
        epochs = sorted(folder.glob('checkpoint_[0-9]*.th'), key=lambda p: int(p.stem.split('_')[1]), reverse=True)
        named = [folder / 'checkpoint_step.th', self.checkpoint_path(use_fsdp=False)]
        return [p for p in named if p.exists()] + epochs

    def _load_resume_state(self, candidates: list[Path]) -> dict:
        errors = []
        for path in candidates:
            try:
                state = checkpoint_io.safe_load(path)
            except checkpoint_io.CheckpointError as err:
                errors.append(str(err))
                self.logger.warning('%s Trying an older checkpoint.', err)
                continue
            update = (state.get('position') or {}).get('update', 0)
            if path.name == 'checkpoint_step.th' and len(state['history']) < self._last_epoch_on_disk(candidates):
                continue  # a step checkpoint older than the last epoch checkpoint
            if errors:
                self.logger.warning(
                    'Resuming from %s (epoch %d) instead of the unreadable checkpoint(s) above.',
                    path,
                    len(state['history']) + 1,
                )
            self._check_complete(state, path)
            for key in self.cfg.checkpoint.reset:
                state.pop(key, None)
            if update:
                self.logger.info('Resuming epoch %d at update %d from %s', len(state['history']) + 1, update, path)
            else:
                self.logger.info('Loading existing checkpoint: %s', path)
            return state
        raise checkpoint_io.CheckpointError(
            'No loadable checkpoint in '
            + str(self.folder)
            + ':\n  '
            + '\n  '.join(errors)
            + '\nRestore a checkpoint from a backup, or move these files away to restart this XP from scratch.'
        )

    def _last_epoch_on_disk(self, candidates: list[Path]) -> int:
        """Epochs completed according to the last/epoch checkpoints' history (0 when none is readable)."""
        for path in candidates:
            if path.name != 'checkpoint_step.th':
                try:
                    return len(checkpoint_io.safe_load(path, mmap=True)['history'])  # mapped: only the history is read
                except checkpoint_io.CheckpointError:
                    continue
        return 0

    def _check_complete(self, state: dict, path: Path) -> None:
        """Every stateful part must be in the checkpoint, unless `checkpoint.reset` restarts it on purpose."""
        reset = set(self.cfg.checkpoint.reset)
        unknown = reset - set(self.stateful.sources)
        if unknown:
            raise ValueError(
                f'checkpoint.reset names unknown parts {sorted(unknown)}; choose among {sorted(self.stateful.sources)}.'
            )
        # `position` is absent from checkpoints written before it was registered: they hold whole epochs.
        optional = ('xp.cfg', 'xp.sig', 'fsdp_best_state', 'position')
        required = {name for name in self.stateful.sources if name not in optional}
        if self.ema is None:
            required.discard('ema')
        missing = sorted(required - set(state) - reset)
        if missing:
            raise checkpoint_io.CheckpointError(
                f'Checkpoint {path} lacks {", ".join(missing)}: resuming would silently restart them. To restart '
                f'them on purpose, add checkpoint.reset=[{",".join(missing)}] to the command.'
            )

    def save_checkpoints(self) -> None:
        """Atomically write the last checkpoint, the best one on a new best, and epoch checkpoints every
        `save_every` epochs, keeping exactly `keep_last` of those; then drop the step checkpoint of the epoch.

        A full disk stops the run with what was kept and how to resume (the writes are atomic: the previous files
        are intact).
        """
        if not flashy.distrib.is_rank_zero():
            return
        epoch = self.epoch - 1  # commit() already appended this epoch to the history
        try:
            self._write_checkpoints(epoch)
        except (OSError, RuntimeError) as err:
            if not ckpt.is_disk_full(err, self.folder):
                raise
            raise checkpoint_io.CheckpointError(
                f'The disk holding {self.folder} is full: saving epoch {epoch} failed ({ckpt.first_line(err)}). '
                f'{ckpt.describe_kept(self.folder)} Free some space (a checkpoint of this XP takes about '
                f'{ckpt.size_text(self.checkpoint_path())}), then re-run the same command: it resumes from there.'
            ) from err
        self.logger.info('Checkpoint saved to %s (epoch %d)', self.checkpoint_path(), epoch)

    def _write_checkpoints(self, epoch: int) -> None:
        state = self.state_dict()
        folder = self.folder
        if self.cfg.checkpoint.save_every and epoch % self.cfg.checkpoint.save_every == 0:
            atomic.save_torch(state, self.epoch_checkpoint_path(epoch))
            keep = self.cfg.checkpoint.keep_last
            if keep is not None and keep >= 0:
                epochs = sorted(folder.glob('checkpoint_[0-9]*.th'), key=lambda p: int(p.stem.split('_')[1]))
                for old in epochs[: max(0, len(epochs) - keep)]:
                    atomic.remove(old)
        if self._new_best_state:
            best = {
                key: state[key]
                for key in ('best_state', 'xp.cfg', 'xp.sig', 'history', 'adapter_layout')
                if key in state
            }
            atomic.save_torch(best, self.checkpoint_path_with_name('best'))
        if self.cfg.checkpoint.save_last:
            atomic.save_torch(state, self.checkpoint_path())
        atomic.remove(folder / 'checkpoint_step.th')

    def _save_step_checkpoint(self) -> None:
        """A mid-epoch checkpoint: the full state, `position` included (where the epoch stands)."""
        if not flashy.distrib.is_rank_zero():
            return
        self.position.rng = self.rng.state_dict()
        atomic.save_torch(self.state_dict(), self.folder / 'checkpoint_step.th')
        self.logger.info('Step checkpoint at epoch %d update %d', self.epoch, self.position.update)


class _ClipByIndex:
    """``AudioDataset.sample_file`` replacement: segment ``i`` comes from clip ``i % len(meta)``.

    A module-level class (not a closure) so the dataset still pickles into forkserver/spawn loader workers.
    """

    def __init__(self, meta: list):
        self.meta = meta

    def __call__(self, index: int, rng: torch.Generator) -> tp.Any:
        return self.meta[index % len(self.meta)]


def _read_every_clip_once(dataset: tp.Any) -> None:
    """Make segment ``i`` of an evaluation split come from clip ``i`` (a random offset inside it, seeded by ``i``).

    audiocraft's AudioDataset.sample_file draws a random file for every segment, so a valid pass of N segments skips
    some clips and reads others twice; a fixed assignment measures every clip, the same way at every epoch.
    """
    dataset.sample_file = _ClipByIndex(dataset.meta)


def _plain_dicts(obj: tp.Any) -> tp.Any:
    """Copy nested dicts as plain dicts: the EMA keeps a defaultdict, which weights_only unpickling refuses."""
    if isinstance(obj, dict):
        return {key: _plain_dicts(value) for key, value in obj.items()}
    return obj


def _peak_memory_gb(device: str) -> float:
    """Peak CUDA memory allocated on this process' GPU, or the process' peak RSS on CPU, in GB."""
    if str(device).startswith('cuda') and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def build_optimizer(model: torch.nn.Module, cfg: omegaconf.DictConfig) -> torch.optim.Optimizer:
    """The optimizer over the model's trainable parameters (audiocraft's parameter groups, frozen ones left out).

    ``optim.optimizer``: audiocraft's adam/adamw/dadam, or ``adamw8bit`` (bitsandbytes' 8-bit AdamW: its two moments
    take 2 bytes per parameter instead of 8; it runs on CPU and CUDA).
    """
    groups = []
    for group in builders.get_optim_parameter_groups(model):
        params = [p for p in group['params'] if p.requires_grad]
        if params:
            groups.append({**group, 'params': params})
    if cfg.optimizer == 'adamw8bit':
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            groups, lr=cfg.lr, betas=tuple(cfg.adam.betas), eps=cfg.adam.eps, weight_decay=cfg.adam.weight_decay
        )
    return builders.get_optimizer(tp.cast(tp.Any, groups), cfg)  # audiocraft accepts groups (annotated too narrowly)


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _worker_ignores_ctrl_c(worker_id: int, chained: tp.Callable[[int], None] | None = None) -> None:
    """A data-loader worker's start: ignore SIGINT, which a terminal's Ctrl-C sends to the whole process group.

    The main process turns a first Ctrl-C into "checkpoint at the next update, then stop" and still needs its
    workers' batches until then; a worker that died of it would fail the loader instead.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if chained is not None:
        chained(worker_id)
