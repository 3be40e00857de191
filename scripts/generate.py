"""Generate sound effects from text prompts with AudioGen, a local package, an export or a training XP.

Examples:
  audiogen-generate "dog barking" "sirens of an emergency vehicle" --batch_size 5
  audiogen-generate --prompts-file prompts.txt --model 0f95cd25 --weights ema --duration 3 --out out/
  audiogen-generate "rain on a tin roof" --model exported/rain --seeds 7       (regenerates 7.wav of an earlier run)

Files: OUT/<prompt-slug>/<timestamp>/<seed>.<format> at the --loudness target, with <seed>.json beside each.
Exit status: 0 on success, 2 on bad input (nothing written), 1 on other errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from solvers import project
from solvers.generation import fastgen
from solvers.generation import generate as generation


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog='audiogen-generate', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('prompts', nargs='*', help='text prompts, one clip set per prompt')
    parser.add_argument(
        '--prompts-file', type=Path, help='UTF-8 file with one prompt per line (blank lines and # comments skipped)'
    )
    parser.add_argument(
        '--model',
        default=generation.DEFAULT_MODEL,
        help='HF id, package dir, exported fine-tune, or XP signature/folder (default: %(default)s)',
    )
    generation.add_seed_arguments(parser, batch_size=25, clip='variation')
    generation.add_sampling_arguments(parser)
    parser.add_argument('--device', default='auto', help='auto (cuda if available), cpu, cuda, cuda:N')
    parser.add_argument(
        '--decoder',
        choices=fastgen.DECODERS,
        default='fast',
        help="LM decoding: fast (audiocraft's tokens, faster; default), graph (CUDA graphs, opt-in, "
        "within float tolerance of fast), stock (audiocraft's own loop)",
    )
    parser.add_argument(
        '--dtype',
        choices=generation.DTYPES,
        default='auto',
        help='LM dtype: auto (float32 on CPU, float16 on GPU, as audiocraft), float32, float16, bfloat16 (GPU)',
    )
    parser.add_argument('--format', choices=generation.FORMATS, default='wav', help='audio format (default: wav)')
    parser.add_argument('--out', type=Path, default=Path('out'), help='output root (default: out/)')
    parser.add_argument('--max-batch', type=int, default=25, help='clips per forward pass (default: %(default)s)')
    parser.add_argument('--loudness', type=float, default=-14.0, help='target LUFS (default: %(default)s)')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the generation from the command line.

    Args:
        argv: arguments without the program name (defaults to ``sys.argv[1:]``).
    Returns:
        0 on success, 2 on bad input, 1 on other errors.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
    from solvers.errors import run_cli

    return run_cli(
        'audiogen-generate', lambda: _generate(args), interrupted='interrupted; the files written so far are complete.'
    )


def _generate(args: argparse.Namespace) -> int:
    prompts = list(args.prompts)
    if args.prompts_file is not None:
        prompts += generation.read_prompts_file(args.prompts_file)
    params = generation.sampling_params(args)
    cfg = generation.RunConfig(
        prompts=prompts,
        seeds=generation.make_seeds(args.batch_size, args.seed, args.seeds),
        params=params,
        out=args.out,
        fmt=args.format,
        loudness=args.loudness,
        max_batch=args.max_batch,
        progress=not args.no_progress,
    )
    cfg.check()
    device = generation.pick_device(args.device)
    source = generation.resolve_model(args.model, args.weights)
    model = generation.load_model(source, device, decoder=args.decoder, dtype=args.dtype)
    files = generation.run(model, source, cfg, device)
    folders = sorted({str(path.parent) for path in files})
    print(f'Wrote {project.counted(len(files), "clip")} with JSON sidecars to:')
    for folder in folders:
        print(f'  {folder}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
