"""Loads a `sharedmoe checkpoint export-hf` directory with Hugging Face
transformers (FlaxAutoModelForCausalLM -> FlaxLlamaForCausalLM, on JAX's
CPU backend, float32) and AutoTokenizer, and prints JSON: the mean
next-token cross-entropy of the given token rows (and each row's), and the
tokenizer's ids of the given texts. Used by tests/hf_export.rs.

usage: hf_loss.py HF_DIR INPUT_JSON
INPUT_JSON: {"rows": [[ids of S+1 tokens], ...], "texts": ["...", ...]}
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from transformers import AutoConfig, AutoTokenizer, FlaxAutoModelForCausalLM  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def main():
    hf_dir, input_path = sys.argv[1], sys.argv[2]
    with open(input_path) as f:
        inp = json.load(f)
    rows = np.asarray(inp["rows"], dtype=np.int32)

    config = AutoConfig.from_pretrained(hf_dir)
    # FlaxLlama (transformers 4.x) hard-codes RoPE theta 10,000 and
    # head_dim = hidden / heads; refuse exports it would silently misread.
    assert config.rope_theta == 10000.0, config.rope_theta
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    model = FlaxAutoModelForCausalLM.from_pretrained(hf_dir, dtype=jnp.float32)
    assert type(model).__name__ == "FlaxLlamaForCausalLM", type(model).__name__

    # The file as PyTorch's LlamaForCausalLM reads it: HF names, no
    # lm_head.weight (tied). FlaxLlama has no tying of its own, so tie here
    # as tie_word_embeddings says (the PyTorch model does it on load).
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    assert "lm_head.weight" not in weights and config.tie_word_embeddings
    # Every parameter FlaxLlama holds came from the file (Linear weights
    # [out, in] become kernels [in, out]); only lm_head is left to tie.
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = {k: np.asarray(v) for k, v in flatten_dict(model.params).items()}
    from_file = set()
    for name, w in weights.items():
        *path, leaf = name.split(".")
        if path[-1] == "embed_tokens":
            key, want = tuple(path) + ("embedding",), w
        elif path[-1].endswith("_proj"):
            key, want = tuple(path) + ("kernel",), w.T
        else:
            key, want = tuple(path) + ("weight",), w
        assert key in flat, f"{name}: no Flax parameter {key}"
        assert flat[key].dtype == np.float32, (name, flat[key].dtype)
        np.testing.assert_array_equal(flat[key], want, err_msg=name)
        from_file.add(key)
    left = set(flat) - from_file
    assert left == {("lm_head", "kernel")}, f"not loaded from the file: {sorted(left)}"
    flat[("lm_head", "kernel")] = weights["model.embed_tokens.weight"].T
    params = unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})

    logits = model(rows[:, :-1], params=params).logits  # [B, S, V] float32
    assert logits.dtype == jnp.float32, logits.dtype
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, rows[:, 1:, None], axis=-1)[..., 0]
    ce_rows = (-picked).mean(axis=1)

    tok = AutoTokenizer.from_pretrained(hf_dir)
    texts = inp["texts"]
    out = {
        "ce": float((-picked).mean()),
        "ce_rows": [float(x) for x in ce_rows],
        "tokenizer_class": type(tok).__name__,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "ids": [tok(t)["input_ids"] for t in texts],
        "decoded": [tok.decode(tok(t)["input_ids"]) for t in texts],
        "versions": {
            "transformers": transformers.__version__,
            "jax": jax.__version__,
            "numpy": np.__version__,
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
