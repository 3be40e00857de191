"""Every recipe in README.md and docs/ keeps its preset's effective batch (batch x accumulation) unless it says so.

A recipe that lowers ``dataset.batch_size`` to fit a GPU must raise ``optim.grad_accum_steps`` by as much: otherwise
the optimisation (and the learning rate that suits it) silently changes. ``dataset.batch_size`` is split across the
GPUs of a run (solvers/train.py), so the product is the effective batch at any GPU count.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from helpers import ROOT

from solvers import project
from solvers.training import memory

DOCS = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
BATCH_KEYS = ('dataset.batch_size=', 'optim.grad_accum_steps=')
# Spans that set a batch on purpose, with the reason (a recipe that changes the batch says so in its line instead).
NOT_RECIPES = {
    'device=cpu dataset.batch_size=1': 'docs/benchmarks.md: the configuration a CPU micro-benchmark is composed from',
}


def recipes() -> list[tuple[str, str, str]]:
    """(file, the line, the command) for every command (backtick span or code line) that sets a batch key."""
    found = []
    for path in DOCS:
        text = path.read_text()
        spans = re.findall(r'`([^`]+)`', re.sub(r'```.*?```', '', text, flags=re.S)) + [
            line for block in re.findall(r'```(?:bash|sh)?\n(.*?)```', text, re.S) for line in block.splitlines()
        ]
        for span in spans:
            span = ' '.join(span.split())
            single = len(span.split()) == 1  # a setting named in prose (`optim.grad_accum_steps=1`), not a recipe
            if any(key in span for key in BATCH_KEYS) and not single and not any(k in span for k in NOT_RECIPES):
                line = next((ln for ln in text.splitlines() if span[:40] in ' '.join(ln.split())), span)
                found.append((path.relative_to(ROOT).as_posix(), line, span))
    return found


def overrides_of(command: str) -> list[str]:
    """The config overrides of a command; a prepared dataset's name (``dataset=mysounds``) is left out (its preset
    sets the template's batch) and ``...`` stands for the GPU preset, as in the tables of docs/memory.md."""
    words = shlex.split(command.split('#')[0])
    out = [w for w in words if '=' in w and not w.startswith('-') and not w.startswith('dataset=')]
    if not any(w.startswith('solver=') for w in out):
        out.insert(0, 'solver=audiogen/train')
    return out


def test_the_docs_have_recipes():
    assert len(recipes()) >= 4  # README's table and step 3, docs/memory.md's table, docs/benchmarks.md's


@pytest.mark.parametrize('where, line, command', recipes(), ids=lambda v: str(v)[:60])
def test_recipes_keep_the_effective_batch(where: str, line: str, command: str):
    overrides = overrides_of(command)
    presets = [o for o in overrides if o.partition('=')[0] in project.GROUPS]
    ours = memory.effective_batch(project.compose(overrides))
    theirs = memory.effective_batch(project.compose(presets))
    if 'effective batch' in line:
        return  # the line says what it does to the batch
    assert ours == theirs, f'{where}: `{command}` trains on {ours} clips per update, its preset on {theirs}: {line}'


def test_the_planner_says_when_a_command_changes_the_effective_batch():
    cfg = project.compose(['solver=audiogen/train', 'dataset.batch_size=4', 'optim.grad_accum_steps=2'])
    note = memory.batch_note(cfg, project.compose(['solver=audiogen/train']))
    assert '= 8 per update' in note and "the preset's is 32" in note and 'optim.grad_accum_steps=8 keeps it' in note
    kept = project.compose(['solver=audiogen/train', 'dataset.batch_size=4', 'optim.grad_accum_steps=8'])
    note = memory.batch_note(kept, project.compose(['solver=audiogen/train']))
    assert note.endswith("= 32 per update, the preset's.")


def test_the_docs_walked_here_exist():
    assert all(isinstance(p, Path) and p.is_file() for p in DOCS)
