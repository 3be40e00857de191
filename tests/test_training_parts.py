"""The solver's parts, each built alone from its config sub-tree or arguments: no solver, no model, no XP."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from omegaconf import OmegaConf

from solvers.errors import AudiogenError
from solvers.training import optim, resume, settings, signals


def test_a_stop_signal_waits_for_the_boundary_then_exits_with_its_code():
    with signals.StopSignals() as stops:
        assert stops.pending is None
        stops.stop_if_signalled('nothing pending: returns')
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
        assert stops.pending == signal.SIGTERM
        with pytest.raises(SystemExit) as stopped:
            stops.stop_if_signalled('update 3 of epoch 1 is checkpointed')
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not stops.on_signal, 'the previous handlers are back'


def test_a_second_ctrl_c_stops_at_once():
    with signals.StopSignals() as stops:
        stops.on_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            stops.on_signal(signal.SIGINT)


def test_a_loader_that_dies_of_the_signal_ends_the_epoch_only_after_one():
    def batches():
        yield 1
        raise RuntimeError('DataLoader worker (pid 7) is killed by signal: Interrupt')

    stops = signals.StopSignals()
    with pytest.raises(RuntimeError):
        list(stops.batches_until_stopped(batches()))
    stops.pending = signal.SIGINT
    assert list(stops.batches_until_stopped(batches())) == [1]


def test_the_guard_skips_non_finite_steps_then_stops_the_run(tmp_path):
    guard = optim.NonFiniteGuard(max_bad_steps=2)
    assert guard.finite(torch.tensor(1.0), torch.tensor(3.0)) and guard.bad_steps == 0
    assert not guard.finite(torch.tensor(float('nan')), torch.tensor(3.0))
    guard.skip(torch.tensor(float('nan')), 'epoch 1 update 1', tmp_path / 'checkpoint.th')
    with pytest.raises(AudiogenError, match='2 consecutive non-finite steps, the last at epoch 1 update 2'):
        guard.skip(torch.tensor(1.0), 'epoch 1 update 2', tmp_path / 'checkpoint.th')


def test_the_ema_steps_every_n_updates_and_once_in_an_epoch_shorter_than_n():
    assert [i for i in range(10) if optim.ema_due(1, i, 10, 5)] == [4, 9]
    assert [i for i in range(3) if optim.ema_due(1, i, 3, 1000)] == [2]


def test_resume_candidates_come_newest_position_first(tmp_path):
    for name in ('checkpoint_2.th', 'checkpoint_10.th', 'checkpoint.th', 'checkpoint_step.th', 'checkpoint_best.th'):
        (tmp_path / name).write_bytes(b'')
    files = resume.CheckpointFiles(tmp_path)
    names = [p.name for p in files.candidates()]
    assert names == ['checkpoint_step.th', 'checkpoint.th', 'checkpoint_10.th', 'checkpoint_2.th']


def test_a_checkpoint_lacking_a_part_names_the_reset_that_restarts_it(tmp_path):
    parts = ['model', 'optimizer', 'ema', 'history', 'position']
    state = {'model': {}, 'ema': {}, 'history': []}
    with pytest.raises(AudiogenError, match=r'lacks optimizer: .*checkpoint\.reset=\[optimizer\]'):
        resume.check_complete(state, tmp_path / 'checkpoint.th', parts, [], ema=True)
    resume.check_complete(state, tmp_path / 'checkpoint.th', parts, ['optimizer'], ema=True)
    with pytest.raises(ValueError, match='unknown parts'):
        resume.check_complete(state, tmp_path / 'checkpoint.th', parts, ['optimiser'], ema=True)


def test_settings_checks_take_their_block():
    with pytest.raises(AudiogenError, match='optim.eager_sync=true'):
        settings.check_optim(OmegaConf.create({'grad_accum_steps': 2, 'eager_sync': True, 'max_bad_steps': 1}))
    schedule = OmegaConf.create({'lr_scheduler': 'cosine', 'cosine': {'warmup': 10}})
    with pytest.raises(AudiogenError, match='schedule.cosine.warmup=10 must be below the 10 updates'):
        settings.check_schedule(schedule, 10)
    settings.check_schedule(schedule, 11)
