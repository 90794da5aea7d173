"""JAX peer for benches/runtime.rs: the same 2-layer MLP SGD step.

Prints `jax VERSION` and `median_step_s SECONDS` (median of 25 steps after
5 warm-up steps), with parameters donated as in the Rust benchmark.
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

BATCH, WIDTH = (int(a) for a in sys.argv[1:3])
LR = 1e-3


def loss_fn(params, x, y):
    w1, b1, w2, b2 = params
    h = jnp.maximum(x @ w1 + b1, 0.0)
    return jnp.mean((h @ w2 + b2 - y) ** 2)


def sgd_step(params, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    return [p - LR * g for p, g in zip(params, grads)], loss


step = jax.jit(sgd_step, donate_argnums=(0,))


def init(i, shape):
    n = int(np.prod(shape))
    k = np.arange(n)
    return jnp.asarray((((k * 7919 + i * 104729) % 1000) / 1000.0 - 0.5).astype(np.float32).reshape(shape))


params = [init(0, (WIDTH, WIDTH)), init(1, (WIDTH,)), init(2, (WIDTH, WIDTH)), init(3, (WIDTH,))]
x, y = init(4, (BATCH, WIDTH)), init(5, (BATCH, WIDTH))
times = []
for i in range(30):
    t = time.perf_counter()
    params, loss = step(params, x, y)
    loss = float(loss)
    if i >= 5:
        times.append(time.perf_counter() - t)
print("jax", jax.__version__)
print("median_step_s", sorted(times)[len(times) // 2])
