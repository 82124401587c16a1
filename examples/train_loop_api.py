"""`lorakit.train.train`: the training loop alone, on a model you built and adapted yourself.

Checkpoints, `resume=True`, NaN stop, metrics.jsonl and torchrun (DDP / FSDP) come with it;
the model only has to return `.loss` and `.logits` for a batch, as transformers models do.

python examples/train_loop_api.py                                   # one process
torchrun --standalone --nproc_per_node 2 examples/train_loop_api.py  # DDP on CPU (gloo)
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.train import TrainOptions, train
from lorakit.train.data import Collator
from lorakit.train.distributed import setup, teardown

env = setup()  # reads torchrun's RANK / WORLD_SIZE; a single process otherwise
torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=256)
)  # fmt: skip
lorakit.inject(model, lorakit.LoraConfig(rank=8, targets="all-linear"))

# Examples are dicts of token lists; labels -100 are ignored (here: learn to count by 3s).
g = torch.Generator().manual_seed(0)
starts = torch.randint(0, 256, (256,), generator=g).tolist()
rows = [[(s + 3 * i) % 256 for i in range(16)] for s in starts]
data = [{"input_ids": r, "labels": r} for r in rows]

options = TrainOptions(
    out="runs/loop", overwrite=True, epochs=4, batch_size=16, lr=1e-2, eval_every=0, threads=1
)
result = train(
    model, data[:224], data[224:], options, task="causal-lm", collate_fn=Collator(0), env=env
)
if env.is_main:
    print(f"eval perplexity {result.eval_before['perplexity']:.1f} -> "
          f"{result.eval_after['perplexity']:.1f} in {result.steps} steps")  # fmt: skip
    lorakit.save_adapter(model, "runs/loop/adapter")
teardown(env)
