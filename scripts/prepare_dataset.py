"""Prepare a sound folder or library for AudioGen fine-tuning (manifests, 16 kHz WAVs, dataset preset, report)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from solvers.data import CAPTION_SOURCES, PrepareConfig, format_summary, prepare
from solvers.errors import run_cli

DEFAULTS = {f.name: f.default for f in dataclasses.fields(PrepareConfig)}


def _sources(text: str) -> tuple[str, ...]:
    """``--captions-from metadata,tags`` as a tuple; PrepareConfig checks the names."""
    return tuple(s.strip() for s in text.split(',') if s.strip())


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface; one flag per :class:`solvers.data.PrepareConfig` field."""
    parser = argparse.ArgumentParser(
        prog='prepare_dataset',
        description='Check, convert (16 kHz mono PCM16), split and index a folder of sounds for AudioGen '
        'fine-tuning. Captions come from caption files (audio/ + metadata/ with matching paths; a JSON beside each '
        'audio file; or a captions CSV/JSONL with path and caption columns; keys: description, text or caption), '
        'else from tags embedded in the files (RIFF INFO, BWF bext, iXML, Vorbis comments, ID3), else from '
        'Universal Category System names, else from folder and file names. Takes of one sound stay in one split; '
        'identical audio is kept once.',
        epilog='Example: python -m scripts.prepare_dataset ~/sounds --name mysounds, then the commands it prints '
        '(dora run solver=audiogen/tiny dataset=mysounds on a CPU, solver=audiogen/train on a GPU). Outputs go under '
        "the data root: $AUDIOGEN_HOME if set, else this project's folder.",
    )
    parser.add_argument('dataset_dir', type=Path, help='folder with your audio and captions (never modified)')
    parser.add_argument('--name', required=True, help='dataset name: egs/NAME/, config/dataset/NAME.yaml, data/NAME/')
    parser.add_argument(
        '--valid-fraction',
        type=float,
        default=DEFAULTS['valid_fraction'],
        help='share of source files in the valid split (default: %(default)s)',
    )
    parser.add_argument(
        '--workers',
        type=int,
        default=min(8, os.cpu_count() or 1),
        help='worker processes (default: CPU count, at most 8)',
    )
    parser.add_argument(
        '--out',
        type=Path,
        default=None,
        help='folder for the prepared WAVs, state and report (default: <data root>/data/NAME); its '
        'wav/ sub-folder is managed by this tool: files there that no source produces are deleted',
    )
    parser.add_argument('--egs-root', type=Path, default=None, help='root of the manifests (default: <data root>/egs)')
    parser.add_argument(
        '--config-root',
        type=Path,
        default=None,
        help='folder of the dataset config group (default: <data root>/config/dataset)',
    )
    parser.add_argument(
        '--captions',
        type=Path,
        default=None,
        help='captions CSV/JSONL (default: top-level *.csv / *.jsonl files of DATASET_DIR)',
    )
    parser.add_argument(
        '--captions-from',
        type=_sources,
        default=DEFAULTS['captions_from'],
        metavar='SOURCES',
        help=f'caption sources to try, in order, comma-separated (default: {",".join(CAPTION_SOURCES)}): caption '
        'files, embedded tags, UCS names, folder and file names; e.g. tags,names ignores caption files',
    )
    parser.add_argument(
        '--min-seconds',
        type=float,
        default=DEFAULTS['min_seconds'],
        help='reject clips shorter than this (default: %(default)s: two codec frames; short sounds '
        'such as clicks and hits are kept and padded in training)',
    )
    parser.add_argument(
        '--max-seconds',
        type=float,
        default=DEFAULTS['max_seconds'],
        help='split clips longer than this into equal chunks (default: %(default)s)',
    )
    parser.add_argument('--strict', action='store_true', help='exit with status 1 if any file is rejected')
    parser.add_argument('--force', action='store_true', help='overwrite an existing preset that differs')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the dataset preparation from the command line.

    Args:
        argv: Arguments without the program name (defaults to ``sys.argv[1:]``).

    Returns:
        0 on success; 1 if nothing usable remains or, with --strict, if a file was rejected; 2 on bad arguments.
    """
    args = build_parser().parse_args(argv)
    cfg = PrepareConfig(
        dataset_dir=args.dataset_dir,
        name=args.name,
        out_dir=args.out,
        egs_root=args.egs_root,
        config_root=args.config_root,
        captions=args.captions,
        captions_from=args.captions_from,
        valid_fraction=args.valid_fraction,
        workers=args.workers,
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
        strict=args.strict,
        force=args.force,
        progress=not args.no_progress,
    )

    def run() -> int:
        result = prepare(cfg)
        print(format_summary(result.report))
        if result.exit_code:
            t = result.report['totals']
            why = (
                'no usable file remains'
                if not t['kept_files']
                else f'--strict and {t["rejected_files"]} file(s) were rejected'
            )
            print(f'error: {why}; see {Path(result.report["out_dir"]) / "report.txt"}', file=sys.stderr)
        return result.exit_code

    return run_cli('prepare_dataset', run)


if __name__ == '__main__':
    sys.exit(main())
