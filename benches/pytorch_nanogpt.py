#!/usr/bin/env python3
r"""nanoGPT's training step in PyTorch on this CPU: the baseline issue 4 compares tinygpt with.

nanoGPT's model (gpt2 blocks, no biases, tied head, PyTorch's fused causal attention), its
AdamW groups (decay on matrices only), learning-rate schedule, gradient clipping and
random-window batches, written again here from its description; nothing is downloaded.

    # time the two reference models of `tinygpt bench` on random tokens (ms/step, tokens/s, MFU)
    python3 benches/pytorch_nanogpt.py --peak 190
    # the same as JSON, as benches/vs_pytorch.py reads it; --bf16: the forward under bf16 autocast
    python3 benches/pytorch_nanogpt.py --json [--bf16]
    # nanoGPT's CPU recipe for tiny Shakespeare, all 2000 steps: throughput and validation loss
    python3 benches/pytorch_nanogpt.py --train ../shared/data/tinyshakespeare/input.txt --seed 1337

Needs `torch` (the CPU build is enough; any wheel runs on the CPU). `--threads` defaults to the
machine's cores, as `tinygpt bench` uses them. `--peak` is the 2-thread FMA peak `tinygpt bench`
measured, in GFLOP/s, to print an MFU on the same scale. Prints figures; decides nothing.
"""

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, n_embd):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def non_embedding_params(self):
        """As nanoGPT counts them: all but the position embeddings (the token embedding is the head)."""
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()


def flops_per_token(model, n_layer, block, n_embd):
    """nanoGPT's estimate (PaLM appendix B): 6N + 12 L T C, as `tinygpt bench` counts."""
    return 6 * model.non_embedding_params() + 12 * n_layer * block * n_embd


def optimizer(model, lr, betas, weight_decay):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(it, lr, min_lr, warmup, decay_steps):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_steps:
        return min_lr
    ratio = (it - warmup) / (decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def windows(data, block, batch):
    ix = torch.randint(len(data) - block, (batch,))
    x = torch.stack([data[i : i + block] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix])
    return x, y


def step(model, opt, x, y, clip, bf16=False):
    # bf16: nanoGPT's mixed precision (`dtype = "bfloat16"`): the forward under autocast,
    # f32 weights, gradients and AdamW.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def time_steps(name, vocab, block, n_layer, n_head, n_embd, batch, steps, peak, quiet=False, bf16=False):
    torch.manual_seed(0)
    model = GPT(vocab, block, n_layer, n_head, n_embd)
    opt = optimizer(model, 1e-3, (0.9, 0.99), 0.1)
    data = torch.randint(vocab, (100_000,))
    times = []
    for i in range(steps + 2):
        x, y = windows(data, block, batch)
        start = time.perf_counter()
        step(model, opt, x, y, 1.0, bf16)
        if i >= 2:  # the first two steps allocate
            times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1e3
    tokens = batch * block / (ms / 1e3)
    fpt = flops_per_token(model, n_layer, block, n_embd)
    mfu = f", MFU {100 * tokens * fpt / (peak * 1e9):.1f}% of {peak:g} GFLOP/s" if peak else ""
    if not quiet:
        print(
            f"{name}: median {ms:.1f} ms/step (fastest {min(times) * 1e3:.1f}, slowest {max(times) * 1e3:.1f}) "
            f"over {steps} steps, {tokens:,.0f} tokens/s, {fpt / 1e6:.2f} MFLOP/token{mfu}"
        )
    return {
        "name": name,
        "steps": steps,
        "median_step_s": ms / 1e3,
        "fastest_step_s": min(times),
        "slowest_step_s": max(times),
        "tokens_per_s": tokens,
        "flops_per_token": fpt,
    }


@torch.no_grad()
def whole_split_loss(model, data, block):
    """Every non-overlapping window of `block` predicted tokens, as tinygpt's `evaluate`."""
    n = (len(data) - 1) // block
    total = 0.0
    for start in range(0, n, 64):
        rows = range(start, min(n, start + 64))
        x = torch.stack([data[i * block : i * block + block] for i in rows])
        y = torch.stack([data[i * block + 1 : i * block + block + 1] for i in rows])
        total += model(x, y).item() * len(rows)
    return total / n


@torch.no_grad()
def estimate_loss(model, data, block, batch, iters):
    """nanoGPT's estimate: the mean loss of `iters` random batches."""
    return statistics.fmean(model(*windows(data, block, batch)).item() for _ in range(iters))


def train_shakespeare(path, seed, peak, bf16=False):
    text = open(path, encoding="utf-8").read()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    n = int(len(ids) * 0.9)
    train, val = ids[:n], ids[n:]
    block, batch, n_layer, n_head, n_embd, max_iters = 64, 12, 4, 4, 128, 2000
    torch.manual_seed(seed)
    model = GPT(len(chars), block, n_layer, n_head, n_embd)
    opt = optimizer(model, 1e-3, (0.9, 0.99), 0.1)
    busy = 0.0
    for it in range(max_iters + 1):
        if it % 250 == 0 or it == max_iters:
            model.eval()
            est = estimate_loss(model, val, block, batch, 20)
            model.train()
            print(f"step {it}: val loss {est:.4f} (20 batches)", flush=True)
        if it == max_iters:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(it, 1e-3, 1e-4, 100, max_iters)
        x, y = windows(train, block, batch)
        start = time.perf_counter()
        loss = step(model, opt, x, y, 1.0, bf16)
        busy += time.perf_counter() - start
    model.eval()
    tokens = max_iters * batch * block / busy
    fpt = flops_per_token(model, n_layer, block, n_embd)
    mfu = f", MFU {100 * tokens * fpt / (peak * 1e9):.1f}%" if peak else ""
    print(
        f"trained {max_iters} steps in {busy:.1f} s of steps: {tokens:,.0f} tokens/s{mfu}; "
        f"last train loss {loss:.4f}"
    )
    print(f"validation loss, whole split: {whole_split_loss(model, val, block):.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--peak", type=float, default=0.0, help="the FMA peak in GFLOP/s, for MFU")
    parser.add_argument("--steps", type=int, default=20, help="steps to time per model")
    parser.add_argument("--train", metavar="INPUT_TXT", help="train nanoGPT's shakespeare_char recipe on it")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--json", action="store_true", help="print the step timings as one JSON document")
    parser.add_argument("--bf16", action="store_true", help="the forward under bf16 autocast (timing and --train)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    if not args.json:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {capability}")
    if args.train:
        train_shakespeare(args.train, args.seed, args.peak, args.bf16)
        return
    models = [
        time_steps("shakespeare_char", 65, 64, 4, 4, 128, 12, args.steps, args.peak, args.json, args.bf16),
        time_steps("gpt2-6x384", 65, 256, 6, 6, 384, 8, max(3, args.steps // 4), args.peak, args.json, args.bf16),
    ]
    if args.json:
        info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_capability": capability,
                "bf16": args.bf16}
        print(json.dumps({**info, "models": models}, indent=2))


if __name__ == "__main__":
    main()
