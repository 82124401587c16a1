"""Tiny random-weight Hugging Face model folders and small data files for training tests.

Models use the real MiniLM tokenizer files (copied from the demo model package), with a
vocabulary that matches it, so `AutoTokenizer` / `AutoModel*` load them like any local model.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
POSITIVE = ("good", "great", "happy", "love", "nice", "excellent", "wonderful", "fine")
NEGATIVE = ("bad", "awful", "sad", "hate", "poor", "terrible", "horrible", "ugly")
FILLER = ("the", "a", "movie", "book", "day", "food", "it", "was", "very", "so", "this", "my")


def copy_tokenizer(folder: Path) -> int:
    """Copy MiniLM's tokenizer files into `folder`; returns its vocabulary size."""
    from lorakit.train.demo_data import demo_model_path

    source = Path(demo_model_path())
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return sum(1 for _ in open(source / "vocab.txt", encoding="utf-8"))


def llama_config(vocab: int, **overrides: object):
    """The tests' tiny Llama: hidden 32, 2 layers, 4 heads (2 key/value heads), MLP 64."""
    from transformers import LlamaConfig

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return LlamaConfig(
        vocab_size=vocab,
        **sizes,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **overrides,
    )


def bert_config(vocab: int, dropout: float = 0.0, **overrides: object):
    """The tests' tiny BERT: hidden 32, 2 layers, 4 heads, MLP 64."""
    from transformers import BertConfig

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return BertConfig(
        vocab_size=vocab,
        **sizes,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        **overrides,
    )


def tiny_model(
    folder: Path,
    kind: str = "bert-seq-cls",
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a tiny random model of `kind` ("bert-seq-cls", "bert-base", "llama-causal").

    float64 models make equivalence tests (accumulation, DDP) immune to Adam amplifying
    float32 rounding where a gradient is a cancellation near zero.
    """
    from transformers import BertForSequenceClassification, BertModel, LlamaForCausalLM

    vocab = copy_tokenizer(folder)
    torch.manual_seed(0)
    if kind.startswith("bert"):
        cls = BertForSequenceClassification if kind == "bert-seq-cls" else BertModel
        model = cls(bert_config(vocab, dropout))
    elif kind == "llama-causal":
        model = LlamaForCausalLM(llama_config(vocab, pad_token_id=0))
    else:
        raise ValueError(kind)
    model.to(dtype).save_pretrained(folder)
    return folder


def sentiment_records(n: int, seed: int = 0) -> list[dict]:
    """`n` short texts, each with one sentiment word that decides its label."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        sentiment = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        words.insert(rng.randint(0, len(words)), sentiment)
        records.append({"text": " ".join(words), "label": label})
    return records


def completion_records(n: int, seed: int = 0) -> list[dict]:
    """`n` prompt/completion pairs: the completion names the sentiment of the prompt."""
    answer = {"pos": " positive", "neg": " negative"}
    return [
        {"prompt": r["text"] + " sentiment:", "completion": answer[r["label"]]}
        for r in sentiment_records(n, seed)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
