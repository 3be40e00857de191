"""Will this training config fit my GPU? The memory of one training process by component, and what makes it fit.

Takes the same overrides as `dora run`; nothing is loaded (the LM is built on PyTorch's meta device) and no GPU is
needed, so it answers on a laptop before a job is queued.

Usage:
  python -m scripts.plan_memory solver=audiogen/train adapter=lora --gpu-gb 24
  python -m scripts.plan_memory solver=audiogen/train dataset=mysounds --gpu-gb 80
  python -m scripts.plan_memory solver=audiogen/train --gpu-gb 24 --fit     (the overrides that make it fit)

Exit status: 0 when the plan fits, 3 when it doesn't, 2 on bad input.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='plan_memory', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('overrides', nargs='*', help='dora run overrides, e.g. solver=audiogen/train adapter=lora')
    parser.add_argument(
        '--gpu-gb',
        type=float,
        default=24.0,
        help='GPU memory in GB (1e9 bytes, as GPUs are sold: 24, 40, 48, 80); default 24',
    )
    parser.add_argument(
        '--fit',
        action='store_true',
        help='when it does not fit, add levers (LoRA, checkpointing, 8-bit AdamW, EMA on the host, '
        'then smaller micro-batches with more accumulation) until it does',
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from solvers.errors import AudiogenError, run_cli

    def body() -> int:
        from solvers import project
        from solvers.training import memory

        if args.gpu_gb <= 0:
            raise AudiogenError(f'--gpu-gb must be > 0, got {args.gpu_gb:g}.')
        overrides = list(args.overrides)
        cfg = project.compose(overrides)
        current = memory.plan(cfg, args.gpu_gb, overrides)
        print(memory.format_plan(current, 'Memory plan for ' + (shlex.join(overrides) or 'the base config')))
        presets = [o for o in overrides if o.partition('=')[0].lstrip('+~') in project.GROUPS]
        print(memory.batch_note(cfg, project.compose(presets)))
        if current.fits:
            return 0
        fitted = memory.make_it_fit(overrides, args.gpu_gb, project.compose)
        if fitted is None:
            print(
                f'\nEven one clip per micro-batch with every lever does not fit in {args.gpu_gb:g} GB: '
                'shorten dataset.segment_duration or use a larger GPU.'
            )
            return 3
        added = fitted.overrides[len(overrides) :]
        print(f'\nTo fit in {args.gpu_gb:g} GB, add: {" ".join(added)}')
        if args.fit:
            print()
            print(memory.format_plan(fitted, 'Memory plan with those overrides'))
        print(f'Next: dora run {shlex.join(fitted.overrides)}')
        return 3

    return run_cli('plan_memory', body)


if __name__ == '__main__':
    sys.exit(main())
