"""Build the tiny stand-in pretrained package used by the demo and the tests (offline, a few seconds)."""
from __future__ import annotations

import argparse

from solvers import project


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and write the package."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('out', nargs='?', default=str(project.outputs_dir() / 'pretrained' / 'tiny'),
                        help='destination directory (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random initial weights')
    args = parser.parse_args(argv)
    from solvers.tiny import build_tiny_package
    out = build_tiny_package(args.out, seed=args.seed)
    print(f"Tiny pretrained package written to {out}")


if __name__ == '__main__':
    main()
