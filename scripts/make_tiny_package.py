"""Build the tiny stand-in pretrained package used by the demo and the tests (offline).

By default its weights are random (seconds). ``--trained`` builds the demo's stand-in instead: a tiny EnCodec trained
on the synthetic sounds and an LM pretrained on the sound classes the demo calls known (dog_bark, siren, rain, bell),
built once (about 8 minutes) and cached in ``$AUDIOGEN_CACHE`` (default ``~/.cache/audiogen-finetune``).

Both go to the same place by default (``<outputs>/pretrained/tiny``, the package ``pretrained=tiny`` names). A folder
that already holds a package with other weights is left alone unless ``--force``: XPs fine-tuned from it pin its
checksum and would refuse to load over another one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from solvers import project
from solvers.errors import run_cli


def build_parser() -> argparse.ArgumentParser:
    """The command line: destination, seed, --trained, --force."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        'out',
        nargs='?',
        default=str(project.outputs_dir() / 'pretrained' / 'tiny'),
        help='destination directory (default: %(default)s)',
    )
    parser.add_argument('--seed', type=int, default=0, help='seed of the random initial weights')
    parser.add_argument(
        '--trained',
        action='store_true',
        help="the demo's stand-in: trained codec, LM pretrained on the known demo classes (cached)",
    )
    parser.add_argument('--force', action='store_true', help='replace a package with other weights at the destination')
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the package beside its destination, then move it there (see the module docstring)."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        from solvers.models import identity

        dest = Path(args.out).expanduser().absolute()
        built = dest.parent / f'.{dest.name}.building-{os.getpid()}'
        if args.trained:
            from solvers.demo.synthetic import KNOWN_CLASSES
            from solvers.demo.tiny_lm import build_trained_package

            build_trained_package(built)
            what = f'the trained stand-in: trained codec; LM pretrained on {", ".join(KNOWN_CLASSES)}'
        else:
            from solvers.demo.tiny import build_tiny_package

            build_tiny_package(built, seed=args.seed)
            what = f'random weights, seed {args.seed}'
        print(identity.install(built, dest, args.force, what))
        return 0

    return run_cli('make_tiny_package', body)


if __name__ == '__main__':
    sys.exit(main())
