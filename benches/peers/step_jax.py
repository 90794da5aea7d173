"""JAX peer for `sharedmoe bench step`: the same model, batch and recipe.

Arguments: one JSON object {"model": ModelConfig, "train": TrainConfig,
"steps": N} as sharedmoe serialises them, and the variant to run. The step
is jitted with the optimizer state donated. Variants: `dense` for the
dense model; for the shared-MoE model, experts computed densely with a
routing mask (`masked-dense`) or tokens sorted by expert through
`jax.lax.ragged_dot` (`ragged-dot`). One variant per process, so that the
caller's peak-RSS measurement is the variant's own.

Prints one line, `bench-step-result {json}`: the variant, the median step
time of N steps after 2 warm-ups (`step_s`), and the compiled step's
`memory_analysis()` (`compiled`: arguments, outputs, aliased, temporaries,
generated code, in bytes), the fields `sharedmoe bench step` reads.
"""
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

spec, VARIANT = json.loads(sys.argv[1]), sys.argv[2]
m, t, steps = spec["model"], spec["train"], spec["steps"]
V, D, L, H, KV = m["vocab_size"], m["hidden_size"], m["num_layers"], m["num_heads"], m["num_kv_heads"]
HD = D // H
MOE = m["ffn"] == "sharedmoe"
E, K, F = m["num_experts"], m["experts_per_token"], m["expert_intermediate_size"]
S, MB = t["seq_len"], t["micro_batch"]
A = t["global_batch"] // (t["replicas"] * MB)
COMPUTE = jnp.bfloat16 if t["compute_dtype"] == "bf16" else jnp.float32
EPS = m["rms_norm_eps"]


def init(key):
    shapes = {}
    if m["embedding_dim"] > 0:
        shapes["embed"] = (V, m["embedding_dim"])
        shapes["proj"] = (D, m["embedding_dim"])
    else:
        shapes["embed"] = (V, D)
    for i in range(L):
        shapes[f"{i}.ln1"] = (D,)
        shapes[f"{i}.q"] = (D, D)
        shapes[f"{i}.k"] = (KV * HD, D)
        shapes[f"{i}.v"] = (KV * HD, D)
        shapes[f"{i}.o"] = (D, D)
        shapes[f"{i}.ln2"] = (D,)
        if not MOE:
            shapes[f"{i}.gate"] = (m["intermediate_size"], D)
            shapes[f"{i}.up"] = (m["intermediate_size"], D)
            shapes[f"{i}.down"] = (D, m["intermediate_size"])
    if MOE:
        shapes["router"] = (E, D)
        shapes["egate"] = (E, F, D)
        shapes["eup"] = (E, F, D)
        shapes["edown"] = (E, D, F)
    shapes["norm"] = (D,)
    keys = jax.random.split(key, len(shapes))
    return {
        n: (jnp.ones(s, jnp.float32) if len(s) == 1 else 0.02 * jax.random.normal(k, s, jnp.float32))
        for (n, s), k in zip(shapes.items(), keys)
    }


def rms_norm(x, g):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + EPS) * g
    return y.astype(x.dtype)


inv_freq = 1.0 / (m["rope_theta"] ** (np.arange(0, HD, 2) / HD))
ang = np.arange(S)[:, None] * inv_freq[None, :]
emb = np.concatenate([ang, ang], -1)
COS, SIN = jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32)


def rope(x):  # [B, S, N, HD]
    x1, x2 = x[..., : HD // 2], x[..., HD // 2 :]
    rot = jnp.concatenate([-x2, x1], -1)
    return x * COS[None, :, None, :].astype(x.dtype) + rot * SIN[None, :, None, :].astype(x.dtype)


def attention(x, p, i):
    b = x.shape[0]
    q = rope((x @ p[f"{i}.q"].T).reshape(b, S, H, HD))
    k = rope((x @ p[f"{i}.k"].T).reshape(b, S, KV, HD))
    v = (x @ p[f"{i}.v"].T).reshape(b, S, KV, HD)
    q = q.reshape(b, S, KV, H // KV, HD)
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) / math.sqrt(HD)
    mask = jnp.tril(jnp.ones((S, S), bool))
    s = jnp.where(mask, s, -1e30)
    pr = jax.nn.softmax(s, -1).astype(x.dtype)
    o = jnp.einsum("bkgqs,bskd->bqkgd", pr, v).reshape(b, S, D)
    return o @ p[f"{i}.o"].T


def route(x, p):
    probs = jax.nn.softmax((x.astype(jnp.float32) @ p["router"].T.astype(jnp.float32)), -1)
    top, idx = jax.lax.top_k(probs, K)
    w = top / top.sum(-1, keepdims=True)
    f = jax.nn.one_hot(idx, E).sum((0, 1)) / (x.shape[0] * K)
    aux = E * jnp.sum(f * probs.mean(0))
    return idx, w.astype(x.dtype), aux


def moe_masked(x, p):
    idx, w, aux = route(x, p)
    comb = (jax.nn.one_hot(idx, E, dtype=x.dtype) * w[..., None]).sum(1)  # [N, E]
    g = jnp.einsum("nd,efd->nef", x, p["egate"])
    u = jnp.einsum("nd,efd->nef", x, p["eup"])
    y = jnp.einsum("nef,edf->ned", jax.nn.silu(g) * u, p["edown"])
    return jnp.einsum("ned,ne->nd", y, comb), aux


def moe_ragged(x, p):
    idx, w, aux = route(x, p)
    n = x.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // K
    xs = x[token]
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    g = jax.lax.ragged_dot(xs, p["egate"].transpose(0, 2, 1), sizes)
    u = jax.lax.ragged_dot(xs, p["eup"].transpose(0, 2, 1), sizes)
    y = jax.lax.ragged_dot(jax.nn.silu(g) * u, p["edown"].transpose(0, 2, 1), sizes)
    y = y * w.reshape(-1)[order][:, None]
    return jnp.zeros((n, D), x.dtype).at[token].add(y), aux


def loss_fn(params, win, moe):
    p = {k: v.astype(COMPUTE) for k, v in params.items()}
    inp, tgt = win[:, :-1], win[:, 1:]
    h = p["embed"][inp]
    if "proj" in p:
        h = h @ p["proj"].T
    auxs = 0.0
    for i in range(L):
        h = h + attention(rms_norm(h, p[f"{i}.ln1"]), p, i)
        x = rms_norm(h, p[f"{i}.ln2"])
        if MOE:
            y, aux = moe(x.reshape(-1, D), p)
            auxs = auxs + aux
            h = h + y.reshape(h.shape)
        else:
            h = h + (jax.nn.silu(x @ p[f"{i}.gate"].T) * (x @ p[f"{i}.up"].T)) @ p[f"{i}.down"].T
    h = rms_norm(h, p["norm"])
    if "proj" in p:
        h = h @ p["proj"]
    logits = jnp.einsum("bse,ve->bsv", h, p["embed"], preferred_element_type=jnp.float32)
    ce = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0])
    aux = auxs / L
    return ce + (m["aux_loss_coef"] * aux if MOE else 0.0), (ce, aux)


def lr_at(step):
    w, total, peak, final = t["warmup_steps"], t["steps"], t["lr"], t["min_lr"]
    s = step.astype(jnp.float32)
    warm = peak * (s + 1) / w
    prog = (s - w) / (total - w)
    return jnp.where(s < w, warm, final + 0.5 * (peak - final) * (1 + jnp.cos(jnp.pi * prog)))


def make_step(moe):
    grad_fn = jax.grad(lambda p, w: loss_fn(p, w, moe), has_aux=True)

    def train_step(state, windows):
        params, mu, nu, step = state

        def body(acc, win):
            g, (ce, aux) = grad_fn(params, win)
            return jax.tree.map(jnp.add, acc, (g, ce, aux)), None

        zero = (jax.tree.map(jnp.zeros_like, params), 0.0, 0.0)
        (g, ce, aux), _ = jax.lax.scan(body, zero, windows)
        g = jax.tree.map(lambda x: x / A, g)
        norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
        scale = t["grad_clip"] / jnp.maximum(norm, t["grad_clip"])
        lr = lr_at(step)
        c = (step + 1).astype(jnp.float32)
        b1, b2 = t["beta1"], t["beta2"]
        new_p, new_m, new_v = {}, {}, {}
        for k in params:
            gk = g[k] * scale
            mk = b1 * mu[k] + (1 - b1) * gk
            vk = b2 * nu[k] + (1 - b2) * gk * gk
            upd = (mk / (1 - b1**c)) / (jnp.sqrt(vk / (1 - b2**c)) + t["eps"])
            if params[k].ndim >= 2:
                upd = upd + t["weight_decay"] * params[k]
            new_p[k], new_m[k], new_v[k] = params[k] - lr * upd, mk, vk
        return (new_p, new_m, new_v, step + 1), (ce / A, aux / A, norm, lr)

    return jax.jit(train_step, donate_argnums=(0,))


def bench(variant, moe):
    params = init(jax.random.PRNGKey(0))
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = (params, zeros, jax.tree.map(jnp.zeros_like, params), jnp.int32(0))
    step = make_step(moe)
    rng = np.random.default_rng(1)
    probe = jnp.zeros((A, MB, S + 1), jnp.int32)
    ma = step.lower(state, probe).compile().memory_analysis()
    compiled = None if ma is None else {
        "arguments": ma.argument_size_in_bytes,
        "outputs": ma.output_size_in_bytes,
        "aliased": ma.alias_size_in_bytes,
        "temporaries": ma.temp_size_in_bytes,
        "generated_code": ma.generated_code_size_in_bytes,
    }
    times = []
    for i in range(steps + 2):
        win = jnp.asarray(rng.integers(0, V, (A, MB, S + 1)), jnp.int32)
        t0 = time.perf_counter()
        state, metrics = step(state, win)
        jax.block_until_ready(metrics)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    result = {"variant": variant, "step_s": sorted(times)[len(times) // 2], "compiled": compiled}
    print("bench-step-result", json.dumps(result), flush=True)


VARIANTS = {"masked-dense": moe_masked, "ragged-dot": moe_ragged} if MOE else {"dense": None}
if VARIANT not in VARIANTS:
    sys.exit(f"variant {VARIANT!r}: this model's variants are {sorted(VARIANTS)}")
print("jax", jax.__version__, file=sys.stderr)
bench(VARIANT, VARIANTS[VARIANT])
