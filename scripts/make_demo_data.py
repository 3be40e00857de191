"""Synthesise a small captioned sound dataset (audio/ + metadata/) for the demo and the tests."""

from __future__ import annotations

import argparse
import sys
import time

from solvers.demo_data import CLASSES, make_demo_dataset


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and write the demo dataset.

    Args:
        argv: Arguments without the program name (defaults to ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(
        description="Deterministically synthesise a captioned sound dataset: OUT_DIR/audio/*.wav (16 kHz mono PCM16) "
        f"and OUT_DIR/metadata/*.json, {len(CLASSES)} sound classes.")
    parser.add_argument("out_dir", help="destination folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives byte-identical files")
    parser.add_argument("--per-class", type=int, default=8, help="clips per sound class (default: 8)")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be at least 1, got {args.per_class}.")
    start = time.perf_counter()
    paths = make_demo_dataset(args.out_dir, seed=args.seed, per_class=args.per_class)
    print(f"Wrote {len(paths)} clips ({len(CLASSES)} classes x {args.per_class}) to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
