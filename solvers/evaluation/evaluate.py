"""Judging a model on the user's sounds: seeded clips of the valid captions, scored against the valid clips.

Two entry points share one scorer (:class:`Judge`):

- :func:`evaluate_stage`, the solver's evaluate stage: every ``evaluate.every`` epochs (and at the last), generate
  ``evaluate.num_prompts`` captions of the valid split x ``evaluate.seeds`` with the weights under evaluation, and
  return the scores (see ``metrics.HIGHER_IS_BETTER``) that audiocraft logs to history and TensorBoard.
- :func:`evaluate_models` (``scripts/evaluate.py``): the same scores for one or more models (HF id, package,
  export, XP), with the clips, ``report.json``, ``summary.md`` and a listening page written to a new folder.

Generation is :mod:`solvers.generation.generate`'s seeded sampling:
clip (prompt, seed) draws from its own generator, so the
same seeds make epochs and models differ by their weights only. Generated and real clips are compared at the same
loudness (-14 LUFS) and length (the generation duration). Evaluation models (CLAP, PaSST) load once per process
and are never part of the XP's config signature or checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import time
import typing as tp
import weakref
from pathlib import Path

import torch

from solvers import atomic, project
from solvers.evaluation import metrics
from solvers.evaluation.metrics import DEFAULT_CLAP, MetricsError
from solvers.generation import audio_io
from solvers.generation import generate as generation

logger = logging.getLogger(__name__)

CLAP_METRICS = ('clap', 'kad', 'fad')
ALL_METRICS = (*CLAP_METRICS, 'codec', 'kld')
CODEC_SECONDS = 10.0  # seconds of each real clip the codec reconstructs (the medium model's window)
# audiocraft's evaluate flags that this stage replaces: present so audiocraft's own stage reads them, never true.
UNSUPPORTED_FLAGS = {
    'base': "audiocraft's ce on an evaluate split; the valid stage already logs valid ce",
    'text_consistency': "audiocraft's name for the CLAP score: use evaluate.metrics.clap",
    'chroma_cosine': 'MusicGen melody conditioning only',
}


# ---------------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What to generate and which scores to compute.

    Attributes:
        seeds: seeds of each prompt's clips.
        duration: seconds per generated clip; real clips are cut to it.
        metrics: enabled scores among ``ALL_METRICS``.
        clap_model: HF id, local dir, ``tiny``, or None (no CLAP: the clap/kad/fad scores are skipped).
        num_prompts: distinct valid captions to generate (None: all).
        references: real clips in the reference set (the first N of the manifest; None: all).
        max_batch: clips per generation forward pass.
        clap_batch: clips per CLAP forward pass.
        loudness: LUFS at which generated and real clips are compared.
    """

    seeds: tuple[int, ...] = (0, 1)
    duration: float = 5.0
    metrics: frozenset[str] = frozenset({'clap', 'kad', 'codec'})
    clap_model: str | None = DEFAULT_CLAP
    num_prompts: int | None = None
    references: int | None = None
    max_batch: int = 16
    clap_batch: int = 16
    loudness: float = -14.0

    @classmethod
    def from_config(cls, cfg: tp.Any) -> EvalSettings:
        """Read and check the ``evaluate`` block of a solver config.

        Raises:
            MetricsError: naming the first bad key, its value and the fix.
        """
        ev = cfg.evaluate
        flags = ev.metrics
        for key, why in UNSUPPORTED_FLAGS.items():
            if flags.get(key):
                raise MetricsError(
                    f"evaluate.metrics.{key}=true is not supported by this project's evaluate stage "
                    f'({why}); set it to false.'
                )
        unknown = set(flags) - set(ALL_METRICS) - set(UNSUPPORTED_FLAGS)
        if unknown:
            raise MetricsError(f'Unknown evaluate.metrics key(s) {sorted(unknown)}: choose among {list(ALL_METRICS)}.')
        seeds = list(ev.seeds or [])
        integers = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
        if not seeds or not integers or len(set(seeds)) != len(seeds):
            raise MetricsError(f'evaluate.seeds={seeds}: give a list of distinct non-negative integers, e.g. [0,1].')
        duration = ev.duration if ev.duration is not None else cfg.generate.duration
        limits = (
            ('evaluate.num_prompts', ev.num_prompts, 1),
            ('evaluate.max_batch', ev.max_batch, 1),
            ('evaluate.clap.batch_size', ev.clap.batch_size, 1),
            ('evaluate.references', ev.references, 2),
        )
        for key, value, minimum in limits:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
                raise MetricsError(f'{key}={value}: give an integer >= {minimum}.')
        if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
            raise MetricsError(
                f'evaluate.duration={ev.duration} (generate.duration={cfg.generate.duration}): the '
                "clips' length must be a positive number of seconds."
            )
        clap = ev.clap.model
        return cls(
            seeds=tuple(int(s) for s in seeds),
            duration=float(duration),
            metrics=frozenset(k for k in ALL_METRICS if flags.get(k)),
            clap_model=None if clap in (None, '', 'none') else str(clap),
            num_prompts=ev.num_prompts,
            references=ev.references,
            max_batch=int(ev.max_batch),
            clap_batch=int(ev.clap.batch_size),
            loudness=float(cfg.generate.loudness),
        )


def check_models(cfg: tp.Any) -> None:
    """Fail fast, before training, when the evaluation can't run: a bad ``evaluate`` key or an uncached CLAP.

    Reads the CLAP config only, and checks offline that its weights are cached too. The PaSST KL is optional: its
    absence is logged, not raised.
    """
    settings = EvalSettings.from_config(cfg)
    if settings.metrics & set(CLAP_METRICS) and settings.clap_model:
        from transformers import ClapConfig

        resolved = metrics.resolve_clap(settings.clap_model)
        metrics.load_pretrained(ClapConfig, resolved)
        metrics.check_cached_weights(resolved)
    if 'kld' in settings.metrics and (reason := metrics.passt_unavailable()):
        logger.warning(reason)


# ---------------------------------------------------------------------------------------------------- real clips
@dataclasses.dataclass
class RealClip:
    """A clip of the valid split: its file, caption, and audio (loaded on demand) at the codec's rate."""

    path: Path
    caption: str | None
    wav: torch.Tensor | None = None


def clip_caption(path: Path) -> str | None:
    """The caption in the JSON beside a prepared clip (``description``, a string or a list), or None."""
    try:
        info = json.loads(path.with_suffix('.json').read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    text = info.get('description')
    text = text[0] if isinstance(text, list) and text else text
    return text.strip() if isinstance(text, str) and text.strip() else None


def read_real_clips(split_dir: str | Path) -> list[RealClip]:
    """The clips of a prepared split's manifest, in manifest order, with their captions (audio not read yet)."""
    from solvers.data import read_manifest

    clips = []
    for entry in read_manifest(project.resolve_path(split_dir)):
        path = project.resolve_path(entry['path'])
        clips.append(RealClip(path, clip_caption(path)))
    return clips


def load_audio(clip: RealClip, sample_rate: int, channels: int, seconds: float) -> torch.Tensor:
    """Read (once) the first ``seconds`` of a clip as float32 [channels, T] at ``sample_rate``."""
    if clip.wav is None:
        import soundfile
        import torchaudio.functional as AF

        try:
            info = soundfile.info(str(clip.path))
            data, rate = soundfile.read(
                str(clip.path), frames=int(math.ceil(seconds * info.samplerate)), dtype='float32', always_2d=True
            )
        except (OSError, RuntimeError) as err:
            raise MetricsError(
                f'Cannot read the valid clip {clip.path} ({err}); re-run scripts/prepare_dataset.py for this dataset.'
            ) from err
        wav = torch.from_numpy(data.T.copy())
        if rate != sample_rate:
            wav = AF.resample(wav, rate, sample_rate)
        if wav.shape[0] != channels:
            wav = wav.mean(0, keepdim=True).expand(channels, -1).clone()
        clip.wav = wav
    return clip.wav[..., : int(seconds * sample_rate)]


def distinct_captions(clips: tp.Sequence[RealClip], limit: int | None = None) -> list[str]:
    """Distinct captions in manifest order, at most ``limit``."""
    found: list[str] = []
    for clip in clips:
        if clip.caption and clip.caption not in found:
            found.append(clip.caption)
    return found[:limit] if limit else found


# ---------------------------------------------------------------------------------------------------- scoring
@dataclasses.dataclass
class Scores:
    """What :meth:`Judge.score` found: the scores, each clip's CLAP score, and why some scores are absent."""

    metrics: dict[str, float]
    clip_clap: list[float] | None
    skipped: dict[str, str]


class Judge:
    """The evaluation models of a run, and the real set's embeddings, loaded and computed once.

    Args:
        settings: which scores, which CLAP.
        device: where CLAP and PaSST run.
    """

    def __init__(self, settings: EvalSettings, device: str):
        self.settings = settings
        self.skipped: dict[str, str] = {}
        self.clap: metrics.ClapScorer | None = None
        wanted = [m for m in CLAP_METRICS if m in settings.metrics]
        if wanted and settings.clap_model:
            self.clap = metrics.get_clap(settings.clap_model, str(device), settings.clap_batch)
        elif wanted:
            self.skipped.update(
                {m: 'no CLAP model was chosen (evaluate.clap.model / --clap-model is none)' for m in wanted}
            )
        self.passt: metrics.PasstKL | None = None
        if 'kld' in settings.metrics:
            reason = metrics.passt_unavailable()
            if reason:
                self.skipped['kld'] = reason
                logger.warning(reason)
            else:
                self.passt = metrics.PasstKL(str(device))
        self.real_embeddings: torch.Tensor | None = None
        self.real_metrics: dict[str, float] = {}

    def set_real(
        self, wavs: tp.Sequence[torch.Tensor], captions: tp.Sequence[str | None], sample_rate: int
    ) -> list[float | None]:
        """Embed the real set (at the comparison loudness); return each real clip's CLAP score with its caption."""
        per_clip: list[float | None] = [None] * len(wavs)
        if self.clap is None or not wavs:
            return per_clip
        wavs = [audio_io.normalize_loudness(w, sample_rate, self.settings.loudness) for w in wavs]
        self.real_embeddings = self.clap.embed_audio(wavs, sample_rate)
        captioned = [i for i, c in enumerate(captions) if c]
        if captioned and 'clap' in self.settings.metrics:
            text = self.clap.embed_text([captions[i] for i in captioned])  # type: ignore[misc]
            scores = metrics.clap_cosine(text, self.real_embeddings[captioned]).tolist()
            for i, score in zip(captioned, scores):
                per_clip[i] = score
            self.real_metrics['clap_real'] = sum(scores) / len(scores)
        return per_clip

    def score(
        self,
        prompts: tp.Sequence[str],
        wavs: tp.Sequence[torch.Tensor],
        sample_rate: int,
        partners: tp.Sequence[torch.Tensor | None] | None = None,
    ) -> Scores:
        """Score generated clips (already at the comparison loudness) against the real set.

        Args:
            prompts: each clip's prompt.
            wavs: [C, T] clips at ``sample_rate``.
            partners: for the PaSST KL, each clip's real counterpart (a valid clip of the same caption) or None.
        """
        out: dict[str, float] = dict(self.real_metrics)
        skipped = dict(self.skipped)
        clip_clap = None
        if self.clap is not None:
            embeddings = self.clap.embed_audio(wavs, sample_rate)
            if 'clap' in self.settings.metrics:
                clip_clap = metrics.clap_cosine(self.clap.embed_text(prompts), embeddings).tolist()
                out['clap'] = sum(clip_clap) / len(clip_clap)
            real = self.real_embeddings
            for key, fn in (('fad', metrics.frechet_distance), ('kad', metrics.kernel_audio_distance)):
                if key not in self.settings.metrics:
                    continue
                if real is None or len(real) < 2 or len(wavs) < 2:
                    skipped[key] = (
                        f'{key.upper()} needs at least 2 generated and 2 real clips '
                        f'({len(wavs)} and {0 if real is None else len(real)} here).'
                    )
                else:
                    out[key] = fn(embeddings, real)
        if self.passt is not None:
            pairs = [(w, p) for w, p in zip(wavs, partners or []) if p is not None]
            if pairs:
                out['kld'] = self.passt([w for w, _ in pairs], [p for _, p in pairs], sample_rate)
            else:
                skipped['kld'] = 'PaSST KL needs a real clip with the same caption as each prompt (use --dataset).'
        return Scores({k: v for k, v in out.items() if math.isfinite(v)}, clip_clap, skipped)


# ---------------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class _StageState:
    """Per-solver evaluation state that doesn't change between epochs (the real set, the codec scores)."""

    key: tuple
    judge: Judge
    prompts: list[str]
    partners: dict[str, torch.Tensor]
    codec: dict[str, float]


_STAGE_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # solver -> _StageState, freed with it


def _stage_state(solver: tp.Any, settings: EvalSettings) -> _StageState:
    cfg = solver.cfg
    valid = cfg.datasource.get('valid')
    if not valid:
        raise MetricsError(
            'The evaluate stage scores clips against the valid split, but datasource.valid is not set: '
            'pass dataset=NAME (a dataset prepared with scripts/prepare_dataset.py).'
        )
    key = (str(project.resolve_path(valid)), settings)
    state = _STAGE_STATES.get(solver)
    if state is not None and state.key == key:
        return state
    codec = solver.compression_model
    rate, channels = int(codec.sample_rate), int(codec.channels)
    clips = read_real_clips(valid)
    prompts = distinct_captions(clips, settings.num_prompts)
    if not prompts:
        raise MetricsError(
            f"No valid clip of {valid} has a caption (the JSON beside each clip, key 'description'): "
            're-run scripts/prepare_dataset.py for this dataset.'
        )
    real = clips[: settings.references]
    judge = Judge(settings, str(solver.device))
    judge.set_real([load_audio(c, rate, channels, settings.duration) for c in real], [c.caption for c in real], rate)
    partners = {
        p: load_audio(next(c for c in clips if c.caption == p), rate, channels, settings.duration) for p in prompts
    }
    scores = {}
    if 'codec' in settings.metrics:
        scores = metrics.codec_fidelity(codec, [load_audio(c, rate, channels, CODEC_SECONDS) for c in real], rate)
    for clip in clips:
        clip.wav = None  # only the embeddings and the partners are needed from now on
    state = _StageState(key, judge, prompts, partners, scores)
    _STAGE_STATES[solver] = state
    return state


def evaluate_stage(solver: tp.Any) -> dict[str, float]:
    """The solver's evaluate stage: generate the valid captions with fixed seeds, return the scores.

    audiocraft calls it with the weights under evaluation already swapped in. Keys are those of
    ``metrics.HIGHER_IS_BETTER`` that ``evaluate.metrics`` enables (history ``evaluate/<key>``, TensorBoard
    ``quality/<key>``). On several GPUs rank 0 evaluates and the others receive its scores.

    Args:
        solver: the running solver (reads ``cfg``, ``model``, ``compression_model``, ``device``, ``autocast``).
    """
    import flashy

    settings = EvalSettings.from_config(solver.cfg)
    if not settings.metrics:
        return {}
    if flashy.distrib.world_size() == 1:
        return _evaluate_here(solver, settings)
    result: list[tp.Any] = [_evaluate_here(solver, settings) if flashy.distrib.is_rank_zero() else None]
    torch.distributed.broadcast_object_list(result, src=0)
    return result[0]


@torch.no_grad()
def _evaluate_here(solver: tp.Any, settings: EvalSettings) -> dict[str, float]:
    begin = time.time()
    state = _stage_state(solver, settings)
    rate = int(solver.compression_model.sample_rate)
    clips = stage_clips(solver, state.prompts, settings)
    keys = [(p, s) for p in state.prompts for s in settings.seeds]
    wavs = [audio_io.normalize_loudness(clips[k], rate, settings.loudness) for k in keys]
    scores = state.judge.score([p for p, _ in keys], wavs, rate, [state.partners.get(p) for p, _ in keys])
    for key, reason in scores.skipped.items():
        logger.info('evaluate/%s not computed: %s', key, reason)
    out = {**scores.metrics, **state.codec}
    logger.info(
        'Evaluated %s (%s x %s) in %.1f s.',
        project.counted(len(keys), 'clip'),
        project.counted(len(state.prompts), 'caption'),
        project.counted(len(settings.seeds), 'seed'),
        time.time() - begin,
    )
    return out


def stage_clips(
    solver: tp.Any, prompts: tp.Sequence[str], settings: EvalSettings
) -> dict[tuple[str, int], torch.Tensor]:
    """The evaluate stage's clips: ``prompts`` x ``settings.seeds`` with the solver's current weights, generated by
    :func:`generation.generate_clips` (what scripts/generate.py runs) with training's sampling settings.

    Args:
        solver: the running solver (reads ``cfg``, ``model``, ``compression_model``, ``autocast``, ``xp``).
        prompts: the captions to generate.
        settings: seeds, duration and batch size.
    Returns:
        [C, T] float32 CPU clips by (prompt, seed), before loudness normalisation.
    """
    cfg, training = solver.cfg, solver.model.training
    try:
        model = generation.training_audiogen(
            f'xp:{getattr(getattr(solver, "xp", None), "sig", "solver")}',
            solver.compression_model,
            solver.model,
            decoder=str(cfg.generate.get('decoder') or 'fast'),
            segment_duration=float(cfg.dataset.segment_duration),
            duration=settings.duration,
            autocast=solver.autocast,
        )
        generation.GenerationParams.from_config(cfg, settings.duration).apply(model)
        return generation.generate_clips(model, prompts, settings.seeds, settings.max_batch)
    finally:
        solver.model.train(training)


# ---------------------------------------------------------------------------------------------------- best state
def metric_mode(name: str) -> str:
    """``min`` or ``max``: which way ``<stage>/<key>`` is better (``valid/ce`` and unknown losses: min).

    Raises:
        MetricsError: a name without a stage, e.g. ``clap`` instead of ``evaluate/clap``.
    """
    stage, _, key = name.partition('/')
    if not key:
        raise MetricsError(
            f"Best metric '{name}' needs its stage: valid/ce, or evaluate/<key> with key among "
            f'{", ".join(metrics.HIGHER_IS_BETTER)}.'
        )
    return 'max' if metrics.HIGHER_IS_BETTER.get(key, False) else 'min'


def best_epoch(history: tp.Sequence[dict], name: str) -> int | None:
    """The 1-based epoch whose ``<stage>/<key>`` is best (the earliest on ties); None if no epoch has it.

    Args:
        history: the solver's history, one ``{stage: {key: value}}`` dict per epoch.
        name: e.g. ``valid/ce`` or ``evaluate/clap``.
    """
    mode = metric_mode(name)
    stage, _, key = name.partition('/')
    best: tuple[float, int] | None = None
    for epoch, stages in enumerate(history, 1):
        value = (stages.get(stage) or {}).get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        score = float(value) if mode == 'min' else -float(value)
        if best is None or score < best[0]:
            best = (score, epoch)
    return best[1] if best else None


def is_new_best(history: tp.Sequence[dict], pending: dict, name: str) -> bool:
    """Whether this epoch's ``pending`` metrics beat every past epoch on ``name`` (the first value always does).

    False when this epoch didn't compute ``name`` (e.g. evaluate runs every N epochs): the best stays where it was.
    """
    return best_epoch([*history, pending], name) == len(history) + 1


# ---------------------------------------------------------------------------------------------------- reports
@dataclasses.dataclass
class ReportConfig:
    """One evaluation run of :func:`evaluate_models`.

    Attributes:
        prompts: prompts to generate (checked with ``generation.check_prompts``).
        settings: seeds, scores, CLAP, batch sizes, loudness (``settings.duration`` is ``params.duration``).
        params: sampling settings, as in scripts/generate.py.
        out: root folder; the run writes into a new ``out/<timestamp>`` folder.
        real: the valid split of a prepared dataset (the real set), or None.
        progress: show generation progress bars.
        command: the command line, recorded in the report.
    """

    prompts: list[str]
    settings: EvalSettings
    params: generation.GenerationParams
    out: Path = Path('evaluations')
    real: Path | None = None
    progress: bool = True
    command: str = ''


def _new_folder(root: Path) -> Path:
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    try:
        return atomic.new_dir(root, stamp, attempts=1000)
    except FileExistsError as err:
        raise MetricsError(f'{err}: remove old evaluations or pass another --out.') from err


def _model_label(source: generation.ModelSource) -> str:
    if source.kind == 'xp':
        return f'{source.sig} ({source.weights}, epoch {source.epoch})'
    return source.given


def evaluate_models(sources: tp.Sequence[generation.ModelSource], cfg: ReportConfig, device: str) -> Path:
    """Generate and score every prompt x seed with each model; write the report folder; return it.

    The CLAP model and the real set are loaded before any model, so a missing evaluation model fails before
    minutes of generation. Each model is loaded, run through :func:`generation.run` (the files and sidecars of
    scripts/generate.py) and freed before the next.
    """
    from solvers.evaluation import listening

    cfg.params.check()
    prompts = generation.check_prompts(cfg.prompts)
    settings = dataclasses.replace(cfg.settings, duration=cfg.params.duration)
    judge = Judge(settings, device)
    real = read_real_clips(cfg.real) if cfg.real else []
    folder = _new_folder(cfg.out.expanduser().resolve())
    report = _new_report(cfg, prompts, settings, device)
    if 'codec' in settings.metrics and not real:
        judge.skipped['codec'] = 'codec fidelity is measured on real clips: pass --dataset NAME.'
    chosen: list[RealClip] | None = None
    first_rate = 0
    for index, source in enumerate(sources):
        begin = time.time()
        model = generation.load_model(source, device)
        rate, channels = int(model.sample_rate), int(model.compression_model.channels)
        if chosen is None:
            first_rate, chosen = rate, _score_real(judge, real, settings, rate, channels, folder, report)
        elif rate != first_rate:
            raise MetricsError(
                f'{source.given} generates {rate} Hz audio but {sources[0].given} {first_rate} Hz: '
                'compare models of one sample rate in one report.'
            )
        out = folder / 'clips' / f'{index + 1:02d}_{audio_io.slugify(source.given, 40)}'
        files, codec = _generate_with(model, source, out, prompts, cfg, settings, real, device)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        entry = _score_model(judge, files, rate, channels, chosen, folder, report, index)
        entry['metrics'].update(codec)
        entry.update(
            label=_model_label(source),
            given=source.given,
            kind=source.kind,
            path=source.path,
            weights=source.weights,
            sig=source.sig,
            epoch=source.epoch,
            seconds=round(time.time() - begin, 1),
            folder=str(out.relative_to(folder)),
        )
        report['models'].append(entry)
        report['skipped'].update(entry.pop('skipped'))
    listening.write_report(folder, report)
    return folder


def _new_report(cfg: ReportConfig, prompts: list[str], settings: EvalSettings, device: str) -> dict[str, tp.Any]:
    """The report's settings and provenance, with empty model, clip and real-clip lists to fill."""
    return {
        'created': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'command': cfg.command,
        'prompts': prompts,
        'seeds': list(settings.seeds),
        'params': dataclasses.asdict(cfg.params),
        'loudness': settings.loudness,
        'clap_model': settings.clap_model,
        'device': device,
        'dataset': str(cfg.real) if cfg.real else None,
        'versions': generation.versions(),
        'models': [],
        'clips': [],
        'real': {'metrics': {}, 'clips': []},
        'skipped': {},
    }


def _generate_with(
    model: tp.Any,
    source: generation.ModelSource,
    out: Path,
    prompts: list[str],
    cfg: ReportConfig,
    settings: EvalSettings,
    real: list,
    device: str,
) -> tuple[list[Path], dict]:
    """One model's clips (scripts/generate.py's files and sidecars, in ``out``) and its codec scores on ``real``."""
    run_cfg = generation.RunConfig(
        prompts=prompts,
        seeds=list(settings.seeds),
        params=cfg.params,
        out=out,
        loudness=settings.loudness,
        max_batch=settings.max_batch,
        progress=cfg.progress,
    )
    files = generation.run(model, source, run_cfg, device)
    codec = {}
    if 'codec' in settings.metrics and real:
        rate, channels = int(model.sample_rate), int(model.compression_model.channels)
        codec = metrics.codec_fidelity(
            model.compression_model, [load_audio(c, rate, channels, CODEC_SECONDS) for c in real], rate
        )
    return files, codec


def _score_real(
    judge: Judge, real: list[RealClip], settings: EvalSettings, rate: int, channels: int, folder: Path, report: dict
) -> list[RealClip]:
    """Embed the real set; write the real clip of each prompt (at the comparison loudness) for the listening page."""
    chosen = real[: settings.references]
    wavs = [load_audio(c, rate, channels, settings.duration) for c in chosen]
    per_clip = judge.set_real(wavs, [c.caption for c in chosen], rate)
    report['real']['metrics'] = dict(judge.real_metrics, n_real=len(chosen))
    from solvers.evaluation import listening

    rows = []
    for prompt in report['prompts']:
        index = next((i for i, c in enumerate(chosen) if c.caption == prompt), None)
        if index is None:
            continue
        wav = audio_io.normalize_loudness(wavs[index], rate, settings.loudness)
        path = audio_io.write_audio(folder / 'real' / f'{audio_io.slugify(prompt, 40)}.wav', wav, rate, overwrite=True)
        rows.append(
            {
                'prompt': prompt,
                'file': str(path.relative_to(folder)),
                'source': str(chosen[index].path),
                'spectrogram': listening.spectrogram_png(wav, rate, path.with_suffix('.png'), folder),
                'clap': per_clip[index],
            }
        )
    report['real']['clips'] = rows
    return chosen


def _score_model(
    judge: Judge,
    files: list[Path],
    rate: int,
    channels: int,
    real: list[RealClip],
    folder: Path,
    report: dict,
    index: int,
) -> dict:
    """Read back one model's clips, score them, and add one report row per clip."""
    import soundfile

    from solvers.evaluation import listening

    rows, wavs = [], []
    for path in files:
        sidecar = json.loads(path.with_suffix('.json').read_text(encoding='utf-8'))
        data, file_rate = soundfile.read(str(path), dtype='float32', always_2d=True)
        wav = torch.from_numpy(data.T.copy())
        wavs.append(wav)
        rows.append(
            {
                'model': index,
                'prompt': sidecar['prompt'],
                'seed': sidecar['seed'],
                'file': str(path.relative_to(folder)),
                'sidecar': str(path.with_suffix('.json').relative_to(folder)),
                'spectrogram': listening.spectrogram_png(wav, file_rate, path.with_suffix('.png'), folder),
            }
        )
    partners = {c.caption: load_audio(c, rate, channels, judge.settings.duration) for c in reversed(real) if c.caption}
    scores = judge.score([r['prompt'] for r in rows], wavs, rate, [partners.get(r['prompt']) for r in rows])
    per_clip: list[float | None] = list(scores.clip_clap) if scores.clip_clap else [None] * len(rows)
    for row, value in zip(rows, per_clip):
        row['clap'] = value
    report['clips'].extend(rows)
    return {'metrics': scores.metrics, 'skipped': scores.skipped, 'n_clips': len(rows)}
