"""The AudioGen fine-tuning solver: audiocraft's AudioGenSolver, one hook per stage, each delegating to a module of
its role (docs/architecture.md lists them hook by hook):

- ``__init__``: config checks (:mod:`solvers.training.settings`); ``build_model``: the package
  (:mod:`solvers.models.package`), LoRA or frozen parts (:mod:`solvers.models.adapters`), the optimizer side
  (:mod:`solvers.training.optim`); ``build_dataloaders``: micro-batches and the token cache
  (:mod:`solvers.training.loaders`, :mod:`solvers.training.token_cache`).
- ``run`` + ``train`` + ``run_step``: gradient accumulation, clipping and the non-finite guard; stop signals become a
  checkpoint at the next update (:mod:`solvers.training.signals`); an epoch resumes mid-way from a step checkpoint.
- ``evaluate`` and ``generate``: through the one generation path (:mod:`solvers.evaluation.evaluate`,
  :mod:`solvers.training.samples`); ``load_checkpoints`` / ``save_checkpoints`` / ``load_from_pretrained``: the
  resume policy and the epoch's files (:mod:`solvers.training.resume`).
"""

from __future__ import annotations

import contextlib
import time
import typing as tp
from pathlib import Path

import flashy
import omegaconf
import torch
from audiocraft import models
from audiocraft.solvers.audiogen import AudioGenSolver
from audiocraft.utils.utils import get_dataset_from_loader, with_rank_rng

from solvers import project
from solvers.evaluation import evaluate as evaluation
from solvers.models import adapters, checkpoint_io, identity, lm, package
from solvers.training import checkpoints as ckpt
from solvers.training import curves as tb_curves
from solvers.training import loaders, memory, optim, resume, samples, settings, signals, token_cache


class AudioGenFinetuneSolver(AudioGenSolver):
    """Fine-tunes a pretrained AudioGen package. See the module docstring for the hooks it overrides.

    Attributes:
        guard: the non-finite guard (:class:`solvers.training.optim.NonFiniteGuard`).
        stop_signals: the stop signals received while running (:class:`solvers.training.signals.StopSignals`).
        position: where the current epoch stands, for step checkpoints (registered state).
    """

    def __init__(self, cfg: omegaconf.DictConfig):
        settings.check(cfg)
        self.guard = optim.NonFiniteGuard(cfg.optim.max_bad_steps)
        self.stop_signals = signals.StopSignals()
        self.rng = ckpt.RNGState(lambda: ckpt.module_generators(getattr(self, 'model', None)))
        self.position = ckpt.EpochPosition()
        self._package_state: dict | None = None  # the package LM weights, between build_model and their first use
        self._epochs_run = 0  # epochs trained by this process (0 after a re-run of a finished XP)
        self._prompts: list[str] | None = None
        self._early_codec: tp.Any = None  # loaded by build_dataloaders when the token cache needs it first
        super().__init__(cfg)
        # RNG states make resume exact: the next epoch sees the same data order and dropout draws.
        self.register_stateful('rng', 'position')

    # ---------------------------------------------------------------- model
    def build_model(self) -> None:
        """Load the codec and LM architecture from the package, then build the LM, optimizer, schedule and scaler."""
        self.package = package.resolve(self.cfg.pretrained, base_dir=project.resolve_path('.'))
        # A new XP pins its package's checksum; a resume refuses a package whose weights changed since.
        resuming = bool(resume.CheckpointFiles(self.folder).candidates())
        identity.pin(self.folder, self.package, resuming, flashy.distrib.is_rank_zero())
        # A package's LM file is read once: its config now, its weights (memory-mapped) by their first user. An
        # adapter export's weights are a merge that a resume never needs: `_take_package_state` makes it.
        if package.adapter_export(self.package) is None:
            package_cfg, self._package_state = package.load_lm(self.package)
        else:
            package_cfg = package.lm_config(self.package)
        package.check_and_merge(self.cfg, package_cfg, self.cfg.pretrained)
        self.compression_model = self._early_codec or package.load_compression_model(self.package, self.device)
        package.check_codec(self.cfg, self.compression_model)
        self.model: models.LMModel = lm.build_lm_model(self.cfg).to(self.device)
        self.lora: tp.Any = None  # the peft tuner when adapter=lora
        if adapters.enabled(self.cfg):
            self.model.load_state_dict(self._take_package_state())
            self.lora, self.adapter, self.adapter_layout = adapters.attach_lora(
                self.model, self.cfg.adapter, self.device
            )
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
        self.optimizer = optim.build_optimizer(self.model, self.cfg.optim)
        self.lr_scheduler = optim.build_lr_scheduler(self.optimizer, self.cfg.schedule, self.total_updates)
        self.register_stateful(*(['model'] if self.lora is None else []), 'optimizer', 'lr_scheduler')
        self.register_best_state('model')
        self.autocast_dtype = {'float16': torch.float16, 'bfloat16': torch.bfloat16}[self.cfg.autocast_dtype]
        # audiocraft annotates the deprecated torch.cuda.amp.GradScaler; torch.amp's is the same class today.
        self.scaler: torch.amp.GradScaler | None = optim.build_scaler(self.cfg.autocast, self.autocast_dtype)  # type: ignore[assignment]
        if self.scaler is not None:
            self.register_stateful('scaler')

    def load_from_pretrained(self, name: str) -> dict:
        """Initial weights for a new XP: another XP's best state when ``name`` is a checkpoint, else a package's LM."""
        if Path(name).is_file():
            return resume.checkpoint_start(Path(name), self.lora is not None, str(self.cfg.continue_from))
        adapter = self.adapter if self.lora is not None else None
        return resume.package_start(name, self.package, adapter, self._take_package_state)

    def _take_package_state(self) -> dict:
        """The package's LM weights read by :meth:`build_model` (handed over once; read again after that)."""
        state, self._package_state = self._package_state, None
        return package.lm_state(self.package) if state is None else state

    def initialize_ema(self) -> None:
        """Build the EMA, and make its step a no-op after an update the non-finite guard skipped."""
        super().initialize_ema()
        if self.ema is not None:
            optim.check_ema_period(self.cfg.optim.ema.updates, self.train_updates_per_epoch)
        if self.ema is not None:
            ema_step = self.ema.step

            def guarded_step() -> None:
                if self.guard.bad_steps == 0:
                    ema_step()

            self.ema.step = guarded_step  # type: ignore[method-assign]

    # ---------------------------------------------------------------- data
    def build_dataloaders(self) -> None:
        """audiocraft's loaders, the train loader grouped into micro-batches (see solvers/training/loaders.py); with
        ``token_cache=true`` the train and valid loaders read the token cache (solvers/training/token_cache.py)."""
        covered = loaders.set_sample_counts(self.cfg)
        super().build_dataloaders()
        if self.cfg.token_cache:
            pkg = package.resolve(self.cfg.pretrained, base_dir=project.resolve_path('.'))
            self._early_codec = package.load_compression_model(pkg, self.device)
            loaders.use_token_cache(self.dataloaders, token_cache.open_for_run(self.cfg, self._early_codec))
        loaders.adjust(self.dataloaders, covered, self.cfg.optim.grad_accum_steps)

    # ---------------------------------------------------------------- epochs
    def run(self) -> None:
        """audiocraft's epoch loop, with SIGTERM/SIGUSR2 (SLURM preemption, `scontrol requeue`, submitit's
        pre-timeout signal) and a first Ctrl-C turned into "checkpoint at the next update boundary, then stop"."""
        with self.stop_signals:
            super().run()
        if self.epoch <= self.cfg.optim.epochs:
            return
        if self._epochs_run == 0:
            self.logger.info(resume.complete_message(self.xp.sig, self.cfg.optim.epochs, self.folder))
        self.logger.info('Next:\n%s', '\n'.join(f'  {line}' for line in self.next_commands()))

    def next_commands(self) -> list[str]:
        """The commands that use this XP (curves, generate, export, evaluate): see :func:`project.next_commands`."""
        return project.next_commands(self.cfg, self.xp.sig, self.sample_prompts()[:1])

    def commit(self, save_checkpoints: bool = True) -> None:
        """audiocraft's commit (history + checkpoints), then honour a pending stop signal."""
        self.position.reset()  # the epoch is complete: its checkpoint resumes at the start of the next one
        super().commit(save_checkpoints)
        self._epochs_run += 1
        self.stop_signals.stop_if_signalled(f'epoch {self.epoch - 1} is checkpointed')

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
                saved = f'the {updates} trained updates of epoch {self.epoch} are checkpointed'
                self.stop_signals.stop_if_signalled(saved)  # e.g. a Ctrl-C that reached the loader's workers too
                self.logger.error(
                    'Epoch %d failed after its training (error below). Its %d trained updates are saved in %s: fix '
                    'the cause, then re-run the same command to resume from there.',
                    self.epoch,
                    updates,
                    resume.CheckpointFiles(self.folder).step,
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
                self.update_best_state()
            with self.swap_best_state():
                if self.should_run_stage('generate'):
                    self.run_stage('generate', with_rank_rng()(self.generate))

    def update_best_state(self) -> bool:
        """Keep the current (EMA) weights as the best when this epoch's stages beat the past on
        `checkpoint.best_metric`; return whether they did."""
        name = self.cfg.checkpoint.best_metric
        self._new_best_state = evaluation.is_new_best(self.history, self._pending_metrics, name)
        if self._new_best_state:
            stage, _, key = name.partition('/')
            self.logger.info('New best state: %s=%.4f', name, self._pending_metrics[stage][key])
            for source in self.best_state.states.keys():
                self.best_state.update(source, self._get_state_source(source))
        return self._new_best_state

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
        average = ckpt.RunningMean(position.average if start else None)
        if start:
            self.logger.info('Resuming epoch %d at update %d of %d.', self.epoch, start, updates)
            self.rng.load_state_dict(position.epoch_rng)  # type: ignore[arg-type]  # the loader's order and seeds
        else:
            position.epoch_rng = self.rng.state_dict()
        if start >= updates:  # this epoch's training is done; a later stage failed last time
            self.rng.load_state_dict(position.rng)  # type: ignore[arg-type]
            return flashy.distrib.average_metrics(average.value, updates)
        lp = self.log_progress('train', loader, total=updates, updates=self.log_updates)
        instant = ckpt.RunningMean()
        with self.profiler, self.deadlock_detect:
            for idx, batch in enumerate(self.stop_signals.batches_until_stopped(lp)):
                if idx >= updates:
                    break
                if idx < start:
                    continue  # already trained before the interruption: only the data is replayed
                if idx == start and start:
                    self.rng.load_state_dict(position.rng)  # type: ignore[arg-type]
                    self.guard.bad_steps = position.bad_steps
                metrics = self._train_update(idx, batch)
                if lp.update(**instant.update(metrics)):
                    instant = ckpt.RunningMean()
                average.update(metrics)
                position.update, position.average, position.bad_steps = (
                    idx + 1,
                    average.state_dict(),
                    self.guard.bad_steps,
                )
                self._checkpoint_if_due(idx + 1, updates)
            if self.stop_signals.pending is not None and position.update < updates:  # the loader ended with it
                self._checkpoint_if_due(position.update, updates, stop=True)
        return flashy.distrib.average_metrics(average.value, updates)

    def _train_update(self, idx: int, batch: list) -> dict:
        """One update, its EMA step and profiler step; running out of GPU memory says what would fit."""
        try:
            metrics = self.run_step(idx, batch, {})
        except torch.OutOfMemoryError as err:
            self.optimizer.zero_grad(set_to_none=True)
            where = f'update {self.position.update + 1} of epoch {self.epoch}'
            argv = list(getattr(getattr(self, 'xp', None), 'argv', []) or [])
            raise memory.out_of_memory_error(err, self.cfg, argv, where, self.checkpoint_path()) from None
        if self.ema is not None:
            if optim.ema_due(self.epoch, idx, self.train_updates_per_epoch, self.cfg.optim.ema.updates):
                self.ema.step()
        self.profiler.step()
        return metrics

    def _checkpoint_if_due(self, done: int, updates: int, stop: bool = False) -> None:
        """A step checkpoint every `checkpoint.save_every_updates` updates, and before stopping on a signal."""
        stop = stop or (self.stop_signals.pending is not None and done < updates)
        every = self.cfg.checkpoint.save_every_updates
        if stop or (every and done % every == 0 and done < updates):
            self._save_step_checkpoint()
        if stop:
            self.stop_signals.stop_if_signalled(f'update {done} of epoch {self.epoch} is checkpointed')

    def run_step(self, idx: int, batch: tp.Any, metrics: dict) -> dict:
        """One optimizer step over ``grad_accum_steps`` micro-batches (train), or one valid batch."""
        if not self.is_training:
            return super().run_step(idx, batch, metrics)
        begin = time.time()
        ce, ce_per_codebook, tokens = self._accumulate(batch)
        parts = (self.optimizer, self.trainable_params, self.cfg.optim.max_norm, self.scaler, self.lr_scheduler)
        step = optim.apply_update(*parts, self.guard, ce)
        if step['skipped']:
            self.guard.skip(ce, f'epoch {self.epoch} update {idx + 1}', self.checkpoint_path())
        metrics.update(step, ce=ce, ppl=torch.exp(ce))
        for k, ce_q in enumerate(ce_per_codebook):
            metrics[f'ce_q{k + 1}'], metrics[f'ppl_q{k + 1}'] = ce_q, torch.exp(ce_q)
        metrics['tokens_per_s'] = tokens * flashy.distrib.world_size() / max(time.time() - begin, 1e-9)
        metrics['mem_gb'] = memory.peak_memory_gb(self.device)
        self._log_update(idx, metrics)
        return metrics

    def _accumulate(self, batch: list) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """Forward and backward over the micro-batches: the mean ce, per codebook too, and the tokens counted."""
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
        return ce_total, ce_q_total, tokens

    def _prepare_tokens_and_attributes(self, batch: tp.Any, check_synchronization_points: bool = False) -> tuple:
        """audiocraft's, for audio batches; for the token cache's batches (integer codes) the codec is skipped."""
        with token_cache.codes_in_place_of_codec(self, batch):
            return super()._prepare_tokens_and_attributes(batch, check_synchronization_points)

    def _log_update(self, idx: int, metrics: dict) -> None:
        """Per-update TensorBoard points, so curves show more than one value per epoch."""
        tb = tb_curves.installed(self.result_logger)
        if tb is not None and flashy.distrib.is_rank_zero():
            update = (self.epoch - 1) * self.train_updates_per_epoch + idx + 1
            tb.log_update({key: metrics[key] for key in tb_curves.UPDATE_KEYS if key in metrics}, update)

    def init_tensorboard(self, **kwargs: tp.Any) -> None:
        """One TensorBoard run per XP, with ce/ppl curves first (see solvers/training/curves.py).

        Args:
            kwargs: the `tensorboard` config: ``with_media_logging`` (also log the audio samples) and ``name`` (the
                run's name in ``<outputs>/tensorboard/``, default ``<dataset>_<sig>``).
        """
        folder, media = self.folder / 'tensorboard', kwargs.get('with_media_logging', True)
        tb_curves.install(self.result_logger, folder, lambda: self.train_updates_per_epoch, media)
        if flashy.distrib.is_rank_zero():
            name = kwargs.get('name') or tb_curves.run_name(self.cfg, self.xp.sig)
            tb_curves.link_run(folder, project.outputs_dir(), name)

    # ---------------------------------------------------------------- samples
    @torch.no_grad()
    def generate(self) -> dict:
        """The sample prompts with the current (EMA/best) weights, as -14 LUFS WAVs (solvers/training/samples.py)."""
        prompts = self.sample_prompts()
        if not prompts:
            return {}
        name = f'xp:{self.xp.sig}'
        clips, rtf = samples.generate_samples(
            self.cfg, self.model, self.compression_model, self.autocast, prompts, name
        )
        if not flashy.distrib.is_rank_zero():
            return {'rtf': rtf}
        rate = int(self.compression_model.sample_rate)
        written = samples.write_samples(
            self.cfg.generate, self.folder, self.epoch, prompts, clips, rate, tb_curves.installed(self.result_logger)
        )
        return {'rtf': rtf, **written}

    def sample_prompts(self) -> list[str]:
        """The sample prompts (see :func:`solvers.training.samples.sample_prompts`), read once per run."""
        if self._prompts is None:
            self._prompts = samples.sample_prompts(self.cfg)
        return self._prompts

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The solver state in types that weights_only loading accepts: the config as YAML, plain dicts."""
        state = resume.plain_dicts(super().state_dict())
        if isinstance(state.get('xp.cfg'), omegaconf.DictConfig):
            state['xp.cfg'] = omegaconf.OmegaConf.to_yaml(state['xp.cfg'])
        return state

    def load_checkpoints(self, load_best: bool = False, ignore_state_keys: list[str] = []) -> dict | None:  # noqa: B006 (audiocraft's signature)
        """Resume this XP (:func:`solvers.training.resume.load_resume_state`), else start from `continue_from`,
        else from the pretrained package."""
        try:
            files = resume.CheckpointFiles(self.folder)
            if flashy.distrib.is_rank_zero():
                resume.clean_stale(self.folder)
            if files.candidates() and not load_best:
                state = resume.load_resume_state(
                    files, self.stateful.sources, self.cfg.checkpoint.reset, self.ema is not None
                )
                self.load_state_dict(state)
                return state
            if not files.candidates():
                self.cfg.continue_from = resume.pretrained_source(self.cfg.continue_from, self.package)
            # audiocraft then notes "Ignoring 'load_best' and 'ignore_state_keys' params", about parameters no user set.
            quiet = resume.DropMessage("Loading a pretrained model. Ignoring 'load_best'")
            self.logger.addFilter(quiet)
            try:
                with torch.serialization.safe_globals(checkpoint_io.omegaconf_safe_globals()):
                    return super().load_checkpoints(load_best, ignore_state_keys)
            finally:
                self.logger.removeFilter(quiet)
        finally:
            self._package_state = None  # a resume never needs the package's weights: don't hold them

    def save_checkpoints(self) -> None:
        """Atomically write the epoch's checkpoints (:func:`solvers.training.resume.write_epoch`); a full disk stops
        the run with what was kept and how to resume (the writes are atomic: the previous files are intact)."""
        if not flashy.distrib.is_rank_zero():
            return
        epoch = self.epoch - 1  # commit() already appended this epoch to the history
        files = resume.CheckpointFiles(self.folder)
        try:
            resume.write_epoch(self.state_dict(), files, epoch, self.cfg.checkpoint, self._new_best_state)
        except (OSError, RuntimeError) as err:
            full = resume.explain_disk_full(err, files, epoch)
            if full is None:
                raise
            raise full from err
        self.logger.info('Checkpoint saved to %s (epoch %d)', files.last, epoch)

    def _save_step_checkpoint(self) -> None:
        """A mid-epoch checkpoint: the full state, `position` included (where the epoch stands)."""
        if not flashy.distrib.is_rank_zero():
            return
        self.position.rng = self.rng.state_dict()
        resume.save_step(self.state_dict(), resume.CheckpointFiles(self.folder))
        self.logger.info('Step checkpoint at epoch %d update %d', self.epoch, self.position.update)
