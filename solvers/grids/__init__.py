"""Dora grids: `dora grid <name>` runs `solvers/grids/<name>.py` (explorers in `_explorers.py`; see docs/cluster.md)."""
