"""A random tiny Qwen3MoeForCausalLM saved with save_pretrained, and its
f32 logits, cross-entropy and balance loss on fixed token rows: the
reference tests/hf_import.rs compares `checkpoint import-hf` against.

usage: hf_qwen3_moe.py OUT_DIR NORM_TOPK_PROB(0|1) DTYPE(float32|bfloat16)
       hf_qwen3_moe.py --logits MODEL_DIR ROWS_JSON

The balance loss is computed here from the router logits transformers
returns, by the formula of transformers' load_balancing_loss_func (no
attention mask), written out rather than imported: some releases fed it
already-softmaxed values (transformers issue 45120).
"""
import json
import sys

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

if sys.argv[1] == "--logits":
    # hf_qwen3_moe.py --logits MODEL_DIR ROWS_JSON: the f32 logits of
    # rows[:, :-1] through the saved model, as JSON on stdout.
    model = Qwen3MoeForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
    rows = torch.tensor(json.loads(sys.argv[3]))
    with torch.no_grad():
        logits = model(input_ids=rows[:, :-1]).logits
    print(json.dumps({"logits": logits.flatten().tolist()}))
    sys.exit(0)

out, norm_topk, dtype = sys.argv[1], sys.argv[2] == "1", getattr(torch, sys.argv[3])
torch.manual_seed(0)
config = Qwen3MoeConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # hidden / heads = 8
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=norm_topk,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
    max_position_embeddings=64,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.001,
)
model = Qwen3MoeForCausalLM(config).eval()
with torch.no_grad():
    # Weights large enough that routing and every norm matter.
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        else:
            p.copy_(0.3 * torch.randn_like(p))
model.to(dtype).save_pretrained(out, safe_serialization=True)
# The reference is what transformers computes from the saved files, in
# f32 (loading recomputes the RoPE tables in f32; converting the model
# in memory would leave them rounded to dtype).
model = Qwen3MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
rows = torch.tensor([[(7 * i + 3 * r + 1) % 64 for i in range(9)] for r in range(2)])
with torch.no_grad():
    o = model(input_ids=rows[:, :-1], output_router_logits=True)
logits = o.logits
ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), rows[:, 1:].reshape(-1))
gate = torch.cat([g.float() for g in o.router_logits], dim=0)  # [L*N, E]
probs = gate.softmax(-1)
_, chosen = probs.topk(config.num_experts_per_tok, dim=-1)
mask = torch.nn.functional.one_hot(chosen, config.num_experts).float()  # [L*N, k, E]
aux = (mask.mean(0) * probs.mean(0).unsqueeze(0)).sum() * config.num_experts
json.dump(
    {
        "rows": rows.tolist(),
        "logits": logits.flatten().tolist(),
        "ce": ce.item(),
        "aux": aux.item(),
        "moe_layers": len(o.router_logits),
    },
    open(f"{out}/reference.json", "w"),
)
