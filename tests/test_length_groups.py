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
from lorakit.train.length_groups import cut, grouped_order, length_grouped
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
def test_the_ranks_share_the_examples_of_random_batching(world_size: int, batch_size: int) -> None:
    data = _data()
    for epoch in range(2):
        grouped, plain = [], []
        for rank in range(world_size):
            env = DistEnv(rank, world_size)
            mine = _micro(data, _options(batch_size=batch_size), env, epoch)
            theirs = _micro(data, _options(batch_size=batch_size, batching="random"), env, epoch)
            assert [len(b) for b in mine] == [len(b) for b in theirs]  # same steps, same sizes
            grouped, plain = grouped + mine, plain + theirs
        counts = Counter(i for b in grouped for i in b)
        assert sorted(counts) == list(range(len(data)))  # every example, ...
        repeats = sum(counts.values()) - len(data)
        assert repeats == sum(len(b) for b in plain) - len(data) < world_size  # ... once, but
        # for as many repeats as the random batches pad the ranks' shares with


@pytest.mark.parametrize("n", [204, 203])  # 203: ranks pad with repeats in the last step
@pytest.mark.parametrize(("world_size", "grad_accum"), [(1, 3), (2, 1), (3, 1), (2, 3)])
def test_a_step_holds_the_same_examples_with_any_split(n, world_size, grad_accum) -> None:
    data = _data(n)
    one = list(windows(data, _options(batch_size=4 * world_size * grad_accum, grad_accum=1),
                       DistEnv(), 0, 0))  # fmt: skip
    split = [
        windows(data, _options(batch_size=4, grad_accum=grad_accum), DistEnv(r, world_size), 0, 0)
        for r in range(world_size)
    ]
    steps = [sorted(i for w in parts for m in w for i in m) for parts in zip(*split, strict=True)]
    assert len(steps) == len(one)
    assert steps[:-1] == [sorted(sum(whole, [])) for whole in one[:-1]]


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


def test_steps_are_drawn_from_sorted_mega_batches() -> None:
    lengths = {i: i % 10 for i in range(40)}
    steps = cut(length_grouped(list(range(40)), lengths, 4, seed=0, epoch=0), 4)
    assert sorted(steps) == sorted([i for i in range(40) if i % 10 == k] for k in range(10))


def test_the_short_step_stays_last() -> None:
    lengths = {i: i for i in range(23)}
    for seed in range(5):
        order = length_grouped(list(range(23)), lengths, 8, seed=seed, epoch=0)
        assert sorted(order[-7:]) == list(range(7))  # the 7 shortest


def test_items_without_input_ids_are_batched_as_they_come() -> None:
    assert grouped_order(list(range(6)), [5, 3, 1, 0, 2, 4], 4, 0, 0) is None
    random_batches = _micro(list(range(6)), _options(batching="random"), DistEnv())
    assert _micro(list(range(6)), _options(), DistEnv()) == random_batches


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


def test_packed_batches_are_grouped_by_length_too() -> None:
    data, env = _data(), DistEnv()
    assert _micro(data, _options(batching="packed"), env) == _micro(data, _options(), env)


def test_an_unknown_batching_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="batching"):
        TrainOptions(batching="sorted")
