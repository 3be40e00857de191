"""Build hook: this project is used from its clone, so only the editable install (what `uv sync` / `make` do) builds.

A regular wheel would put packages named `solvers` and `scripts` into site-packages, without `config/`, and the
commands would then write user data beside the installed code. The hook refuses that build with the way to install.
"""

from __future__ import annotations

import typing as tp

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

REFUSAL = (
    'audiogen-finetune is used from a clone of its repository: install it there with `make install` (or '
    '`uv sync`, an editable install; `pip install -e .` also works), then run its commands from any directory '
    '(`.venv/bin/audiogen-generate ...`). A regular wheel (`pip install .`, `uv build`) is not supported.'
)


class CloneOnly(BuildHookInterface):
    """Refuses every wheel but the editable one."""

    PLUGIN_NAME = 'custom'

    def initialize(self, version: str, build_data: dict[str, tp.Any]) -> None:
        if self.target_name == 'wheel' and version != 'editable':
            raise RuntimeError(REFUSAL)
