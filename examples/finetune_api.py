"""`lorakit.train` from Python: finetune MiniLM-L6 on a data file, then use the adapter.

The command line equivalent is `lorakit finetune --data ... --out ...`; here the same job
runs in-process, then the saved adapter is loaded onto a fresh base for predictions.

python examples/finetune_api.py        # about a minute on 2 CPU cores
"""

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import lorakit
from lorakit.train import TrainOptions, finetune
from lorakit.train.demo_data import demo_dataset, demo_model_path

# Any JSONL/CSV file with `text` and `label` works; here, the demo's VADER sentiment words.
train_file, eval_file = demo_dataset("runs/api/data")
model_dir = demo_model_path()

options = TrainOptions(
    model=model_dir,
    data=str(train_file),
    eval_file=str(eval_file),
    task="seq-cls",  # MiniLM's config names only the bare encoder, so say which head
    out="runs/api",
    overwrite=True,  # rerunnable: replace an earlier run in runs/api
    epochs=1,
    batch_size=32,
    lr=1e-3,
    eval_every=0,
    threads=1,  # batches of ~3-token words: one thread is enough, and robust on a busy machine
    # On a GPU: a bf16 base under autocast, adapters and head still trained in float32.
    precision="bf16" if torch.cuda.is_available() else "fp32",
)
lora = lorakit.LoraConfig(rank=8, alpha=16, targets=["query", "value"], dropout=0.05)
result = finetune(options, lora)  # prints the summary table; the head is added to modules_to_save
before, after = result.train.eval_before, result.train.eval_after
print(f"eval accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")

# Later, elsewhere: a fresh base plus the adapter folder gives the trained model back.
labels = {0: "negative", 1: "positive"}
base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
model = lorakit.from_pretrained(base, result.adapter).eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
words = ["delightful", "dreadful", "cheerful", "gloomy"]
with torch.no_grad():
    predicted = model(**tokenizer(words, padding=True, return_tensors="pt")).logits.argmax(-1)
for word, y in zip(words, predicted.tolist()):
    print(f"{word:>10}: {labels[y]}")
