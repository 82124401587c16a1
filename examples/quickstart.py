"""Adapt a tiny Llama with LoRA, train a few steps, merge: the README's ten lines, runnable.

python examples/quickstart.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=1000,
)
model = LlamaForCausalLM(config)
report = lorakit.inject(model, lorakit.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"]))
print(report)

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
ids = torch.randint(0, 1000, (4, 32))
for step in range(5):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

with torch.no_grad():
    adapted = model(input_ids=ids).logits
    lorakit.merge_and_unload(model)
    merged = model(input_ids=ids).logits
print(
    type(model.model.layers[0].self_attn.q_proj).__name__,
    "max |merged - adapted| =",
    f"{(merged - adapted).abs().max().item():.2e}",
)
