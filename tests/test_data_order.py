"""The order a run sees its data in: every example once per epoch, and a resumed run
continuing exactly where an uninterrupted one would be."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lorakit.train.data_order import remaining_windows, windows
from lorakit.train.distributed import DistEnv
from lorakit.train.options import TrainOptions
from lorakit.train.run_state import RunState

DATA = list(range(23))


def _run(total: int, world_size: int = 1, rank: int = 0) -> SimpleNamespace:
    options = TrainOptions(batch_size=4, grad_accum=2, seed=3)
    env = DistEnv(rank=rank, world_size=world_size)
    return SimpleNamespace(total=total, train_data=DATA, options=options, env=env)


def _train(run: SimpleNamespace, state: RunState) -> list[list[list[int]]]:
    """The windows a run trains on, advancing `state` the way the loop does."""
    seen = []
    for window in remaining_windows(run, state):
        seen.append(window)
        state.step, state.batch = state.step + 1, state.batch + len(window)
    return seen


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_epoch_sees_every_example_once_per_rank_set(world_size: int) -> None:
    for epoch in range(3):
        rows = [
            i
            for rank in range(world_size)
            for window in windows(DATA, _run(0).options, DistEnv(rank, world_size), epoch, 0)
            for micro in window
            for i in micro
        ]
        assert sorted(set(rows)) == DATA  # (DistributedSampler pads with repeats)


def test_epochs_differ_but_are_seeded() -> None:
    options, env = _run(0).options, DistEnv()
    first, again = list(windows(DATA, options, env, 0, 0)), list(windows(DATA, options, env, 0, 0))
    assert first == again
    assert first != list(windows(DATA, options, env, 1, 0))


@pytest.mark.parametrize("stop", [1, 3, 4, 5, 9])
def test_a_resumed_run_continues_the_uninterrupted_order(stop: int) -> None:
    whole = _train(_run(total=10), RunState())
    first = RunState()
    head = _train(_run(total=stop), first)
    resumed = RunState(first.step, first.epoch, first.batch)
    assert head + _train(_run(total=10), resumed) == whole


def test_the_last_step_of_an_epoch_does_not_move_to_the_next() -> None:
    state = RunState()
    steps = _train(_run(total=3), state)  # 23 examples, micro-batches of 4, 2 per step: 3 steps
    assert len(steps) == 3
    assert (state.step, state.epoch, state.batch) == (3, 0, 6)
    _train(_run(total=4), state)
    assert (state.step, state.epoch, state.batch) == (4, 1, 2)
