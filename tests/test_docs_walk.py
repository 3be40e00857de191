"""Walk README.md and docs/: run every shell example that can run on a CPU, as printed, in a temporary AUDIOGEN_HOME.

Examples are the command lines of fenced code blocks and the inline commands (`python -m scripts...`, `dora ...`,
`audiogen-...`, `make ...`). Each is either run or skipped by a rule of :data:`RULES` with the reason; an example no
rule classifies fails the test, so a new example in the docs gets a decision. Placeholders (``<sig>``, the docs'
example signatures, ``~/my_sounds``, ``NAME``) become the walk's own XP, sounds and dataset. Commands other than
``dora`` and ``make`` run from a folder outside the clone, as a user's shell would (README: run dora from the clone).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, command_argv

DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
RUN = None
# (pattern, None to run it | why it is skipped): the first pattern that matches a command decides.
RULES: list[tuple[str, str | None]] = [
    (r'…|\.\.\.|scripts\.NAME|<overrides>|<seed>|<caption>| FOLDER ', 'a pattern with a placeholder, not a command'),
    (r'~/sfx', "needs the user's sound library and its reviewed captions file (docs/datasets.md)"),
    (r'^make (test|lint|install)\b', 'the suite, the linters and the install are what runs this test'),
    (r'^make (gpu-check|gpu-check-smoke)\b|benchmarks/gpu_check', 'needs a GPU (benchmarks/gpu_check.py)'),
    (r'^make demo\b', "tests/test_demo.py runs make demo's commands in a temporary AUDIOGEN_HOME"),
    (r'make_tiny_package --trained', "builds the demo's trained stand-in (8 min once; tests/test_demo.py)"),
    (r'^python -m scripts\.(show_xp|demo_report) solver=audiogen/demo', "the demo's XP (tests/test_demo.py)"),
    (r'^dora run solver=audiogen/demo', "the demo's fine-tune (tests/test_demo.py)"),
    (r'^make clean-demo\b', RUN),
    (r'benchmarks/bench_', 'a benchmark: minutes of CPU each, reported in docs/benchmarks.md'),
    (r'^python -m scripts\.plan_memory\b', RUN),
    (r'^dora (grid|info|launch)\b|slurm_local|^sudo ', 'needs the SLURM cluster (tests/test_slurm_local.py)'),
    (r'^dora run\b.*(solver=audiogen/train|-f <sig>|<the XP)|^dora run -d', 'needs a GPU (device=cuda)'),
    (r'^dora run \.\.\.', 'a fragment of the GPU command above it'),
    (r'--device cuda|--decoder graph', 'needs a GPU'),
    (r'--merge|mysounds-lora|3a1b2c4d', 'needs a LoRA XP (adapter=lora trains medium on a GPU)'),
    (r'from_pretrained|facebook/audiogen-medium|^tensorboard\b', 'needs the network (the hub) or starts a server'),
    (
        r'^(audiogen-generate|python -m scripts\.generate) "dog barking"( "sirens[^"]*")?( --batch_size 5)?$',
        'the default model is facebook/audiogen-medium (the hub)',
    ),
    (r'^python -m scripts\.show_xp solver=audiogen/train', 'the GPU XP (solver=audiogen/train) never runs here'),
    (
        r'^python -m scripts\.cache_tokens dataset=',
        "the default solver's package is facebook/audiogen-medium (the hub); tests/test_token_cache.py runs the CLI",
    ),
    (r'^dora run solver=audiogen/tiny dataset=(mysounds|NAME|<name>)$', RUN),
    (r'^(python -m scripts\.|audiogen-)', RUN),
]
SIGS = ('<sig|dir|hf id>', '<sig|xp folder>', '<sig>', '94489a9d', '0f95cd25', 'b2496017')


def examples() -> list[tuple[str, str]]:
    """(file, command) for every shell example, in reading order (README first)."""
    found = []
    starts = r'(python -m scripts\.|python benchmarks/|dora |audiogen-\w+ |make |tensorboard |sudo |MALLOC_)'
    for path in DOCS:
        text = path.read_text()
        for _lang, block in re.findall(r'```(bash|sh|)\n(.*?)```', text, re.S):
            for line in re.sub(r'\\\n\s*', ' ', block).splitlines():
                if re.match(starts, line.strip()):
                    found.append((path.name, line.strip()))
        for span in re.findall(r'`([^`\n]+)`', re.sub(r'```.*?```', '', text, flags=re.S)):
            if re.match(r'(python -m scripts\.|dora run |audiogen-\w+ |make )', span):
                found.append((path.name, span))
    return found


def decide(command: str) -> tuple[bool, str]:
    """(run it, the rule's reason) for a command without its comment."""
    for pattern, reason in RULES:
        if re.search(pattern, command):
            return reason is None, reason or 'runs'
    raise AssertionError(f'no rule decides whether the docs example `{command}` runs on a CPU: add one to RULES')


def substitute(command: str, sig: str, sounds: Path) -> str:
    """The walk's XP, sounds and dataset for the docs' placeholders."""
    for placeholder in SIGS:
        command = command.replace(placeholder, sig)
    command = command.replace('~/my_sounds', str(sounds)).replace('dataset=NAME', 'dataset=mysounds')
    return command.replace('exported/rain', 'exported/mysounds')


def test_every_example_has_a_decision():
    decided = [(where, command, *decide(command.split('  #')[0].strip())) for where, command in examples()]
    assert len(decided) > 40 and any(run for _, _, run, _ in decided)


@pytest.mark.slow
def test_walk_the_docs_on_a_cpu(tmp_path):
    home, work, sounds = tmp_path / 'home', tmp_path / 'work', tmp_path / 'my_sounds'
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith('AUDIOGEN_')}
    env.update(AUDIOGEN_HOME=str(home), HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', OMP_WAIT_POLICY='PASSIVE')
    (work / 'prompts.txt').write_text('an engine idling\n# a comment\n\nslow footsteps\n')
    demo_data = [sys.executable, '-m', 'scripts.make_demo_data', str(sounds), '--classes', 'new', '--per-class', '4']
    subprocess.run(demo_data, cwd=work, env=env, check=True, capture_output=True)
    # The README's own-sounds path first: it makes the XP that the other examples use.
    setup = [
        'python -m scripts.prepare_dataset ~/my_sounds --name mysounds',
        'python -m scripts.make_tiny_package',
        'dora run solver=audiogen/tiny dataset=mysounds',
    ]
    walked = []
    for command in setup:
        walked.append(step(command, 'setup', env, work, '', sounds))
    sig = next((home / 'outputs' / 'xps').iterdir()).name
    for where, example in examples():
        command = example.split('  #')[0].strip()
        run, reason = decide(command)
        if not run:
            walked.append(f'skip {where}: {command}  ({reason})')
        else:  # the setup's commands again too: re-running them as printed is harmless
            walked.append(step(command, where, env, work, sig, sounds))
            if command == 'make clean-demo':  # it cleans where the demo wrote: under $AUDIOGEN_HOME
                assert not (home / 'egs' / 'demo').exists() and not (home / 'config' / 'dataset' / 'demo.yaml').exists()
    print('\n'.join(walked))
    assert (work / 'exported' / 'mysounds' / 'state_dict.bin').is_file()
    assert list((work / 'out').rglob('*.wav')) and list((work / 'evaluations').rglob('report.json'))


def step(command: str, where: str, env: dict, work: Path, sig: str, sounds: Path) -> str:
    """Run one example as printed (placeholders filled in); plan_memory's 3 means "doesn't fit" (docs/memory.md)."""
    line = substitute(command, sig, sounds)
    cwd = ROOT if line.startswith(('dora', 'make')) else work
    proc = subprocess.run(command_argv(line), cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    allowed = (0, 3) if 'plan_memory' in line else (0,)
    assert proc.returncode in allowed, f'{where}: `{line}` exited {proc.returncode}:\n{proc.stderr[-3000:]}'
    assert 'Traceback' not in proc.stderr, f'{where}: `{line}`:\n{proc.stderr[-3000:]}'
    return f'ran  {where}: {line}'
