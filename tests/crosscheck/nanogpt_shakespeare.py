"""nanoGPT's CPU recipe for tiny Shakespeare (recipes/shakespeare_char.toml), written
independently in JAX, to see what validation loss that configuration reaches on the whole
split, and whether tinygpt trains it the same way.

    python nanogpt_shakespeare.py INPUT.txt SEED
        its own initialisation and random windows (numpy), as nanoGPT would draw them;
    python nanogpt_shakespeare.py --replay INIT_DIR PACK_DIR SEED
        tinygpt's initial weights (a `pretrain` run with lr = 0 and one step), its packed
        train and validation blocks, and its window order (SplitMix64 from the stage seed):
        the same run as tinygpt's, step for step, in another implementation.

Prints the training loss every 250 steps, the loss on the whole validation split (every token
predicted once, in windows of 64, as `evaluate` reports `val_loss`) and, for the independent
run, five estimates the way nanoGPT reports them (20 batches of 12 random windows).
Not run by the test suite (minutes per run); see docs/bench.md for the figures. Its packages
are those of requirements.txt beside it (`bash .ci/run` installs them in target/crosscheck-venv).
"""

import math
import sys
import time

import jax
import pyarrow.ipc as ipc
from safetensors.numpy import load_file
import jax.numpy as jnp
import numpy as np

L, H, C, T, B = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 100, 2000
BETA1, BETA2, EPS, WD, CLIP = 0.9, 0.99, 1e-8, 0.1, 1.0


def lr_at(it):
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > DECAY:
        return MIN_LR
    ratio = (it - WARMUP) / (DECAY - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def init(key, v):
    ks = iter(jax.random.split(key, 4 + 4 * L))
    n = lambda shape, std=0.02: std * jax.random.normal(next(ks), shape, jnp.float32)
    proj = 0.02 / math.sqrt(2 * L)
    p = {"wte": n((v, C)), "wpe": n((T, C)), "ln_f": jnp.ones(C)}
    for l in range(L):
        p[f"{l}.ln_1"] = jnp.ones(C)
        p[f"{l}.ln_2"] = jnp.ones(C)
        p[f"{l}.attn"] = n((C, 3 * C))
        p[f"{l}.attn_proj"] = n((C, C), proj)
        p[f"{l}.fc"] = n((C, 4 * C))
        p[f"{l}.fc_proj"] = n((4 * C, C), proj)
    return p


def layer_norm(x, w):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * w


def forward(p, x):
    b, t = x.shape
    h = p["wte"][x] + p["wpe"][:t]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for l in range(L):
        a = layer_norm(h, p[f"{l}.ln_1"]) @ p[f"{l}.attn"]
        q, k, v = jnp.split(a, 3, axis=-1)
        split = lambda z: z.reshape(b, t, H, C // H).transpose(0, 2, 1, 3)
        q, k, v = split(q), split(k), split(v)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(C // H)
        s = jnp.where(mask, s, -jnp.inf)
        y = jax.nn.softmax(s, axis=-1) @ v
        h = h + y.transpose(0, 2, 1, 3).reshape(b, t, C) @ p[f"{l}.attn_proj"]
        m = jax.nn.gelu(layer_norm(h, p[f"{l}.ln_2"]) @ p[f"{l}.fc"], approximate=False)
        h = h + m @ p[f"{l}.fc_proj"]
    return layer_norm(h, p["ln_f"]) @ p["wte"].T


def loss_fn(p, x, y):
    logits = forward(p, x)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return (lse - jnp.take_along_axis(logits, y[..., None], -1)[..., 0]).mean()


@jax.jit
def step(p, m, v, x, y, lr, t):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    norm = jnp.sqrt(sum(jnp.sum(gi * gi) for gi in jax.tree_util.tree_leaves(g)))
    coef = jnp.minimum(1.0, CLIP / (norm + 1e-6))
    g = jax.tree_util.tree_map(lambda gi: gi * coef, g)
    m = jax.tree_util.tree_map(lambda mi, gi: BETA1 * mi + (1 - BETA1) * gi, m, g)
    v = jax.tree_util.tree_map(lambda vi, gi: BETA2 * vi + (1 - BETA2) * gi * gi, v, g)
    bc1, bc2 = 1 - BETA1**t, 1 - BETA2**t

    def update(name, pi, mi, vi):
        if pi.ndim >= 2:
            pi = pi * (1 - lr * WD)
        return pi - lr / bc1 * mi / (jnp.sqrt(vi) / jnp.sqrt(bc2) + EPS)

    p = {k: update(k, p[k], m[k], v[k]) for k in p}
    return p, m, v, loss


eval_loss = jax.jit(loss_fn)


class SplitMix64:
    """tinygpt's generator (stages/src/nn/rng.rs), for its window order."""

    MASK = (1 << 64) - 1

    def __init__(self, state):
        self.state = state & self.MASK

    def below(self, n):
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return ((z ^ (z >> 31)) * n) >> 64


def blocks(path):
    column = ipc.open_file(path).read_all().column("tokens").combine_chunks()
    return column.values.to_numpy().astype(np.int32).reshape(-1, column.type.list_size)


def from_tinygpt(path):
    w = load_file(path)
    p = {"wte": w["transformer.wte.weight"], "wpe": w["transformer.wpe.weight"], "ln_f": w["transformer.ln_f.weight"]}
    for l in range(L):
        h = f"transformer.h.{l}."
        p[f"{l}.ln_1"], p[f"{l}.ln_2"] = w[h + "ln_1.weight"], w[h + "ln_2.weight"]
        p[f"{l}.attn"], p[f"{l}.attn_proj"] = w[h + "attn.c_attn.weight"], w[h + "attn.c_proj.weight"]
        p[f"{l}.fc"], p[f"{l}.fc_proj"] = w[h + "mlp.c_fc.weight"], w[h + "mlp.c_proj.weight"]
    return {k: jnp.asarray(v) for k, v in p.items()}


def main():
    if sys.argv[1] == "--replay":
        init_dir, pack_dir, seed = sys.argv[2], sys.argv[3], int(sys.argv[4])
        p = from_tinygpt(f"{init_dir}/model.safetensors")
        rows = blocks(f"{pack_dir}/train.arrow")
        train = np.concatenate([rows[0], rows[1:, 1:].ravel()])
        val_rows = blocks(f"{pack_dir}/val.arrow")
        windows = SplitMix64(seed ^ 0x57494E444F575321)
        starts = lambda: [windows.below(len(train) - T) for _ in range(B)]
        val = None
    else:
        text = open(sys.argv[1], encoding="utf-8").read()
        seed = int(sys.argv[2])
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        data = np.array([stoi[c] for c in text], dtype=np.int32)
        n = int(0.9 * len(data))
        train, val = data[:n], data[n:]
        rng = np.random.default_rng(seed)
        p = init(jax.random.PRNGKey(seed), len(chars))
        starts = lambda: rng.integers(0, len(train) - T, B)
        w = (len(val) - 1) // T
        val_rows = np.stack([val[i * T : i * T + T + 1] for i in range(w)])
    m = jax.tree_util.tree_map(jnp.zeros_like, p)
    v = jax.tree_util.tree_map(jnp.zeros_like, p)
    start = time.time()
    for it in range(DECAY):
        ix = starts()
        x = np.stack([train[i : i + T] for i in ix])
        y = np.stack([train[i + 1 : i + 1 + T] for i in ix])
        p, m, v, loss = step(p, m, v, x, y, lr_at(it), it + 1)
        if it % 250 == 0 or it < 5:
            print(f"step {it + 1} loss {float(loss):.4f} ({time.time() - start:.0f} s)", flush=True)
    total = 0.0
    for i in range(0, len(val_rows), 64):
        r = val_rows[i : i + 64]
        total += float(eval_loss(p, r[:, :-1], r[:, 1:])) * len(r)
    report = f"seed {seed}: whole-split val loss {total / len(val_rows):.4f}"
    if val is not None:
        est = []
        for _ in range(5):
            acc = 0.0
            for _ in range(20):
                ix = rng.integers(0, len(val) - T, B)
                xs, ys = np.stack([val[i : i + T] for i in ix]), np.stack([val[i + 1 : i + 1 + T] for i in ix])
                acc += float(eval_loss(p, xs, ys))
            est.append(acc / 20)
        report += f"; 240-window estimates {' '.join(f'{e:.4f}' for e in est)}"
    print(report, flush=True)


if __name__ == "__main__":
    main()
