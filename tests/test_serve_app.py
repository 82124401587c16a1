"""The HTTP app in-process (no lifespan, so the engine never decodes): a full server answers
429, runtime adapter endpoints are off unless enabled, errors keep OpenAI's shape."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serve_helpers import Collect, serve_model

from lorakit.llm import load_causal_lm
from lorakit.serve import Engine, Job
from lorakit.serve.app import Settings, create_app

GOOD = {"model": "tiny", "prompt": "good day", "max_tokens": 2}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    model, tokenizer = load_causal_lm(serve_model(tmp_path_factory.mktemp("app") / "model"))
    engine = Engine(model, tokenizer, "tiny", max_batch=1, max_queue=1)  # never started
    yield engine
    engine.close()


def test_full_server_answers_429(engine: Engine) -> None:
    client = TestClient(create_app(engine))
    held = [Collect(), Collect()]
    for sink in held:  # the one batch slot and the one queue place
        engine.submit(Job(engine.encode(prompt="a")), sink)
    reply = client.post("/v1/completions", json=GOOD)
    assert reply.status_code == 429
    assert reply.json()["error"] == {
        "message": "the server is full (1 requests running, 1 waiting); retry later",
        "type": "rate_limit_error",
        "param": None,
        "code": "queue_full",
    }


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_runtime_adapters_are_off_by_default(engine: Engine, path: str) -> None:
    reply = TestClient(create_app(engine)).post(path, json={"lora_name": "x", "lora_path": "x"})
    assert reply.status_code == 404
    assert "--allow-runtime-adapters" in reply.json()["error"]["message"]


def test_runtime_loading_needs_an_adapter_dir(engine: Engine, tmp_path: Path) -> None:
    app = create_app(engine, Settings(allow_runtime_adapters=True))
    reply = TestClient(app).post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "."})
    assert reply.status_code == 400
    assert "needs --adapter-dir" in reply.json()["error"]["message"]


def test_wrong_method_is_openai_json(engine: Engine) -> None:
    reply = TestClient(create_app(engine)).get("/v1/completions")
    assert reply.status_code == 405
    assert "Method Not Allowed" in reply.json()["error"]["message"]
