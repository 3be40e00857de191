"""Every config key is honoured or rejected: a key that nothing reads is a bug (a user sets it and nothing happens).

The test runs a whole tiny XP in-process (train with accumulation, valid, evaluate, generate, checkpoints), the way
`dora run` does (`solvers/train.py:_train`), with OmegaConf's node lookup instrumented, and lists the leaf keys of the
composed config that nothing looked up. What is read outside that path is in ALLOWED, each with who reads it.
"""

from __future__ import annotations

import logging
import typing as tp

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from solvers.errors import AudiogenError

# Keys read outside an in-process CPU run of the tiny preset, with who reads them. A new key either gets read by the
# code it configures or is rejected (see solvers/training/settings.py); only what the run below can't reach goes here.
ALLOWED = {
    'dora': 'Dora itself: the XP folder root, signature exclusions, git checks, `dora grid` shepherd',
    'slurm': "Dora's Shepherd when a grid or `dora launch` submits to SLURM (solvers/training/slurm.py maps it)",
    'solver': "the solver preset's name (Hydra's group choice); solvers/train.py always builds our solver",
    'label': 'solvers/tensorboard.run_name, when set; the run below leaves it null',
    'execute_inplace': "audiocraft's run_one_stage, with execute_only (tests/test_train_e2e.py)",
    'adapter': 'solvers/models/adapters.py, with adapter=lora (tests/test_adapters.py); this run is a full fine-tune',
    'fsdp': 'only fsdp.use is read: the solver refuses fsdp.use=true before any other fsdp key matters',
    'wandb': "audiocraft's StandardSolver, with logging.log_wandb=true",
    'cache.write': "audiocraft's token cache, only with cache.path, which the solver refuses",
    'cache.write_shard': '(as cache.write)',
    'cache.write_num_shards': '(as cache.write)',
    'interleave_stereo_codebooks.per_timestep': 'only with interleave_stereo_codebooks.use, which is refused',
    'checkpoint.keep_last': 'the epoch-checkpoint retention, with checkpoint.save_every (tests/test_checkpoints.py)',
    'checkpoint.reset': 'resume, when the XP folder has a checkpoint (tests/test_checkpoints.py)',
}


def _root(node: tp.Any) -> tp.Any:
    while node._get_parent() is not None:
        node = node._get_parent()
    return node


def _leaves(node: tp.Any, prefix: str = '') -> list[str]:
    if isinstance(node, DictConfig):
        out = []
        for key in node.keys():
            child = node._get_node(key)
            path = f'{prefix}.{key}' if prefix else str(key)
            out += _leaves(child, path) if isinstance(child, (DictConfig, ListConfig)) and len(child) else [path]
        return out
    return [prefix]


def test_every_config_key_is_read_or_allowed(tmp_path, monkeypatch, demo_overrides):
    from solvers import train

    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(tmp_path / 'outputs'))
    train.main.dora.dir = tmp_path / 'outputs'
    xp = train.main.get_xp(demo_overrides + ['optim.epochs=1', 'evaluate.every=1', 'generate.every=1'])
    cfg = xp.cfg
    all_keys = set(_leaves(cfg))

    read: set[str] = set()
    original = DictConfig._get_node
    whole = [0]  # > 0 while the whole config is copied or serialised (checkpoints, hparams): not a read of a key

    def tracking(self: DictConfig, key: tp.Any, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        node = original(self, key, *args, **kwargs)
        if not whole[0] and _root(self) is cfg:
            try:
                read.add(self._get_full_key(key))
            except Exception:
                pass
        return node

    def suspended(function: tp.Callable) -> tp.Callable:
        def wrapper(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
            root = bool(args) and isinstance(args[0], DictConfig) and args[0]._get_parent() is None
            whole[0] += root
            try:
                return function(*args, **kwargs)
            finally:
                whole[0] -= root

        return wrapper

    for name in ('to_yaml', 'to_container', 'to_object', 'merge', 'unsafe_merge', 'masked_copy', 'resolve'):
        monkeypatch.setattr(OmegaConf, name, staticmethod(suspended(getattr(OmegaConf, name))))
    monkeypatch.setattr(DictConfig, '__deepcopy__', suspended(DictConfig.__deepcopy__))
    monkeypatch.setattr(DictConfig, 'copy', suspended(DictConfig.copy))

    xp.folder.mkdir(parents=True)
    monkeypatch.chdir(xp.folder)  # where `dora run` runs the job
    handlers = logging.getLogger().handlers[:]
    monkeypatch.setattr(DictConfig, '_get_node', tracking)
    try:
        with xp.enter():
            train._train(cfg)
    finally:
        monkeypatch.undo()
        logging.getLogger().handlers[:] = handlers  # flashy.setup_logging adds file and stream handlers

    def covered(key: str) -> bool:
        parts = key.split('.')
        return key in read or any('.'.join(parts[:i]) in ALLOWED for i in range(1, len(parts) + 1))

    unread = sorted(k for k in all_keys if not covered(k))
    assert not unread, f'{len(unread)} config keys nothing reads:\n' + '\n'.join(unread)
    stale = sorted(k for k in ALLOWED if not any(leaf == k or leaf.startswith(k + '.') for leaf in all_keys))
    assert not stale, f'ALLOWED names keys the config no longer has: {stale}'


@pytest.mark.parametrize(
    'override, expected',
    [
        ('compression_model_n_q=2', 'compression_model_n_q=2 is not supported: the LM predicts every codebook'),
        (
            'interleave_stereo_codebooks.use=true',
            'interleave_stereo_codebooks.use=True is not supported: AudioGen is mono',
        ),
        ('checkpoint.keep_every_states=[ema]', "checkpoint.keep_every_states=['ema'] is not supported"),
        ('cache.path=/tmp/tokens', 'cache.path=/tmp/tokens is not supported'),
        ('compression_model_checkpoint=/elsewhere', 'compression_model_checkpoint=/elsewhere: the codec always comes'),
        ('optim.max_bad_steps=0', 'optim.max_bad_steps=0: it must be at least 1'),
    ],
)
def test_audiocraft_keys_the_solver_replaces_are_refused_by_name(override, expected):
    from solvers import project
    from solvers.training import settings

    cfg = project.compose(['solver=audiogen/tiny', override])
    with pytest.raises(AudiogenError) as err:
        settings.refuse_unsupported(cfg)
    assert expected in str(err.value)
