"""The rooms of ``solvers/`` import each other in one direction only (docs/architecture.md draws the arrows).

The check reads every module's imports with :mod:`ast`, lazy ones inside functions included, so a cycle can't hide in
a function body.
"""

from __future__ import annotations

import ast
import typing as tp
from pathlib import Path

import pytest

SOLVERS = Path(__file__).resolve().parent.parent / 'solvers'
BOTTOM = {'errors', 'atomic', 'project'}  # import no room
ENTRY = {'train', 'grids', '__init__'}  # what Dora loads: may use every room but the demo's
ROOMS = ('models', 'data', 'generation', 'evaluation', 'training', 'demo')
# room -> the rooms it may import (besides itself and the bottom modules)
ALLOWED: dict[str, set[str]] = {
    'bottom': set(),
    'models': set(),
    'data': set(),
    'generation': {'models'},
    'evaluation': {'models', 'generation', 'data'},
    'training': {'models', 'generation', 'evaluation', 'data'},
    'demo': {'models', 'generation', 'evaluation', 'data'},
    'entry': {'models', 'generation', 'evaluation', 'data', 'training'},
}


def room_of(parts: tuple[str, ...]) -> str:
    """The room of a module given its dotted path below ``solvers``."""
    head = parts[0] if parts else '__init__'
    if head in ROOMS:
        return head
    if head in BOTTOM:
        return 'bottom'
    if head in ENTRY:
        return 'entry'
    raise AssertionError(f'solvers/{"/".join(parts)} belongs to no room: move it into one of {ROOMS}')


def imported_modules(path: Path) -> list[tuple[int, tuple[str, ...]]]:
    """(line, dotted path below ``solvers``) of every ``solvers`` module the file imports."""
    own = path.relative_to(SOLVERS).with_suffix('').parts
    package = own[:-1] if own[-1] != '__init__' else own[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = base + (node.module.split('.') if node.module else [])
                names = ['.'.join(['solvers', *module])]
                names += ['.'.join(['solvers', *module, a.name]) for a in node.names]
            else:
                names = [node.module or '']
                names += [f'{node.module}.{a.name}' for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split('.')
            if parts[0] == 'solvers' and len(parts) > 1:
                found.append((node.lineno, tuple(parts[1:])))
    return found


def module_files() -> list[Path]:
    return sorted(SOLVERS.rglob('*.py'))


def test_every_module_is_in_a_room() -> None:
    for path in module_files():
        room_of(path.relative_to(SOLVERS).with_suffix('').parts)


@pytest.mark.parametrize('room', ('bottom', *ROOMS, 'entry'))
def test_rooms_import_in_one_direction(room: str) -> None:
    wrong = []
    for path in module_files():
        parts = path.relative_to(SOLVERS).with_suffix('').parts
        if room_of(parts) != room:
            continue
        for line, target in imported_modules(path):
            if target[0] not in {*ROOMS, *BOTTOM, *ENTRY}:
                continue  # an attribute of the solvers package itself
            other = room_of(target)
            if other not in (room, 'bottom') and other not in ALLOWED[room]:
                wrong.append(f'solvers/{path.relative_to(SOLVERS)}:{line} imports solvers.{".".join(target)} ({other})')
    assert not wrong, f'{room} may import only {sorted(ALLOWED[room]) or "no room"}:\n' + '\n'.join(wrong)


def test_bottom_modules_import_no_room() -> None:
    """errors, atomic and project sit below every room."""
    for name in BOTTOM:
        for line, target in imported_modules(SOLVERS / f'{name}.py'):
            assert target[0] in BOTTOM, f'solvers/{name}.py:{line} imports solvers.{".".join(target)}'


def uses_of(path: Path) -> set[str]:
    """What a module uses outside its own room: other rooms by name, bottom modules by name."""
    own = room_of(path.relative_to(SOLVERS).with_suffix('').parts)
    used = set()
    for _, target in imported_modules(path):
        if target[0] not in {*ROOMS, *BOTTOM, *ENTRY}:
            continue
        other = room_of(target)
        if other == 'bottom':
            used.add(target[0])
        elif other != own:
            used.add(other)
    used.discard(path.stem if own == 'bottom' else '')
    return used


def documented_modules() -> dict[str, set[str]]:
    """docs/architecture.md's module table: `solvers/...py` -> the names in its "uses" column."""
    table = {}
    doc = (SOLVERS.parent / 'docs' / 'architecture.md').read_text()
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) >= 3 and cells[0].startswith('`solvers/') and cells[0].endswith('.py`'):
            names = {n.strip(' `') for n in cells[1].split(',')} - {'', '—'}
            table[cells[0].strip('`')] = names
    return table


def test_the_module_table_in_docs_matches_the_imports() -> None:
    """docs/architecture.md lists every module of solvers/ with the rooms and bottom modules it imports."""
    table = documented_modules()
    actual = {f'solvers/{p.relative_to(SOLVERS)}': uses_of(p) for p in module_files()}
    missing = sorted(set(actual) - set(table))
    gone = sorted(set(table) - set(actual))
    assert not missing and not gone, f'docs/architecture.md: add {missing}, remove {gone}'
    wrong = [f'{m}: documented {sorted(table[m])}, imports {sorted(u)}' for m, u in actual.items() if table[m] != u]
    assert not wrong, 'docs/architecture.md module table is out of date:\n' + '\n'.join(wrong)


def test_functions_read_in_one_screen() -> None:
    """No function or method in solvers/ runs over 60 lines (docstring included): a longer one is several steps."""
    long = []
    for path in module_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = tp.cast(int, node.end_lineno) - node.lineno + 1
                if lines > 60:
                    long.append(f'solvers/{path.relative_to(SOLVERS)}:{node.lineno} {node.name} ({lines} lines)')
    assert not long, 'split these into named steps:\n' + '\n'.join(long)
