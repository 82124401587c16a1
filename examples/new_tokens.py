"""Train the rows of new special tokens, LoRA elsewhere (PEFT's `trainable_token_indices`).

A model that gains tokens (say `<tool>` and `</tool>`) needs their embedding rows trained,
but not the whole table: `trainable_token_indices` trains those rows alone, beside ordinary
LoRA adapters; a tied output head reads the same rows. The adapter file is PEFT's format.
A tiny random Llama from a config keeps this offline and quick.

python examples/new_tokens.py    # a few CPU-seconds
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip
model = LlamaForCausalLM(config)
new_tokens = [126, 127]  # the ids a tokenizer gave the added tokens
base_state = {k: v.clone() for k, v in model.state_dict().items()}
table_before = model.get_input_embeddings().weight.detach().clone()

lorakit.inject(
    model,
    lorakit.LoraConfig(targets=["q_proj", "v_proj"], rank=4, trainable_token_indices=new_tokens),
)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
ids = torch.randint(0, 126, (4, 16))
ids[:, ::4] = torch.tensor(new_tokens).repeat(2)  # the new tokens appear in the data
for _ in range(20):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(f"loss after 20 steps: {loss.item():.3f}")

lorakit.merge(model)  # write the trained rows into the table to compare it with before
changed = (model.get_input_embeddings().weight != table_before).any(dim=1).nonzero().flatten()
print("rows changed:", changed.tolist())  # only the new tokens' rows
assert changed.tolist() == new_tokens
lorakit.unmerge(model)

with tempfile.TemporaryDirectory() as folder:
    lorakit.save_adapter(model, folder)  # adapter_model.safetensors + adapter_config.json
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(base_state)  # the base as it was before training
    lorakit.load_adapter(fresh, folder)
    with torch.no_grad():
        same = torch.allclose(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
print("the reloaded adapter gives the same logits:", same)
assert same
