"""Export of a training XP as a package that plain audiocraft loads (scripts/export.py, solvers/models/export.py).

Fast tests use a hand-written XP (a checkpoint.th with distinct best/EMA/last weights over the session's tiny
package); the `slow` ones export the XP that `dora run` trains in conftest's `trained_xp` and compare the export
with the training solver itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAKE_SIG, ROOT, make_fake_xp, subprocess_env
from omegaconf import OmegaConf

from scripts import export as export_cli
from solvers.models import export, package


@pytest.fixture(scope='session')
def fake_xp(tmp_path_factory, tiny_package) -> dict:
    outputs = tmp_path_factory.mktemp('fake_outputs')
    return {'outputs': outputs, 'folder': make_fake_xp(outputs, tiny_package), 'sig': FAKE_SIG, 'package': tiny_package}


@pytest.fixture()
def outputs_env(fake_xp, monkeypatch):
    """Point AUDIOGEN_OUTPUTS at the fake XP's outputs root, as a user would for another run folder."""
    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(fake_xp['outputs']))
    return fake_xp


@pytest.fixture(scope='session')
def exported(tmp_path_factory, fake_xp) -> Path:
    """The fake XP exported by folder path with its best weights."""
    return export.export_xp(fake_xp['folder'], tmp_path_factory.mktemp('export') / 'pkg')


def expected_weights(fake_xp: dict, weights: str) -> dict:
    state = torch.load(fake_xp['folder'] / 'checkpoint.th', weights_only=True)
    return {'best': state['best_state']['model'], 'ema': state['ema']['state']['model'], 'last': state['model']}[
        weights
    ]


def assert_same_state(actual: dict, expected: dict, atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key].float(), value.float(), atol=atol, rtol=0, msg=key)


def test_export_layout_and_plain_audiocraft_load(exported, fake_xp):
    from audiocraft.models import AudioGen

    lm_file = torch.load(exported / package.LM_FILE, weights_only=True)
    assert set(lm_file) == {'xp.cfg', 'best_state', 'version', 'exported'}
    assert isinstance(lm_file['xp.cfg'], str) and '${' not in lm_file['xp.cfg']  # self-contained, resolved
    cfg = OmegaConf.create(lm_file['xp.cfg'])
    for key in export.MACHINE_KEYS:
        assert key not in cfg, key
    assert cfg.conditioners.description.model == 'lut'  # the package's conditioner, not a default
    assert cfg.dataset.segment_duration == 10.0  # the package's window, not the demo's 1 s segments
    codec_file = torch.load(exported / package.COMPRESSION_FILE, weights_only=True)
    assert 'pretrained' not in codec_file and {'xp.cfg', 'best_state'} <= set(codec_file)
    provenance = json.loads((exported / 'export.json').read_text())
    assert provenance['sig'] == FAKE_SIG and provenance['weights'] == 'best' and provenance['epoch'] == 2
    assert not list(exported.parent.glob('.*'))  # no temporary directory left beside it

    model = AudioGen.get_pretrained(str(exported), device='cpu')
    assert model.max_duration == 10.0 and model.sample_rate == 16000
    assert_same_state(model.lm.state_dict(), expected_weights(fake_xp, 'best'))
    codec = package.load_compression_model(str(fake_xp['package']))
    assert_same_state(model.compression_model.state_dict(), codec.state_dict())


@pytest.mark.parametrize('weights', ['ema', 'last'])
def test_weights_choice_and_half(outputs_env, tmp_path, weights):
    out = tmp_path / 'pkg'
    assert export_cli.main([FAKE_SIG, str(out), '--weights', weights, '--half']) == 0
    state = package.lm_state(str(out))
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert_same_state(state, expected_weights(outputs_env, weights), atol=2e-3)


def test_missing_ema_names_the_available_weights(tmp_path, tiny_package, capsys, monkeypatch):
    make_fake_xp(tmp_path / 'outputs', tiny_package, sig='0e0e0e0e', ema=False)
    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(tmp_path / 'outputs'))
    assert export_cli.main(['0e0e0e0e', str(tmp_path / 'pkg'), '--weights', 'ema']) == 2
    err = capsys.readouterr().err
    assert 'no ema weights' in err and 'best, last' in err and 'Traceback' not in err
    assert not (tmp_path / 'pkg').exists()


def test_refuses_a_non_empty_dir_and_force_replaces_it(fake_xp, tmp_path, capsys):
    out = tmp_path / 'pkg'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    assert export_cli.main([str(fake_xp['folder']), str(out)]) == 2
    assert 'not empty' in capsys.readouterr().err and (out / 'keep.txt').read_text() == 'mine'
    assert export_cli.main([str(fake_xp['folder']), str(out), '--force']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['compression_state_dict.bin', 'export.json', 'state_dict.bin']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['pkg']  # nothing left aside
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert export_cli.main([str(fake_xp['folder']), str(empty)]) == 0  # an empty dir is fine without --force


def test_refuses_to_overwrite_its_own_sources(fake_xp, capsys):
    for target in (fake_xp['folder'], fake_xp['package'], fake_xp['folder'].parent):
        assert export_cli.main([str(fake_xp['folder']), str(target), '--force']) == 2
        assert 'which the export reads' in capsys.readouterr().err
    # Without --force the answer is the same (it never suggests a --force that would then be refused).
    for target in (fake_xp['folder'], fake_xp['folder'].parent):
        assert export_cli.main([str(fake_xp['folder']), str(target)]) == 2
        err = capsys.readouterr().err
        assert 'which the export reads' in err and '--force' not in err
    assert (fake_xp['folder'] / 'checkpoint.th').is_file() and (fake_xp['package'] / package.LM_FILE).is_file()


def test_codec_pointers_are_materialised(tmp_path, tiny_package):
    pointing = tmp_path / 'pointing'
    pointing.mkdir()
    (pointing / package.LM_FILE).write_bytes((tiny_package / package.LM_FILE).read_bytes())
    torch.save({'pretrained': str(tiny_package)}, pointing / package.COMPRESSION_FILE)
    xp = make_fake_xp(tmp_path / 'outputs', pointing, sig='0badc0de')
    out = export.export_xp(xp, tmp_path / 'pkg')
    inline = torch.load(out / package.COMPRESSION_FILE, weights_only=True)
    original = torch.load(tiny_package / package.COMPRESSION_FILE, weights_only=True)
    assert 'pretrained' not in inline and inline['xp.cfg'] == original['xp.cfg']
    assert_same_state(inline['best_state'], original['best_state'])

    torch.save({'pretrained': 'facebook/encodec_32khz'}, pointing / package.COMPRESSION_FILE)
    with pytest.raises(export.ExportError, match='HF transformers or DAC'):
        export.export_xp(xp, tmp_path / 'pkg2')
    assert not (tmp_path / 'pkg2').exists()


def test_cli_subprocess_bad_signature(tmp_path):
    env = subprocess_env(tmp_path / 'outputs')
    proc = subprocess.run(
        [sys.executable, '-m', 'scripts.export', 'deadbeef', str(tmp_path / 'pkg')],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'No XP with signature deadbeef' in proc.stderr and 'AUDIOGEN_OUTPUTS' in proc.stderr
    assert 'Traceback' not in proc.stderr and not (tmp_path / 'pkg').exists()


def test_xp_and_its_export_generate_the_same_clips(outputs_env, exported):
    """generate.py on the XP (by signature) and on its export: same weights, same seeds, same tokens."""
    from solvers.generation import generate as generation

    tokens = []
    for spec in (FAKE_SIG, str(exported)):
        model = generation.load_model(generation.resolve_model(spec), 'cpu')
        generation.GenerationParams(duration=0.5).apply(model)
        with generation.PerItemSampler([3, 4]):
            tokens.append(model.generate(['a dog barking', 'rain'], return_tokens=True)[1])
    assert torch.equal(tokens[0], tokens[1])


# ---------------------------------------------------------------------------------------------------- real XP
@pytest.mark.slow
def test_round_trip_matches_the_training_solver(trained_xp, tmp_path, monkeypatch):
    """Greedy tokens of the exported model equal those of the training solver restored with its best weights."""
    from audiocraft.models import AudioGen
    from audiocraft.modules.conditioners import ConditioningAttributes

    from solvers import train

    monkeypatch.setenv('AUDIOGEN_OUTPUTS', str(trained_xp['outputs']))
    monkeypatch.setattr(train.main.dora, 'dir', trained_xp['outputs'])
    sig = trained_xp['folder'].name
    out = export.export_xp(sig, tmp_path / 'pkg')
    model = AudioGen.get_pretrained(str(out), device='cpu')
    model.set_generation_params(use_sampling=False, duration=1.0, cfg_coef=3.0)
    prompts = ['a dog barking', 'an emergency siren wailing']
    _, exported_tokens = model.generate(prompts, return_tokens=True)

    solver = train.get_solver_from_sig(sig)
    solver.model.eval()
    attributes = [ConditioningAttributes(text={'description': p}) for p in prompts]
    solver_tokens = solver.model.generate(
        None, attributes, max_gen_len=exported_tokens.shape[-1], use_sampling=False, cfg_coef=3.0
    )
    assert torch.equal(exported_tokens, solver_tokens)
    assert_same_state(model.lm.state_dict(), solver.model.state_dict())
