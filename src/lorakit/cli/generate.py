"""`lorakit generate --model M [--adapter A ...] (--prompt TEXT | --messages FILE.json)`.

Answers with a causal language model, streamed to the terminal: greedy by default, sampled
with --temperature > 0. With adapters, the base model answers first and then each adapter
alone, each under a labelled heading, so one sees what an adapter changed. --model is a local
model folder or "smollm2" (SmolLM2-135M-Instruct, converted from its GGUF file on first use).
A --prompt is plain text the model continues; --messages is a chat (a JSON list of
{"role", "content"}, or an object with a "messages" list, like one line of chat data),
rendered by the tokenizer's chat template.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoint import load_adapter
from ..errors import ConfigError
from ..llm.generate import BASE, check_messages, decoding_options, generate, using_adapter
from ..llm.model import SMOLLM2, load_causal_lm, smollm2_folder


def read_messages(path: Path) -> list[dict]:
    """The chat in a --messages file: a JSON list of messages, or {"messages": [...]}.

    Raises:
        ConfigError: the file cannot be read, is not JSON, or holds no valid messages.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"--messages {path}: cannot read: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--messages {path}: not valid JSON ({err})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    try:
        check_messages(messages)
    except ConfigError as err:
        raise ConfigError(f"--messages {path}: {err}") from None
    return messages


def run(args: argparse.Namespace) -> int:
    messages = read_messages(Path(args.messages)) if args.messages else None
    decoding_options(args.max_new_tokens, args.temperature, args.top_p)  # fail before loading
    if args.model == SMOLLM2 and not smollm2_folder().is_dir():
        print(f"converting SmolLM2-135M-Instruct once into {smollm2_folder()}", file=sys.stderr)
    model, tokenizer = load_causal_lm(args.model)
    labels: dict[str | None, str] = {None: BASE}
    for i, path in enumerate(args.adapter or [], start=1):
        load_adapter(model, path, f"adapter{i}")
        labels[f"adapter{i}"] = f"adapter {path}"
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed)  # fmt: skip
    stream = None if args.no_stream else _print_piece
    for name, label in labels.items():
        if len(labels) > 1:
            print(f"=== {label} ===", flush=True)
        with using_adapter(model, name):
            text = generate(model, tokenizer, args.prompt, messages, stream=stream, **options)
        print("" if stream else text, flush=True)  # a streamed answer lacks its newline
    return 0


def _print_piece(text: str) -> None:
    print(text, end="", flush=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a prompt or chat with a language model, with and without adapters",
        description=__doc__.splitlines()[0],
    )
    add = parser.add_argument
    add("--model", required=True, metavar="M",
        help=f"local model folder, or {SMOLLM2!r} (SmolLM2-135M-Instruct)")  # fmt: skip
    add("--adapter", action="append", metavar="A",
        help="adapter folder; repeat to compare several with the base")  # fmt: skip
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", metavar="TEXT", help="plain text for the model to continue")
    chat_help = 'a chat: a JSON list of {"role", "content"}, or {"messages": [...]}'
    given.add_argument("--messages", metavar="FILE.json", help=chat_help)
    add("--max-new-tokens", type=int, default=128, metavar="N",
        help="most tokens to generate (default 128)")  # fmt: skip
    add("--temperature", type=float, default=0.0, metavar="T",
        help="0 (default): greedy; above 0: sample")  # fmt: skip
    add("--top-p", type=float, default=1.0, metavar="P",
        help="sample from the smallest set of tokens with probability >= P")  # fmt: skip
    add("--seed", type=int, metavar="S", help="make sampling reproducible")
    add("--no-stream", action="store_true",
        help="print each answer when complete, not token by token")  # fmt: skip
    parser.set_defaults(func=run)
