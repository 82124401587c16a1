"""`lorakit serve [--model M] [--adapter NAME=PATH ...] [--host 127.0.0.1] [--port 8000]`.

An OpenAI-compatible server for one base model and many adapters: concurrent requests for
different adapters share each decoding step's forward (continuous batching through
`lorakit.routing`). A request's `model` names its adapter; the base model's id means none.
With no --model it serves the built-in LLM job's model (SmolLM2-135M-Instruct) and, when
present, the adapter that job wrote (runs/chat/adapter, as "chat"). It listens on 127.0.0.1
unless told otherwise; --api-key (or $LORAKIT_API_KEY) makes every /v1 call need it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from ..errors import ConfigError, MissingDependencyError
from ..llm.deps import is_installed
from ..llm.model import SMOLLM2, load_causal_lm, resolve_model, smollm2_folder

# What `lorakit finetune --recipe chat` writes, served as "chat" by default.
CHAT_JOB_ADAPTER = ("chat", Path("runs/chat/adapter"))


def adapter_arg(text: str) -> tuple[str, str]:
    """NAME=PATH of --adapter."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def served_adapters(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The --adapter pairs; with no --model and none given, the LLM job's adapter if present."""
    if args.adapter or args.model is not None:
        return list(args.adapter or [])
    name, folder = CHAT_JOB_ADAPTER
    return [(name, str(folder))] if folder.is_dir() else []


def check(args: argparse.Namespace) -> None:
    """Refuse bad options before the slow model load."""
    missing = [m for m in ("fastapi", "uvicorn") if not is_installed(m)]
    if missing:
        raise MissingDependencyError(f"lorakit serve needs {', '.join(missing)} (not installed); "
                                     "install with: pip install 'lorakit[serve]'")  # fmt: skip
    if args.max_batch < 1 or args.max_queue < 0:
        raise ConfigError(f"--max-batch must be >= 1 and --max-queue >= 0, got {args.max_batch} "
                          f"and {args.max_queue}")  # fmt: skip
    if args.allow_runtime_adapters and not args.adapter_dir:
        raise ConfigError("--allow-runtime-adapters needs --adapter-dir DIR: adapters load at run "
                          "time only from folders under it")  # fmt: skip
    if args.adapter_dir and not Path(args.adapter_dir).is_dir():
        raise ConfigError(f"--adapter-dir {args.adapter_dir!r} is not a folder")
    names = [name for name, _ in args.adapter or []]
    if len(set(names)) != len(names):
        raise ConfigError(f"--adapter gives a name twice: {names}")


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free one), so the real address can be shown."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    check(args)
    import uvicorn

    from ..serve import Engine
    from ..serve.app import Settings, create_app

    model_name = args.model if args.model is not None else SMOLLM2
    if model_name == SMOLLM2 and not smollm2_folder().is_dir():
        print(f"converting SmolLM2-135M-Instruct once into {smollm2_folder()}", file=sys.stderr)
    base_id = args.served_model_name or str(model_name)
    adapters = served_adapters(args)
    sock = listen(args.host, args.port)  # before the load: a busy port fails fast
    model, tokenizer = load_causal_lm(model_name)
    engine = Engine(model, tokenizer, base_id, max_batch=args.max_batch, max_queue=args.max_queue)
    for name, path in adapters:
        engine.add_adapter(name, path)
    settings = Settings(str(resolve_model(model_name)), args.api_key or os.environ.get(
        "LORAKIT_API_KEY"), args.allow_runtime_adapters, args.adapter_dir)  # fmt: skip
    _announce(base_id, settings, adapters, sock, args)
    config = uvicorn.Config(create_app(engine, settings), log_level=args.log_level,
                            access_log=False)  # fmt: skip
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _announce(base_id, settings, adapters, sock: socket.socket, args) -> None:
    host, port = sock.getsockname()[:2]
    shown = ", ".join(f"{name} ({path})" for name, path in adapters) or "none"
    print(f"lorakit serve: base model {base_id!r} ({settings.base_root}); adapters: {shown}")
    runtime = f"from {args.adapter_dir}" if args.allow_runtime_adapters else "off"
    key = "required" if settings.api_key else "none"
    print(f"lorakit serve: max batch {args.max_batch}, queue {args.max_queue}, runtime adapter "
          f"loading {runtime}, API key {key}")  # fmt: skip
    url_host = f"[{host}]" if ":" in host else host
    print(f"lorakit serve: listening on http://{url_host}:{port} (OpenAI API under /v1)",
          flush=True)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server: one base model, many adapters, batched together",
        description=__doc__.splitlines()[0],
    )
    add = parser.add_argument
    add("--model", metavar="M",
        help=f"local model folder, or {SMOLLM2!r} (default: the LLM job's SmolLM2)")  # fmt: skip
    add("--adapter", action="append", type=adapter_arg, metavar="NAME=PATH",
        help="serve the adapter folder PATH as model NAME; repeat for more")  # fmt: skip
    add("--served-model-name", metavar="ID", help="the base model's id (default: --model)")
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine)")
    add("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    add("--max-batch", type=int, default=8, metavar="N",
        help="most requests decoded together (default 8)")  # fmt: skip
    add("--max-queue", type=int, default=64, metavar="N",
        help="most requests waiting for a slot; more get 429 (default 64)")  # fmt: skip
    add("--api-key", metavar="K", help="require 'Authorization: Bearer K' (or $LORAKIT_API_KEY)")
    add("--allow-runtime-adapters", action="store_true",
        help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")  # fmt: skip
    add("--adapter-dir", metavar="D", help="runtime loads read only folders under D")
    add("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
        help="uvicorn's log level (default warning)")  # fmt: skip
    parser.set_defaults(func=run)
