"""lorakit.serve.Engine in-process: continuous batching across adapters equals generating each
request alone, sampling, stop strings, limits, cancellation, adapters loaded and unloaded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from serve_helpers import CONTEXT, Collect, save_adapters, serve_model

from lorakit.checkpoint import load_adapter
from lorakit.errors import ConfigError
from lorakit.llm import load_causal_lm
from lorakit.llm.generate import generate, using_adapter
from lorakit.serve import BadRequest, Engine, Failed, Job, ModelNotFound, QueueFull, Sampling
from lorakit.serve.kv import BatchCache
from lorakit.serve.text import TextTracker

PROMPTS = ["good day", "the movie was very", "hello there my friend", "a", "it was so nice"]
ADAPTERS = [None, "alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("serve-engine")
    model = serve_model(tmp / "model")
    return model, save_adapters(model, tmp / "adapters")


def make_engine(folders, max_batch: int = 3, max_queue: int = 32, start: bool = True) -> Engine:
    model_folder, adapters = folders
    model, tokenizer = load_causal_lm(model_folder)
    engine = Engine(model, tokenizer, "base", max_batch=max_batch, max_queue=max_queue)
    for name, path in adapters.items():
        engine.add_adapter(name, path)
    return engine.start() if start else engine


@pytest.fixture(scope="module")
def engine(folders):
    engine = make_engine(folders)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def alone(folders):
    """answer(adapter, prompt, max_new_tokens): lorakit.llm.generate with that adapter alone."""
    model_folder, adapters = folders
    model, tokenizer = load_causal_lm(model_folder)
    for name, path in adapters.items():
        load_adapter(model, path, name)

    def answer(adapter: str | None, prompt: str, max_new_tokens: int) -> str:
        with using_adapter(model, adapter):
            return generate(model, tokenizer, prompt=prompt, max_new_tokens=max_new_tokens)

    return answer


def run(engine: Engine, prompt: str, **job) -> Collect:
    sink = Collect()
    engine.submit(Job(engine.encode(prompt=prompt), **job), sink)
    return sink


def test_batched_greedy_equals_each_request_alone(engine: Engine, alone) -> None:
    # 12 requests over 4 adapters and lengths, 3 batch slots: rows join and leave mid-batch
    cases = [(ADAPTERS[i % 4], PROMPTS[i % 5], 3 + 4 * i) for i in range(12)]
    sinks = [run(engine, p, adapter=a, max_tokens=n) for a, p, n in cases]
    for (adapter, prompt, n), sink in zip(cases, sinks):
        end = sink.wait()
        assert (end.reason, end.completion_tokens) == ("length", n)
        assert sink.text == alone(adapter, prompt, n), (adapter, prompt, n)
        assert end.prompt_tokens == len(engine.encode(prompt=prompt))
    assert engine.status()["running"] == 0


def test_adapters_change_the_answer(engine: Engine) -> None:
    texts = [run(engine, "good day", adapter=a, max_tokens=8) for a in ADAPTERS]
    assert len({t.wait() and t.text for t in texts}) == len(ADAPTERS)


@pytest.mark.parametrize("adapter", [None, "beta"])
def test_seeded_sampling_repeats_whatever_shares_the_batch(engine: Engine, adapter) -> None:
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7)
    first = run(engine, "good day", adapter=adapter, max_tokens=12, sampling=sampling)
    first.wait()
    crowd = [run(engine, p, adapter="alpha", max_tokens=20) for p in PROMPTS]
    again = run(engine, "good day", adapter=adapter, max_tokens=12, sampling=sampling)
    other = run(engine, "good day", adapter=adapter, max_tokens=12,
                sampling=Sampling(temperature=1.0, top_p=0.9, seed=8))  # fmt: skip
    for sink in (again, other, *crowd):
        sink.wait()
    assert again.text == first.text
    assert other.text != first.text


def test_tiny_top_p_is_greedy(engine: Engine, alone) -> None:
    sink = run(engine, "good day", max_tokens=10, sampling=Sampling(temperature=2.0, top_p=1e-6))
    sink.wait()
    assert sink.text == alone(None, "good day", 10)


def test_stop_string_cuts_the_answer(engine: Engine, alone) -> None:
    full = alone("alpha", "good day", 20)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    sink = run(engine, "good day", adapter="alpha", max_tokens=20, stops=("zzzz", stop))
    end = sink.wait()
    assert end.reason == "stop"
    assert sink.text == full[: full.index(stop)]


@pytest.mark.parametrize(
    "job, error, message",
    [
        (dict(max_tokens=CONTEXT), BadRequest, "beyond the model's context of 512 tokens"),
        (dict(max_tokens=0), BadRequest, "max_tokens must be >= 1"),
        (dict(max_tokens=2.5), BadRequest, "max_tokens must be an integer"),
        (dict(adapter="nope"), ModelNotFound, "model 'nope' does not exist"),
    ],
)
def test_refused_requests(engine: Engine, job, error, message) -> None:
    with pytest.raises(error, match=message):
        engine.submit(Job(engine.encode(prompt="good day"), **job), Collect())


def test_bad_sampling_values() -> None:
    with pytest.raises(BadRequest, match="temperature must be >= 0"):
        Sampling(temperature=-1)
    with pytest.raises(BadRequest, match=r"top_p must be in \(0, 1\]"):
        Sampling(top_p=0)


def test_full_queue_refuses(folders) -> None:
    engine = make_engine(folders, max_batch=3, max_queue=2, start=False)  # nothing drains
    prompt = engine.encode(prompt="good day")
    queued = [Collect() for _ in range(5)]
    for sink in queued:
        engine.submit(Job(prompt), sink)
    with pytest.raises(QueueFull, match=r"full \(3 requests running, 2 waiting\)"):
        engine.submit(Job(prompt), Collect())
    engine.close()
    assert all(isinstance(s.wait(), Failed) for s in queued)


def test_cancel_frees_the_slot(engine: Engine) -> None:
    sink = Collect()
    seq = engine.submit(Job(engine.encode(prompt="a"), max_tokens=400, ignore_eos=True), sink)
    seq.cancel()
    end = sink.wait()
    assert end.reason == "cancelled" and end.completion_tokens < 400
    assert engine.status()["running"] == 0


def test_unload_waits_for_requests_using_the_adapter(folders, alone) -> None:
    engine = make_engine(folders)
    user = run(engine, "good day", adapter="gamma", max_tokens=60, ignore_eos=True)
    unloading = threading.Thread(target=engine.remove_adapter, args=("gamma",))
    unloading.start()
    unloading.join(60)
    assert user.wait().completion_tokens == 60  # it finished on its adapter before the unload
    assert user.text.startswith(alone("gamma", "good day", 10))
    with pytest.raises(ModelNotFound, match="'gamma' does not exist"):
        run(engine, "good day", adapter="gamma")
    assert run(engine, "a", adapter="beta", max_tokens=4).wait().reason == "length"
    engine.close()


def test_unload_refuses_after_timeout(folders) -> None:
    engine = make_engine(folders, start=False)  # the request never runs
    engine.submit(Job(engine.encode(prompt="a"), adapter="alpha"), Collect())
    with pytest.raises(BadRequest, match="'alpha' is still used by 1 requests"):
        engine.remove_adapter("alpha", timeout=0.05)
    assert "alpha" in engine.adapters.served()
    engine.close()


def test_bad_adapter_is_refused_with_the_loaders_message(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(BadRequest, match="cannot load adapter 'broken'.*adapter_config.json"):
        engine.add_adapter("broken", tmp_path)
    with pytest.raises(BadRequest, match="already loaded"):
        engine.add_adapter("alpha", tmp_path)
    assert run(engine, "a", adapter="alpha", max_tokens=3).wait().reason == "length"


@pytest.mark.parametrize(
    "texts, stops, pieces, stopped",
    [
        (["ab", "abc", "abcd"], (), ["ab", "c", "d"], False),
        (["ab", "ab<", "ab<e", "ab<end>x"], ("<end>",), ["ab", "", "", ""], True),
        (["a<", "a<b"], ("<end>",), ["a", "<b"], False),
        (["a\ufffd", "aé"], (), ["a", "é"], False),
    ],
)
def test_text_tracker_holds_back_what_may_be_cut(texts, stops, pieces, stopped) -> None:
    outputs = iter(texts)
    tracker = TextTracker(lambda ids: next(outputs), stops)
    got = [tracker.update([0]) for _ in texts]
    assert [piece for piece, _ in got] == pieces
    assert got[-1][1] is stopped


class FakeLayer:
    is_sliding = False

    def __init__(self, length: int, fill: float) -> None:
        self.keys = torch.full((1, 2, length, 4), fill)
        self.values = -self.keys


class FakeCache:
    def __init__(self, length: int, fill: float) -> None:
        self.layers = [FakeLayer(length, fill), FakeLayer(length, fill)]


def test_batch_cache_pads_on_the_left_and_trims_when_rows_leave() -> None:
    batch = BatchCache()
    batch.join(FakeCache(3, 1.0))
    batch.join(FakeCache(5, 2.0))
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    keys = batch.cache.layers[1].keys
    assert keys.shape == (2, 2, 5, 4)
    assert keys[0, :, :2].abs().sum() == 0 and (keys[0, :, 2:] == 1).all()
    mask, positions = batch.step_inputs()
    assert mask.shape == (2, 6) and positions.tolist() == [[3], [5]]
    for layer in batch.cache.layers:  # what the model's forward does to the cache
        layer.keys = torch.cat([layer.keys, torch.full((2, 2, 1, 4), 3.0)], dim=2)
        layer.values = torch.cat([layer.values, torch.full((2, 2, 1, 4), 3.0)], dim=2)
    batch.stepped(mask)
    batch.keep([0])  # the longer row leaves: the padding columns go
    assert batch.mask.tolist() == [[1, 1, 1, 1]]
    assert batch.cache.layers[0].keys[0, 0, :, 0].tolist() == [1.0, 1.0, 1.0, 3.0]
    batch.keep([])
    assert batch.rows == 0 and batch.cache is None


def test_sliding_window_caches_are_refused() -> None:
    cache = FakeCache(2, 1.0)
    cache.layers[0].is_sliding = True
    with pytest.raises(ConfigError, match="plain key/value cache"):
        BatchCache().join(cache)
