"""Safe checkpoint loading: `torch.load(weights_only=True)` plus the few OmegaConf types old checkpoints pickle.

audiocraft/flashy store the Hydra config object in every checkpoint ('xp.cfg'); torch >= 2.6 loads with
weights_only=True by default and rejects it. We store YAML instead (see the solver's `state_dict`) and, to read
checkpoints written by stock audiocraft, allow exactly the OmegaConf container and node classes: plain data
holders whose unpickling runs no user code.
"""
from __future__ import annotations

import collections
import typing as tp


def omegaconf_safe_globals() -> list:
    """Classes a pickled OmegaConf config references, for `torch.serialization.safe_globals`."""
    from omegaconf import DictConfig, ListConfig, base, nodes

    node_types = [getattr(nodes, name) for name in (
        'AnyNode', 'StringNode', 'IntegerNode', 'FloatNode', 'BooleanNode', 'BytesNode', 'PathNode', 'EnumNode')
        if hasattr(nodes, name)]
    return [DictConfig, ListConfig, base.ContainerMetadata, base.Metadata, *node_types,
            tp.Any, dict, list, int, float, str, bool, collections.defaultdict]
