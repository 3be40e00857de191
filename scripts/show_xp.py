"""Show where an XP keeps its checkpoints, samples and TensorBoard logs, and its per-epoch ce.

Usage: python -m scripts.show_xp solver=audiogen/demo      (the same overrides as `dora run`)
       python -m scripts.show_xp --sig 0f95cd25
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Print the XP summary; exit 1 when the XP has not run yet."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('overrides', nargs='*', help='dora run overrides that define the XP')
    parser.add_argument('--sig', help='an XP signature instead of overrides')
    parser.add_argument('--folder', action='store_true', help='print only the XP folder (whether it ran or not)')
    args = parser.parse_args(argv)
    from solvers import data, project, train

    xp = train.main.get_xp_from_sig(args.sig) if args.sig else train.main.get_xp(args.overrides)
    folder = xp.folder
    if args.folder:
        print(folder)
        return 0
    if not (folder / 'history.json').exists():
        print(f'XP {xp.sig} has not run yet (expected it in {folder}).', file=sys.stderr)
        return 1
    history = json.loads((folder / 'history.json').read_text())
    print(f'XP {xp.sig}: {folder}')
    print(f'  checkpoints: {", ".join(sorted(p.name for p in folder.glob("checkpoint*.th"))) or "none"}')
    samples = sorted((folder / 'samples').glob('epoch_*'))
    if samples:
        print(f'  samples:     {samples[-1]} ({len(list(samples[-1].glob("*.wav")))} WAVs, -14 LUFS)')
    print(f'  tensorboard: tensorboard --logdir {folder / "tensorboard"}')
    print('  epoch  train ce  valid ce')
    for epoch, stages in enumerate(history, 1):
        train_ce = stages.get('train', {}).get('ce', float('nan'))
        valid_ce = stages.get('valid', {}).get('ce', float('nan'))
        print(f'  {epoch:5d}  {train_ce:8.3f}  {valid_ce:8.3f}')
    print('Next:')
    for line in project.next_commands(xp.cfg, xp.sig, data.sample_prompts(xp.cfg)[:1]):
        print(f'  {line}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
