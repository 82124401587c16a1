"""Length-grouped batches: the same examples per epoch and rank as random batches, in a
seeded order, with less padding."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from torch.utils.data import DistributedSampler

from lorakit.errors import ConfigError
from lorakit.train.data_order import remaining_windows, windows
from lorakit.train.distributed import DistEnv
from lorakit.train.length_groups import cut, length_grouped, micro_batches
from lorakit.train.options import TrainOptions
from lorakit.train.run_state import RunState


def _data(n: int = 203, seed: int = 0) -> list[dict[str, list[int]]]:
    """Examples of mixed lengths, 1 to 120 tokens."""
    rng = random.Random(seed)
    return [{"input_ids": [7] * rng.randint(1, 120)} for _ in range(n)]


def _options(**kw) -> TrainOptions:
    return TrainOptions(**{"batch_size": 4, "grad_accum": 2, "seed": 3, **kw})


def _micro(data, options: TrainOptions, env: DistEnv, epoch: int = 0) -> list[list[int]]:
    return [micro for window in windows(data, options, env, epoch, 0) for micro in window]


def _pad_tokens(data, batches: list[list[int]]) -> int:
    lengths = [[len(data[i]["input_ids"]) for i in batch] for batch in batches]
    return sum(len(ls) * max(ls) - sum(ls) for ls in lengths)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_each_rank_gets_the_examples_of_random_batching(world_size: int, batch_size: int) -> None:
    data = _data()
    for epoch in range(2):
        for rank in range(world_size):
            env = DistEnv(rank, world_size)
            grouped = _micro(data, _options(batch_size=batch_size), env, epoch)
            plain = _micro(data, _options(batch_size=batch_size, batching="random"), env, epoch)
            assert Counter(i for b in grouped for i in b) == Counter(i for b in plain for i in b)
            assert len(grouped) == len(plain)  # as many steps as before


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_random_batching_is_the_samplers_order_cut_into_batches(world_size: int) -> None:
    data, options = _data(), _options(batching="random")
    for rank in range(world_size):
        sampler = DistributedSampler(data, world_size, rank, shuffle=True, seed=options.seed)
        sampler.set_epoch(1)
        assert _micro(data, options, DistEnv(rank, world_size), 1) == cut(list(sampler), 4)


def test_the_order_follows_from_the_seed_and_epoch() -> None:
    data, env = _data(), DistEnv()
    first = _micro(data, _options(), env)
    assert first == _micro(data, _options(), env)
    assert first != _micro(data, _options(), env, epoch=1)
    assert first != _micro(data, _options(seed=4), env)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_batches_pad_less_than_random_ones(seed: int) -> None:
    data, env = _data(seed=seed), DistEnv()
    grouped = _pad_tokens(data, _micro(data, _options(seed=seed), env))
    plain = _pad_tokens(data, _micro(data, _options(seed=seed, batching="random"), env))
    assert grouped < plain / 4


def test_batches_are_drawn_from_sorted_mega_batches() -> None:
    lengths = {i: i % 10 for i in range(40)}
    batches = length_grouped(list(range(40)), lengths, 4, 1, seed=0, epoch=0)
    assert sorted(batches) == sorted([i for i in range(40) if i % 10 == k] for k in range(10))


def test_the_short_step_stays_last() -> None:
    lengths = {i: i for i in range(23)}
    for seed in range(5):
        batches = length_grouped(list(range(23)), lengths, 4, 2, seed=seed, epoch=0)
        assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 3]
        assert sorted(batches[-2] + batches[-1]) == list(range(7))  # the 7 shortest


def test_accumulated_micro_batches_hold_the_examples_of_one_bigger_batch() -> None:
    data, env = _data(), DistEnv()
    accumulated = windows(data, _options(batch_size=4, grad_accum=3), env, 0, 0)
    bigger = windows(data, _options(batch_size=12, grad_accum=1), env, 0, 0)
    assert [sorted(sum(w, [])) for w in accumulated] == [sorted(sum(w, [])) for w in bigger]


def test_items_without_input_ids_are_batched_as_they_come() -> None:
    order = [5, 3, 1, 0, 2, 4]
    batches = micro_batches(list(range(6)), order, _options(grad_accum=1), 0)
    assert batches == [[5, 3, 1, 0], [2, 4]]


def _train(data, options: TrainOptions, total: int, state: RunState) -> list:
    run = type("Run", (), {"total": total, "train_data": data, "options": options})()
    run.env, seen = DistEnv(), []
    for window in remaining_windows(run, state):
        seen.append(window)
        state.step, state.batch = state.step + 1, state.batch + len(window)
    return seen


@pytest.mark.parametrize("stop", [1, 7, 25, 26, 40])
def test_a_resumed_run_sees_the_uninterrupted_batches(stop: int) -> None:
    data, options = _data(), _options()
    whole = _train(data, options, 60, RunState())  # 26 steps an epoch
    first = RunState()
    head = _train(data, options, stop, first)
    resumed = RunState(first.step, first.epoch, first.batch)
    assert head + _train(data, options, 60, resumed) == whole


def test_an_unknown_batching_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="batching"):
        TrainOptions(batching="sorted")
