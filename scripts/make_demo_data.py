"""Synthesise a small captioned sound dataset (audio/ + metadata/) for the demo and the tests."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from solvers.demo.synthetic import CLASS_NAMES, KNOWN_CLASSES, NEW_CLASSES, make_demo_dataset, select_classes


def remove_stale_clips(out_dir: Path, kept: set[str]) -> int:
    """Delete clips an earlier run wrote here (``<class>_<NNN>`` files) that this run didn't; returns how many.

    Re-running with other ``--classes`` or a smaller ``--per-class`` then leaves exactly this run's dataset.
    """
    pattern = re.compile(rf'^({"|".join(CLASS_NAMES)})_\d{{3,}}$')
    removed = 0
    for path in sorted((out_dir / 'audio').glob('*.wav')) + sorted((out_dir / 'metadata').glob('*.json')):
        if pattern.match(path.stem) and path.stem not in kept:
            path.unlink()
            removed += path.suffix == '.wav'
    return removed


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and write the demo dataset.

    Args:
        argv: Arguments without the program name (defaults to ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(
        description='Deterministically synthesise a captioned sound dataset: OUT_DIR/audio/*.wav (16 kHz mono PCM16) '
        f'and OUT_DIR/metadata/*.json, from {len(CLASS_NAMES)} sound classes.'
    )
    parser.add_argument('out_dir', help='destination folder (created if missing)')
    parser.add_argument('--seed', type=int, default=0, help='seed; the same seed gives byte-identical files')
    parser.add_argument('--per-class', type=int, default=8, help='clips per sound class (default: 8)')
    parser.add_argument(
        '--classes',
        default='all',
        help=f"all; known ({', '.join(KNOWN_CLASSES)}: what the demo's stand-in was pretrained on); "
        f'new ({", ".join(NEW_CLASSES)}: what make demo fine-tunes it on); or comma-separated names',
    )
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f'--per-class must be at least 1, got {args.per_class}.')
    try:
        classes = select_classes(args.classes)
    except ValueError as err:
        parser.error(f'--classes: {err}')
    start = time.perf_counter()
    paths = make_demo_dataset(args.out_dir, seed=args.seed, per_class=args.per_class, classes=classes)
    stale = remove_stale_clips(Path(args.out_dir), {p.stem for p in paths})
    print(
        f'Wrote {len(paths)} clips ({len(classes)} classes x {args.per_class}: '
        f'{", ".join(c.name for c in classes)}) to {args.out_dir} in {time.perf_counter() - start:.1f} s'
        + (f'; removed {stale} clips of an earlier run.' if stale else '.')
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
