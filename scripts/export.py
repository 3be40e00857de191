"""Export a fine-tuned XP as a pretrained package that plain audiocraft loads: AudioGen.get_pretrained(OUT_DIR).

Examples:
  audiogen-export 0f95cd25 exported/my_sounds                (best weights of the XP with that signature)
  audiogen-export outputs/xps/0f95cd25 exported/my_sounds --weights ema --half --force
  audiogen-export 3a1b2c4d exported/my_lora                  (a LoRA XP: the adapters only, megabytes)
  audiogen-export 3a1b2c4d exported/my_lora_full --merge     (a LoRA XP folded into a standard package)

Exit status: 0 on success, 2 on bad input (OUT_DIR untouched), 1 on other errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog='audiogen-export', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('xp', help='XP signature (looked up under $AUDIOGEN_OUTPUTS/xps or outputs/xps) or XP folder')
    parser.add_argument('out_dir', type=Path, help='destination package directory (absent or empty unless --force)')
    parser.add_argument(
        '--weights',
        choices=('best', 'ema', 'last'),
        default='best',
        help='best (default: the best valid epoch, EMA weights when the EMA is on), ema or last',
    )
    parser.add_argument('--half', action='store_true', help='store the LM in float16 (half the size)')
    parser.add_argument('--force', action='store_true', help='replace a non-empty OUT_DIR')
    parser.add_argument(
        '--merge',
        action='store_true',
        help='LoRA XPs: fold the adapters into the base weights and write a standard package that '
        'plain audiocraft loads (default: the adapters alone, which our scripts load over the '
        'base package)',
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the export from the command line.

    Args:
        argv: arguments without the program name (defaults to ``sys.argv[1:]``).
    Returns:
        0 on success, 2 on bad input, 1 on other errors.
    """
    args = build_parser().parse_args(argv)
    from solvers.errors import run_cli

    return run_cli('audiogen-export', lambda: _export(args), interrupted='interrupted; nothing was written.')


def _export(args: argparse.Namespace) -> int:
    from solvers.models import export, package

    out = export.export_xp(
        args.xp, args.out_dir, weights=args.weights, half=args.half, force=args.force, merge=args.merge
    )
    print(f'Exported {args.xp} ({args.weights} weights{", float16" if args.half else ""}) to {out}')
    if (out / package.ADAPTER_FILE).is_file():
        print(
            f'This is an adapter-only export (LoRA weights over {package.adapter_export(str(out))["base"]}). '
            f'Generate with: audiogen-generate "..." --model {out}'
        )
        print(f'For a package plain audiocraft loads: audiogen-export {args.xp} DIR --merge')
    else:
        print(f'Load it with: AudioGen.get_pretrained(\'{out}\')  or  audiogen-generate "..." --model {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
