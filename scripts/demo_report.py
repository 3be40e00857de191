"""The demo's proof of learning: prompt accuracy of the stand-in package before and after the fine-tune.

Generates clips from every caption of every demo sound class with fixed seeds, once with the pretrained package the XP
started from and once with the fine-tuned XP, and asks the fixed spectral classifier (solvers/demo/classifier.py,
trained on clean synthetic clips) which class each clip sounds like. Prints the table and writes it to
<xp>/demo_report.json.

Usage: python -m scripts.demo_report solver=audiogen/demo     (the same overrides as `dora run`)
       python -m scripts.demo_report --sig 0f95cd25
"""

from __future__ import annotations

import argparse
import sys
import time
import typing as tp


def judge(
    model_ref: str, classes: tp.Sequence[str], seeds: tp.Sequence[int], duration: float, classifier: tp.Any
) -> dict[str, list[str]]:
    """Generate ``len(seeds)`` clips per caption of each class with ``model_ref``; the class heard in each clip."""
    from solvers.demo import synthetic as demo_data
    from solvers.generation import generate as generation

    model = generation.load_model(generation.resolve_model(model_ref))
    generation.GenerationParams(duration=duration).apply(model)
    chosen = demo_data.select_classes(','.join(classes))
    captions = [caption for cls in chosen for caption in cls.captions]
    # scripts/generate.py's path; one batch: the LUT conditioning gives every caption the same shape, and each clip
    # samples from its own seed.
    clips = generation.generate_clips(model, captions, seeds, max_batch=len(captions) * len(seeds))
    items = [(cls.name, caption, seed) for cls in chosen for caption in cls.captions for seed in seeds]
    predicted = classifier.predict([clips[(caption, seed)][0].numpy() for _, caption, seed in items])
    heard: dict[str, list[str]] = {cls.name: [] for cls in chosen}
    for (name, _, _), label in zip(items, predicted):
        heard[name].append(label)
    return heard


def accuracy(heard: dict[str, list[str]], classes: tp.Sequence[str]) -> tuple[int, int]:
    """(clips heard as their own class, clips) over ``classes``."""
    return (sum(p == c for c in classes for p in heard[c]), sum(len(heard[c]) for c in classes))


def table(before: dict[str, list[str]], after: dict[str, list[str]], sig: str, per_prompt: str) -> list[str]:
    """The printed table: one row per class, then the new and the known classes together."""
    from solvers.demo.synthetic import CLASS_NAMES, KNOWN_CLASSES, NEW_CLASSES

    def cell(heard: dict[str, list[str]], classes: tp.Sequence[str]) -> str:
        right, total = accuracy(heard, classes)
        return f'{right:3d}/{total:<3d} {100 * right / total:4.0f} %'

    def most_heard(heard: dict[str, list[str]], cls: str) -> str:
        wrong = [p for p in heard[cls] if p != cls]
        return max(sorted(set(wrong)), key=wrong.count) if wrong else '-'

    lines = [
        f"Prompt accuracy: the class the fixed classifier hears in clips generated from each class's captions "
        f'({per_prompt}); chance is {100 / len(CLASS_NAMES):.0f} % ({len(CLASS_NAMES)} classes).',
        f'  {"class":<22} {"before (package)":>16} {"after (XP " + sig + ")":>18}   mostly heard before',
    ]
    for group, names in (('new: fine-tuned on', NEW_CLASSES), ('known: pretrained on', KNOWN_CLASSES)):
        lines.append(f'  {group}')
        for cls in names:
            row = f'    {cls:<20} {cell(before, [cls]):>16} {cell(after, [cls]):>18}'
            lines.append(f'{row}   {most_heard(before, cls)}')
    lines.append(f'  {"new classes":<22} {cell(before, NEW_CLASSES):>16} {cell(after, NEW_CLASSES):>18}')
    lines.append(f'  {"known classes":<22} {cell(before, KNOWN_CLASSES):>16} {cell(after, KNOWN_CLASSES):>18}')
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the table; exit 1 when the XP has not run yet."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('overrides', nargs='*', help='dora run overrides that define the XP')
    parser.add_argument('--sig', help='an XP signature instead of overrides')
    parser.add_argument('--seeds', type=int, default=4, help='clips per caption (seeds 0..N-1; default: 4)')
    parser.add_argument('--duration', type=float, default=2.0, help='seconds per clip (default: 2, as the samples)')
    args = parser.parse_args(argv)
    from solvers.errors import run_cli

    return run_cli('demo_report', lambda: report(args))


def report(args: argparse.Namespace) -> int:
    """Judge the XP's base package and its fine-tune, print the table and write ``demo_report.json``."""
    from solvers import atomic, project, train
    from solvers.demo import classifier as demo_classifier
    from solvers.demo.synthetic import CLASS_NAMES, NEW_CLASSES, select_classes
    from solvers.models import export

    steps = ('generate', 'export', 'evaluate')

    xp = train.main.get_xp_from_sig(args.sig) if args.sig else train.main.get_xp(args.overrides)
    if not (xp.folder / 'checkpoint.th').exists():
        print(f'XP {xp.sig} has not run yet (expected its checkpoint in {xp.folder}).', file=sys.stderr)
        return 1
    begin = time.perf_counter()
    seeds = list(range(args.seeds))
    base = export.load_xp(xp.folder).package
    classifier = demo_classifier.load()
    before = judge(base, CLASS_NAMES, seeds, args.duration, classifier)
    after = judge(str(xp.folder), CLASS_NAMES, seeds, args.duration, classifier)
    per_prompt = f'{args.duration:g} s clips, 3 captions x {project.counted(len(seeds), "seed")} per class'
    print('\n'.join(table(before, after, xp.sig, per_prompt)))
    right, total = accuracy(after, NEW_CLASSES)
    results = {
        'sig': xp.sig,
        'package': base,
        'seeds': seeds,
        'duration': args.duration,
        'before': before,
        'after': after,
        'new_classes_after': right / total,
        'new_classes_before': accuracy(before, NEW_CLASSES)[0] / total,
    }
    atomic.write_json(xp.folder / 'demo_report.json', results)
    print(
        f'(generated and judged {2 * len(CLASS_NAMES) * 3 * len(seeds)} clips in '
        f'{time.perf_counter() - begin:.0f} s; details in {xp.folder / "demo_report.json"})'
    )
    print('Next:')
    prompts = [cls.captions[0] for cls in select_classes('new')[:2]]
    for line in project.next_commands(xp.cfg, xp.sig, prompts, '--duration 2 --batch_size 3', steps):
        print(f'  {line}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
