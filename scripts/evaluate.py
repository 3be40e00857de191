"""Judge models on your sounds: seeded clips of each prompt per model, scored, with a listening page.

Examples:
  audiogen-evaluate facebook/audiogen-medium 0f95cd25 --dataset mysounds      (the base model vs a fine-tune)
  audiogen-evaluate exported/rain --prompts-file prompts.txt --batch_size 8
  audiogen-evaluate tiny 94489a9d --dataset demo --clap-model tiny --duration 2   (offline demo: the stand-in vs its XP)

Scores (docs/evaluate.md): CLAP score (higher is better), KAD and FAD to the dataset's valid clips (lower is
better), the codec's fidelity on those clips, and optionally the PaSST KL. Clips are generated exactly as
scripts/generate.py does (same seeds, same files and sidecars).
Writes OUT/<timestamp>/: clips/, real/, report.json, summary.md, index.html (open it in a browser).
Exit status: 0 on success, 2 on bad input (one line on stderr), 1 on other errors.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from solvers.errors import AudiogenError, run_cli
from solvers.generation import generate as generation


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog='audiogen-evaluate', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        'models', nargs='+', help='models to compare: HF id, package dir, exported fine-tune, XP signature or folder'
    )
    parser.add_argument(
        '--dataset',
        help='prepared dataset name (or its valid split folder): its valid captions are '
        'the prompts and its valid clips the real set',
    )
    parser.add_argument('--prompt', action='append', default=[], help='a prompt (repeat for more)')
    parser.add_argument(
        '--prompts-file', type=Path, help='UTF-8 file with one prompt per line (blank lines and # comments skipped)'
    )
    parser.add_argument(
        '--num-prompts',
        type=int,
        default=None,
        help='with --dataset and no prompts given: this many distinct valid captions (default: all)',
    )
    generation.add_seed_arguments(parser, batch_size=4, clip='clip')
    generation.add_sampling_arguments(parser, extend_stride=False)
    parser.add_argument(
        '--clap-model',
        default='laion/larger_clap_general',
        help='CLAP for the CLAP score, KAD and FAD: HF id, local dir, tiny (a random offline '
        'stand-in) or none (default: %(default)s)',
    )
    parser.add_argument(
        '--references',
        type=int,
        default=None,
        help='real clips in the real set: the first N of the valid manifest (default: all)',
    )
    parser.add_argument('--no-codec', action='store_true', help='skip the codec fidelity scores')
    parser.add_argument('--no-fad', action='store_true', help='skip FAD (KAD is kept)')
    parser.add_argument(
        '--kld', action='store_true', help='also the PaSST KL (needs hear21passt and its weights on this machine)'
    )
    parser.add_argument('--device', default='auto', help='auto (cuda if available), cpu, cuda, cuda:N')
    parser.add_argument(
        '--out',
        type=Path,
        default=Path('evaluations'),
        help='root folder; each run writes a new OUT/<timestamp>/ (default: evaluations/)',
    )
    parser.add_argument('--max-batch', type=int, default=25, help='clips per forward pass (default: %(default)s)')
    parser.add_argument(
        '--loudness', type=float, default=-14.0, help='LUFS of the written and compared clips (default: %(default)s)'
    )
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bars')
    return parser


def valid_split(dataset: str) -> Path:
    """The valid split folder of a prepared dataset: a folder holding a manifest, or the preset ``dataset=NAME``.

    Raises:
        AudiogenError: unknown preset (with the closest names), a preset without a valid split, or no manifest.
    """
    from solvers import project

    path = Path(dataset).expanduser()
    if (path / 'data.jsonl.gz').is_file() or (path / 'data.jsonl').is_file():
        return path.resolve()
    if (path / 'valid').is_dir():
        return valid_split(str(path / 'valid'))
    cfg = project.compose([f'dataset={dataset}'])
    valid = cfg.datasource.get('valid')
    if not valid:
        raise AudiogenError(
            f'--dataset {dataset}: its preset sets no datasource.valid; re-run '
            f'`python -m scripts.prepare_dataset DIR --name {dataset}`.'
        )
    return project.resolve_path(valid)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation from the command line.

    Args:
        argv: arguments without the program name (defaults to ``sys.argv[1:]``).
    Returns:
        0 on success, 2 on bad input, 1 on other errors.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')

    def body() -> int:
        from solvers.evaluation import evaluate as evaluation

        prompts = list(args.prompt)
        if args.prompts_file is not None:
            prompts += generation.read_prompts_file(args.prompts_file)
        real = valid_split(args.dataset) if args.dataset else None
        if not prompts:
            if real is None:
                raise AudiogenError(
                    'No prompt: pass --dataset NAME (its valid captions), --prompt TEXT or --prompts-file FILE.'
                )
            prompts = evaluation.distinct_captions(evaluation.read_real_clips(real), args.num_prompts)
            if not prompts:
                raise AudiogenError(f'--dataset {args.dataset}: no valid clip in {real} has a caption.')
        wanted = {'clap', 'kad', 'fad', 'codec'} | ({'kld'} if args.kld else set())
        wanted -= {name for name, off in (('codec', args.no_codec), ('fad', args.no_fad)) if off}
        settings = evaluation.EvalSettings(
            seeds=tuple(generation.make_seeds(args.batch_size, args.seed, args.seeds)),
            duration=args.duration,
            metrics=frozenset(wanted),
            clap_model=None if args.clap_model in ('', 'none') else args.clap_model,
            references=args.references,
            max_batch=args.max_batch,
            loudness=args.loudness,
        )
        params = generation.sampling_params(args)
        if args.max_batch < 1:
            raise AudiogenError(f'--max-batch must be >= 1, got {args.max_batch}.')
        if args.references is not None and args.references < 2:
            raise AudiogenError(f'--references must be >= 2 (KAD and FAD compare sets), got {args.references}.')
        device = generation.pick_device(args.device)
        sources = [_resolve(spec, args.weights) for spec in args.models]
        if settings.clap_model is None and len(sources) > 1:
            print(
                "Without a CLAP model only the codec is scored, and a fine-tune shares its base's frozen codec: the "
                'models compared here get the same scores. Pass --clap-model (docs/evaluate.md) to compare them, or '
                'listen to them side by side in the page.',
                file=sys.stderr,
            )
        cfg = evaluation.ReportConfig(
            prompts=prompts,
            settings=settings,
            params=params,
            out=args.out,
            real=real,
            progress=not args.no_progress,
            command=shlex.join(['audiogen-evaluate', *(argv or sys.argv[1:])]),
        )
        folder = evaluation.evaluate_models(sources, cfg, device)
        print((folder / 'summary.md').read_text(encoding='utf-8'))
        print(f'Listening page: {folder / "index.html"}')
        return 0

    return run_cli('audiogen-evaluate', body, interrupted='interrupted; the report was not written.')


def _resolve(spec: str, weights: str | None) -> generation.ModelSource:
    """A model reference; ``--weights`` applies to XPs only, so packages in the same comparison are accepted."""
    source = generation.resolve_model(spec)
    return generation.resolve_model(spec, weights) if source.kind == 'xp' and weights else source


if __name__ == '__main__':
    sys.exit(main())
