"""Logits of a Hugging Face directory with bitsandbytes NF4 weights
(`sharedmoe checkpoint export-hf` of a compressed checkpoint), loaded by
transformers on the CPU: `bnb_logits.py DIR '[token ids]'` prints JSON
{"linear_class": ..., "logits": [S * V floats], "bf16_kernel_max_diff": x}.

On a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its weights at
the first inference call and runs a fused kernel that casts the
activations and the block scales to bf16 (backends/cpu/ops.py, gemv_4bit).
That is a speed path with bf16 rounding (~1e-3 relative), not the format's
values, so the logits compared here come from bitsandbytes' default path
(dequantize_4bit to f32, then F.linear), with the fused kernel switched
off per module; how far the fused kernel lands from it is reported too."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM


def logits(directory, tokens, fused_kernel):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    linear = type(model.model.layers[0].self_attn.q_proj).__name__
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = (
                module.support_avx512bf16_for_cpu and fused_kernel
            )
    with torch.no_grad():
        return linear, model(torch.tensor([tokens])).logits[0]


def main():
    directory, tokens = sys.argv[1], json.loads(sys.argv[2])
    linear, exact = logits(directory, tokens, fused_kernel=False)
    _, fused = logits(directory, tokens, fused_kernel=True)
    print(
        json.dumps(
            {
                "linear_class": linear,
                "logits": exact.flatten().tolist(),
                "bf16_kernel_max_diff": (exact - fused).abs().max().item(),
            }
        )
    )


if __name__ == "__main__":
    main()
