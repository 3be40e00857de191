"""Layer 1: every preset composes, and keys that don't change results leave the XP signature alone."""

from __future__ import annotations

import itertools

import pytest
from omegaconf import OmegaConf

from solvers import project

GROUPS = {
    group: sorted(p.stem for p in (project.CONFIG_DIR / group).glob('*.yaml'))
    for group in ('model', 'optim', 'slurm', 'adapter')
}
# Dataset presets other than the template are written by prepare_dataset (not committed): test the committed one.
GROUPS['dataset'] = ['template']
SOLVERS = sorted(f'audiogen/{p.stem}' for p in (project.CONFIG_DIR / 'solver' / 'audiogen').glob('*.yaml'))


def test_groups_hold_the_expected_presets():
    assert {'audiogen_medium', 'tiny'} <= set(GROUPS['model'])
    assert {'finetune', 'demo', 'cpu'} <= set(GROUPS['optim'])
    assert {'local', 'cluster'} <= set(GROUPS['slurm'])
    assert {'none', 'lora'} <= set(GROUPS['adapter'])
    assert {'audiogen/train', 'audiogen/demo', 'audiogen/tiny'} <= set(SOLVERS)


@pytest.mark.parametrize('solver', SOLVERS)
@pytest.mark.parametrize('group', sorted(GROUPS))
def test_every_preset_composes(solver, group):
    for choice in GROUPS[group]:
        cfg = project.compose([f'solver={solver}', f'{group}={choice}'])
        # Every value the builders read must be set and resolvable (??? only where a user must choose).
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        assert container['solver'] == 'audiogen_finetune'
        assert cfg.sample_rate == 16000 and cfg.channels == 1
        # model=from_package leaves the architecture to the package (filled and checked when the solver loads it).
        assert cfg.transformer_lm.n_q == (None if choice == 'from_package' else 4)


def test_train_defaults_fine_tune_medium_on_gpu():
    cfg = project.compose(['solver=audiogen/train'])
    assert cfg.pretrained == 'facebook/audiogen-medium'
    assert cfg.device == 'cuda' and cfg.autocast and cfg.autocast_dtype == 'bfloat16'
    assert (cfg.transformer_lm.dim, cfg.transformer_lm.num_layers, cfg.transformer_lm.num_heads) == (1536, 48, 24)
    assert cfg.transformer_lm.card == 2048 and cfg.codebooks_pattern.delay.delays == [0, 1, 2, 3]
    assert cfg.conditioners.description.model == 't5'
    assert 1e-5 <= cfg.optim.lr <= 1e-4 and 0.5 <= cfg.optim.max_norm <= 1.0
    assert cfg.optim.ema.use and cfg.optim.grad_accum_steps >= 1
    assert cfg.schedule.lr_scheduler in ('cosine', 'inverse_sqrt')


def test_tiny_on_your_data_is_offline_cpu():
    cfg = project.compose(['solver=audiogen/tiny'])
    assert cfg.device == 'cpu' and not cfg.autocast and cfg.pretrained == 'tiny'
    assert cfg.conditioners.description.model == 'lut' and cfg.transformer_lm.memory_efficient
    assert cfg.datasource.train is None  # dataset=NAME picks the user's prepared preset
    assert cfg.generate.prompts is None and cfg.generate.prompts_from_dataset > 0  # samples of the user's captions


def test_demo_is_offline_cpu():
    cfg = project.compose(['solver=audiogen/demo'])
    assert cfg.device == 'cpu' and not cfg.autocast
    assert cfg.conditioners.description.model == 'lut' and cfg.conditioners.description.lut.tokenizer == 'noop'
    assert cfg.optim.grad_accum_steps > 1 and cfg.optim.ema.use and cfg.optim.max_norm


def test_all_combinations_share_one_key_set():
    """Dora compares every XP config with the base key by key: presets may change values, never the key set."""

    def keys(cfg, prefix=''):
        out = set()
        for key, value in cfg.items():
            out.add(prefix + key)
            if OmegaConf.is_dict(value):
                out |= keys(value, prefix + key + '.')
        return out

    base = keys(project.compose([]))
    for model, dataset, adapter in itertools.product(GROUPS['model'], GROUPS['dataset'], GROUPS['adapter']):
        overrides = [f'model={model}', f'dataset={dataset}', f'adapter={adapter}']
        assert keys(project.compose(overrides)) == base, overrides


def test_excluded_keys_keep_the_signature(tmp_path, monkeypatch):
    from solvers import train

    train.main.dora.dir = tmp_path
    base = ['solver=audiogen/demo']
    sig = train.main.get_xp(base).sig
    neutral = [
        'device=cuda',
        'dataset.num_workers=3',
        'logging.level=DEBUG',
        'logging.log_updates=2',
        'checkpoint.keep_last=2',
        'generate.every=5',
        'num_threads=4',
        'tensorboard.with_media_logging=false',
        'efficient_attention_backend=xformers',
        'evaluate.every=3',
        'evaluate.num_prompts=3',
        'evaluate.clap.model=tiny',
        'optim.ema.device=cpu',
        'transformer_lm.checkpointing=torch',
    ]
    for override in neutral:
        assert train.main.get_xp(base + [override]).sig == sig, override
    assert train.main.get_xp(base + neutral).sig == sig
    for override in [
        'optim.lr=1e-4',
        'optim.grad_accum_steps=4',
        'dataset.batch_size=4',
        'model=audiogen_medium',
        'adapter=lora',
        'adapter.rank=8',
        'freeze.first_layers=2',
        'checkpoint.best_metric=evaluate/clap',
        'optim.optimizer=adamw8bit',
    ]:
        assert train.main.get_xp(base + [override]).sig != sig, override


def test_prepared_presets_are_found_under_the_data_root(tmp_path, monkeypatch):
    """prepare_dataset writes presets to $AUDIOGEN_HOME/config/dataset; `dataset=NAME` finds them there."""
    preset = tmp_path / 'config' / 'dataset' / 'elsewhere.yaml'
    preset.parent.mkdir(parents=True)
    preset.write_text(
        '# @package __global__\ndatasource:\n  train: egs/elsewhere/train\n  valid: egs/elsewhere/valid\n'
        'dataset:\n  batch_size: 3\n'
    )
    monkeypatch.setenv('AUDIOGEN_HOME', str(tmp_path))
    cfg = project.compose(['solver=audiogen/tiny', 'dataset=elsewhere'])
    assert cfg.datasource.train == 'egs/elsewhere/train' and cfg.dataset.batch_size == 3
    assert project.resolve_path(cfg.datasource.train) == tmp_path / 'egs' / 'elsewhere' / 'train'


@pytest.mark.parametrize(
    'override, expected',
    [
        ('optim.lrr=1', "Unknown config key 'optim.lrr': no preset or base config defines it. Did you mean optim.lr?"),
        ('dataset.segment_durtion=2', 'Did you mean dataset.segment_duration?'),
        ('dataset=mysoundz', 'Unknown preset dataset=mysoundz: config/dataset/ has'),
        ('solver=audiogen/trian', 'Did you mean solver=audiogen/train?'),
    ],
)
def test_config_mistakes_are_one_sentence(override, expected):
    from solvers.errors import AudiogenError

    with pytest.raises(AudiogenError) as err:
        project.compose(['solver=audiogen/tiny', override])
    assert expected in str(err.value) and '\n' not in str(err.value)
