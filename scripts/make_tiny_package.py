"""Build the tiny stand-in pretrained package used by the demo and the tests (offline).

By default its weights are random (seconds). ``--trained`` builds the demo's stand-in instead: a tiny EnCodec trained
on the synthetic sounds and an LM pretrained on the sound classes the demo calls known (dog_bark, siren, rain, bell),
built once (about 8 minutes) and cached in ``$AUDIOGEN_CACHE`` (default ``~/.cache/audiogen-finetune``).
"""

from __future__ import annotations

import argparse
import sys

from solvers import project


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and write the package."""
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
    args = parser.parse_args(argv)
    if args.trained:
        from solvers.demo.synthetic import KNOWN_CLASSES
        from solvers.demo.tiny_lm import build_trained_package

        out = build_trained_package(args.out)
        print(f'Tiny pretrained package written to {out} (trained codec; LM pretrained on {", ".join(KNOWN_CLASSES)})')
    else:
        from solvers.demo.tiny import build_tiny_package

        out = build_tiny_package(args.out, seed=args.seed)
        print(f'Tiny pretrained package written to {out} (random weights, seed {args.seed})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
