"""`lorakit serve` for real: the server in a subprocess on a free port, talked to with the
`openai` package and raw HTTP. Completions and chat, streamed and not, concurrent clients
over several adapters (each answer equal to generating it alone), every error status, a
client killed mid-stream, adapters loaded and unloaded while others generate, the API key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import CONTEXT, save_adapters, serve_model

from lorakit.checkpoint import load_adapter
from lorakit.llm import load_causal_lm
from lorakit.llm.generate import generate, using_adapter

KEY = "test-key"
SRC = str(Path(__file__).resolve().parents[1] / "src")
CHAT = [{"role": "user", "content": "good day"}]


class Server:
    def __init__(self, url: str, base: str, folder: Path, adapter_dir: Path) -> None:
        self.url, self.base, self.folder, self.adapter_dir = url, base, folder, adapter_dir
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        )

    def post(self, path: str, body: object, **options) -> httpx.Response:
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return self.http.post(path, content=content, **options)

    def health(self) -> dict:
        return self.http.get("/health").json()


def start(argv: list[str]) -> tuple[subprocess.Popen, str]:
    """Run `lorakit serve` on a free port; returns the process and its URL once it listens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "serve", "--port", "0", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "listening on " in line:
            url = line.split("listening on ")[1].split()[0]
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep it drained
            return proc, url
    proc.wait()
    raise AssertionError("the server did not start:\n" + "".join(lines))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("serve")
    folder = serve_model(tmp / "model")
    adapter_dir = tmp / "adapters"
    adapters = save_adapters(folder, adapter_dir)
    argv = [
        "--model",
        str(folder),
        "--served-model-name",
        "tiny",
        "--max-batch",
        "3",
        "--max-queue",
        "2",
        "--adapter",
        f"alpha={adapters['alpha']}",
        "--adapter",
        f"beta={adapters['beta']}",
        "--api-key",
        KEY,
        "--allow-runtime-adapters",
        "--adapter-dir",
        str(adapter_dir),
    ]
    proc, url = start(argv)
    yield Server(url, "tiny", folder, adapter_dir)
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def alone(server: Server):
    """answer(adapter, prompt=..|messages=.., max_new_tokens): generated alone in this process."""
    model, tokenizer = load_causal_lm(server.folder)
    for name in ("alpha", "beta", "gamma"):
        load_adapter(model, server.adapter_dir / name, name)

    def answer(adapter: str | None, max_new_tokens: int, **given) -> str:
        with using_adapter(model, adapter):
            return generate(model, tokenizer, max_new_tokens=max_new_tokens, **given)

    return answer


def model_id(server: Server, adapter: str | None) -> str:
    return server.base if adapter is None else adapter


# -- answers ---------------------------------------------------------------------------------
def test_models_lists_the_base_and_each_adapter_with_its_parent(server: Server) -> None:
    models = {m.id: m for m in server.client.models.list()}
    assert {"tiny", "alpha", "beta"} <= set(models)
    assert models["alpha"].parent == "tiny" and models["tiny"].parent is None
    assert models["beta"].root == str(server.adapter_dir / "beta")


@pytest.mark.parametrize("adapter", [None, "alpha", "beta"])
def test_completion_equals_generating_alone(server: Server, alone, adapter) -> None:
    reply = server.client.completions.create(
        model=model_id(server, adapter), prompt="good day", max_tokens=7, temperature=0
    )
    assert reply.choices[0].text == alone(adapter, 7, prompt="good day")
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.prompt_tokens == 4 and reply.usage.completion_tokens <= 7
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.parametrize("adapter", [None, "beta"])
def test_chat_equals_generating_alone(server: Server, alone, adapter) -> None:
    reply = server.client.chat.completions.create(
        model=model_id(server, adapter), messages=CHAT, max_tokens=6, temperature=0
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == alone(adapter, 6, messages=CHAT)


def test_streamed_completion_and_chat_match_unstreamed(server: Server) -> None:
    options = dict(max_tokens=8, temperature=0)
    whole = server.client.completions.create(model="alpha", prompt="hello", **options)
    chunks = list(
        server.client.completions.create(
            model="alpha",
            prompt="hello",
            stream=True,
            stream_options={"include_usage": True},
            **options,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = server.client.chat.completions.create(model="beta", messages=CHAT, **options)
    stream = server.client.chat.completions.create(
        model="beta", messages=CHAT, stream=True, **options
    )
    deltas = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(deltas) == chat.choices[0].message.content


def test_raw_stream_is_server_sent_events_ending_in_done(server: Server) -> None:
    body = {"model": "tiny", "prompt": "a", "max_tokens": 3, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")


def test_concurrent_clients_over_adapters_each_equal_alone(server: Server, alone) -> None:
    # 5 clients: 3 batch slots + 2 queue places (the server's limits)
    cases = [
        ([None, "alpha", "beta"][i % 3], ["good day", "it was so", "a movie"][i % 3 - 1], 4 + 5 * i)
        for i in range(5)
    ]

    def ask(case):
        adapter, prompt, n = case
        return (
            server.client.completions.create(
                model=model_id(server, adapter), prompt=prompt, max_tokens=n, temperature=0
            )
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(len(cases)) as pool:
        texts = list(pool.map(ask, cases))
    for (adapter, prompt, n), text in zip(cases, texts):
        assert text == alone(adapter, n, prompt=prompt), (adapter, prompt, n)


def test_seeded_sampling_and_stop(server: Server, alone) -> None:
    ask = dict(model="alpha", prompt="good day", max_tokens=10, temperature=1.0, top_p=0.9)
    first = server.client.completions.create(seed=5, **ask).choices[0].text
    assert server.client.completions.create(seed=5, **ask).choices[0].text == first
    full = alone("alpha", 12, prompt="good day")
    stop = full[6:9]
    reply = server.client.completions.create(
        model="alpha", prompt="good day", max_tokens=12, temperature=0, stop=[stop]
    )
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


# -- refusals --------------------------------------------------------------------------------
GOOD = {"model": "alpha", "prompt": "good day", "max_tokens": 2}


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", "{not json", 400, "not valid JSON"),
        ("/v1/completions", "[1, 2]", 422, "must be a JSON object"),
        (
            "/v1/completions",
            {**GOOD, "max_tokens": "ten"},
            422,
            "max_tokens: Input should be a valid integer",
        ),
        ("/v1/completions", {**GOOD, "temperature": "hot"}, 422, "temperature"),
        ("/v1/completions", {"model": "alpha"}, 422, "prompt: field required"),
        (
            "/v1/chat/completions",
            {"model": "alpha", "messages": [{"role": "user"}]},
            422,
            "messages.0.content: field required",
        ),
        ("/v1/completions", {**GOOD, "model": "nope"}, 404, "model 'nope' does not exist"),
        ("/v1/completions", {**GOOD, "max_tokens": CONTEXT}, 400, "beyond the model's context"),
        ("/v1/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens must be >= 1"),
        ("/v1/completions", {**GOOD, "temperature": -1}, 400, "temperature must be >= 0"),
        ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p must be in"),
        ("/v1/completions", {**GOOD, "n": 2}, 400, "n must be 1"),
        ("/v1/completions", {**GOOD, "presence_penalty": 1}, 400, "presence_penalty is not"),
        ("/v1/completions", {**GOOD, "echo": True}, 400, "echo is not supported"),
        ("/v1/completions", {**GOOD, "prompt": ["a", "b"]}, 400, "one string"),
        ("/v1/completions", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
        ("/v1/chat/completions", {"model": "alpha", "messages": []}, 400, "at least one"),
        ("/v1/nowhere", GOOD, 404, "Not Found"),
    ],
)
def test_errors_are_openai_json_with_their_status(server, path, body, status, message) -> None:
    reply = server.post(path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert message in error["message"] and error["type"]
    assert server.health()["status"] == "ok"


def test_openai_client_sees_the_errors(server: Server) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client.completions.create(model="nope", prompt="a", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="beyond the model's context"):
        server.client.chat.completions.create(model="alpha", messages=CHAT, max_tokens=CONTEXT)


@pytest.mark.parametrize("header", [None, "Bearer wrong", KEY])
def test_api_key_is_required(server: Server, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    reply = httpx.post(f"{server.url}/v1/completions", json=GOOD, headers=headers)
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key


def test_full_server_answers_429_and_keeps_serving(server: Server) -> None:
    body = {"model": "alpha", "prompt": "a", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: server.http.send(
            server.http.build_request("POST", "/v1/completions", json=body), stream=True
        ), range(8)))  # fmt: skip
    statuses = sorted(r.status_code for r in replies)
    for reply in replies:
        reply.close()  # the streams' clients leave: their slots free up
    assert statuses == [200] * 5 + [429] * 3
    assert wait_for(lambda: server.health()["running"] + server.health()["waiting"] == 0)
    assert server.post("/v1/completions", GOOD).status_code == 200


def test_killed_client_frees_its_slot(server: Server) -> None:
    before = server.health()["finished"].get("cancelled", 0)
    script = (
        "import httpx, sys\n"
        f"body = {{'model': 'alpha', 'prompt': 'a', 'max_tokens': {CONTEXT - 8}, "
        "'ignore_eos': True, 'stream': True}\n"
        f"headers = {{'Authorization': 'Bearer {KEY}'}}\n"
        f"with httpx.stream('POST', '{server.url}/v1/completions', json=body, headers=headers,"
        " timeout=60) as r:\n"
        "    for line in r.iter_lines():\n"
        "        print(line, flush=True)\n"
    )
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert client.stdout.readline().startswith("data: ")  # it is streaming
    client.kill()
    client.wait()
    assert wait_for(lambda: server.health()["finished"].get("cancelled", 0) > before)
    assert wait_for(lambda: server.health()["running"] == 0)


def wait_for(condition, limit_s: float = 60) -> bool:
    """Poll `condition` until true (a liveness bound, not a timing assert)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


# -- adapters at run time --------------------------------------------------------------------
def test_load_and_unload_while_others_generate(server: Server, alone) -> None:
    long = dict(prompt="good day", max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
    answers: dict[str, tuple[str, str]] = {}  # adapter -> (text, finish reason)

    def stream(name: str) -> None:
        chunks = list(server.client.completions.create(model=name, stream=True, **long))
        text = "".join(c.choices[0].text for c in chunks)
        answers[name] = (text, chunks[-1].choices[0].finish_reason)

    users = [threading.Thread(target=stream, args=(n,)) for n in ("alpha", "beta")]
    for user in users:
        user.start()
    assert wait_for(lambda: server.health()["running"] == 2)
    loaded = server.post("/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "gamma"})
    assert loaded.status_code == 200, loaded.text
    gamma = server.client.completions.create(
        model="gamma", prompt="good day", max_tokens=5, temperature=0
    )
    assert gamma.choices[0].text == alone("gamma", 5, prompt="good day")
    unloaded = server.post("/v1/unload_lora_adapter", {"lora_name": "beta"})  # waits for beta
    assert unloaded.status_code == 200, unloaded.text
    for user in users:
        user.join(60)
    for name in ("alpha", "beta"):  # both ran to the end on their own adapter
        assert answers[name] == (alone(name, 300, prompt="good day"), "length")
    assert server.post("/v1/completions", {**GOOD, "model": "beta"}).status_code == 404
    reloaded = server.post("/v1/load_lora_adapter", {"lora_name": "beta", "lora_path": "beta"})
    assert reloaded.status_code == 200
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 200


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"lora_name": "x", "lora_path": "/etc"}, 400, "outside the adapter folder"),
        ({"lora_name": "x", "lora_path": "../"}, 400, "outside the adapter folder"),
        ({"lora_name": "x", "lora_path": "missing"}, 400, "cannot load adapter 'x'"),
        ({"lora_name": "x", "lora_path": "broken"}, 400, "cannot load adapter 'x'"),
        ({"lora_name": "x", "lora_path": "other_model"}, 400, "does not exist here"),
        ({"lora_name": "alpha", "lora_path": "alpha"}, 400, "already loaded"),
        ({"lora_name": "tiny", "lora_path": "alpha"}, 400, "base model's id"),
        ({"lora_name": 3, "lora_path": "alpha"}, 422, "lora_name"),
    ],
)
def test_bad_runtime_loads_are_refused_and_serving_goes_on(server, body, status, message) -> None:
    broken = server.adapter_dir / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{oops")
    other_model(server.adapter_dir / "other_model")
    reply = server.post("/v1/load_lora_adapter", body)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]["message"]
    assert server.post("/v1/completions", GOOD).status_code == 200


def other_model(folder: Path) -> None:
    """An adapter saved for a different model (a tiny BERT): it fits no layer of the Llama."""
    if folder.exists():
        return
    from tiny_hf import tiny_model
    from transformers import BertModel

    import lorakit

    tiny_model(folder.parent / "bert", "bert-base")
    model = BertModel.from_pretrained(folder.parent / "bert")
    lorakit.inject(model, lorakit.LoraConfig(rank=2, targets=("query", "value")))
    lorakit.save_adapter(model, folder)


def test_unload_of_unknown_adapter_is_404(server: Server) -> None:
    reply = server.post("/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert reply.status_code == 404
