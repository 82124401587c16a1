"""`lorakit serve` options: refused before the model loads, with one-line errors; the default
adapter is the one the built-in LLM job wrote."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.cli.serve import served_adapters


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--allow-runtime-adapters"], "--allow-runtime-adapters needs --adapter-dir"),
        (["--adapter-dir", "/no/such/dir"], "is not a folder"),
        (["--adapter", "a=x", "--adapter", "a=y"], "gives a name twice"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
    ],
)
def test_bad_options_fail_before_loading(capsys, argv: list[str], message: str) -> None:
    assert main(["serve", "--model", "/no/model", *argv]) == 2
    assert message in capsys.readouterr().err


def test_adapter_needs_name_and_path(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--adapter", "just-a-path"])
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_busy_port_is_refused(capsys) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "/no/model", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_default_serves_the_llm_jobs_adapter(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    defaults = argparse.Namespace(model=None, adapter=None)
    assert served_adapters(defaults) == []
    (tmp_path / "runs" / "chat" / "adapter").mkdir(parents=True)
    assert served_adapters(defaults) == [("chat", "runs/chat/adapter")]
    given = argparse.Namespace(model="m", adapter=None)
    assert served_adapters(given) == []  # a chosen model gets only the adapters given
