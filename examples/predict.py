"""Predict with an adapter that `lorakit finetune` trained (a seq-cls run).

python examples/predict.py runs/finetune "what a wonderful day" "this is awful"

The base is loaded with a classification head for the run's labels (run.json keeps the model
folder and the label -> class id map), the adapter goes on top, and each text gets a label.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lorakit


def load(run: Path) -> tuple[torch.nn.Module, object]:
    """(model with the adapter, tokenizer) of a finetune run folder."""
    info = json.loads((run / "run.json").read_text())
    labels = info["labels"]  # label -> class id, as in training
    base = AutoModelForSequenceClassification.from_pretrained(
        info["model"],
        num_labels=len(labels),
        label2id=labels,
        id2label={i: label for label, i in labels.items()},
    )
    model = lorakit.from_pretrained(base, run / "adapter").eval()
    return model, AutoTokenizer.from_pretrained(info["model"])


def predict(model: torch.nn.Module, tokenizer, texts: list[str]) -> list[str]:
    """The label of each text."""
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(**batch).logits.argmax(-1)
    return [model.config.id2label[int(i)] for i in ids]


if __name__ == "__main__":
    model, tokenizer = load(Path(sys.argv[1]))
    for text, label in zip(sys.argv[2:], predict(model, tokenizer, sys.argv[2:])):
        print(f"{label}\t{text}")
