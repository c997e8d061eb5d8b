#!/usr/bin/env python3
r"""tinygpt's training step against PyTorch's (nanoGPT's step) on this machine, side by side.

Runs `tinygpt bench --json --no-matmul` and `benches/pytorch_nanogpt.py --json` alternately
(tinygpt, PyTorch, tinygpt, ...), so that a slow spell of the machine falls on both alike, and
prints per reference model the median and fastest step of each, the speed ratio, each one's
MFU against the FMA peak tinygpt measured, and the ceiling: the ratio tinygpt would reach if
its step ran at that peak (its FLOPs at 100% MFU), which bounds any target on this machine.

    cargo build --release
    python3 benches/vs_pytorch.py --rounds 5
    python3 benches/vs_pytorch.py --python /path/to/venv/bin/python --json > figures.json
    # also tinygpt's precision = "bf16" against PyTorch in f32 and under bf16 autocast
    python3 benches/vs_pytorch.py --bf16
    # tinygpt with each batch in 2 shards (the recipe key `shards`)
    python3 benches/vs_pytorch.py --bf16 --shards 2

Needs `torch` in the Python that runs pytorch_nanogpt.py (`--python`, default this one).
Standard library otherwise. Prints figures; decides nothing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd):
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
    return json.loads(run.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tinygpt", default=os.path.join(HERE, "..", "target", "release", "tinygpt"))
    parser.add_argument("--python", default=sys.executable, help="a Python that has torch")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model per run (default 10)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also compare tinygpt's precision = \"bf16\" step with PyTorch's, in f32 and under bf16 autocast",
    )
    parser.add_argument("--shards", type=int, default=1, choices=[1, 2, 4],
                        help="tinygpt splits each batch into this many shards (`tinygpt bench --shards`)")
    args = parser.parse_args()
    # Per label ("f32", "bf16"): tinygpt's step reports and PyTorch's step timings, per model.
    ours, theirs, peaks, cpu = {}, {}, [], None
    precisions = ["f32", "bf16"] if args.bf16 else ["f32"]
    for i in range(args.rounds):
        t = run_json([args.tinygpt, "bench", "--json", "--no-matmul", "--steps", str(args.steps),
                      "--shards", str(args.shards)])
        cpu = t["machine"].get("cpu")
        for m in t["models"]:
            ours.setdefault("f32", {}).setdefault(m["name"], []).append(m["step"])
            if "bf16" in m:
                ours.setdefault("bf16", {}).setdefault(m["name"], []).append(m["bf16"]["step"])
            peaks.append(m["peak_gflops"])
        for precision in precisions:
            flags = ["--bf16"] if precision == "bf16" else []
            p = run_json([args.python, os.path.join(HERE, "pytorch_nanogpt.py"), "--json", "--steps", str(args.steps)]
                         + flags)
            torch_version = p["torch"]
            for m in p["models"]:
                theirs.setdefault(precision, {}).setdefault(m["name"], []).append(m)
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
    peak = max(peaks)
    pairs = [("f32", "f32")] + ([("bf16", "f32"), ("bf16", "bf16")] if args.bf16 else [])
    rows = []
    for mine_p, torch_p in pairs:
        for name, steps in ours[mine_p].items():
            rows.append(compare(name, steps, theirs[torch_p][name], peak, mine_p, torch_p))
    if args.json:
        print(json.dumps({"cpu": cpu, "torch": torch_version, "peak_gflops": peak, "rounds": args.rounds,
                          "steps": args.steps, "shards": args.shards, "models": rows}, indent=2))
        return
    sharded = f"; tinygpt's batches in {args.shards} shards" if args.shards > 1 else ""
    print(f"{cpu}, torch {torch_version}, FMA peak {peak:.1f} GFLOP/s; medians of {args.rounds} alternated rounds "
          f"of {args.steps} steps (fastest in brackets){sharded}")
    head = (f"{'model':<18} {'ours':>5} {'torch':>5} {'tinygpt ms':>16} {'PyTorch ms':>16} {'speed-up':>9} "
            f"{'MFU ours':>9} {'MFU torch':>10} {'at 100% MFU':>12}")
    print(head)
    for r in rows:
        ours_ms = f"{r['tinygpt_median_ms']:.1f} ({r['tinygpt_fastest_ms']:.1f})"
        torch_ms = f"{r['pytorch_median_ms']:.1f} ({r['pytorch_fastest_ms']:.1f})"
        print(f"{r['model']:<18} {r['tinygpt_precision']:>5} {r['pytorch_precision']:>5} {ours_ms:>16} {torch_ms:>16} "
              f"{r['speedup']:>8.2f}x {100 * r['tinygpt_mfu']:>8.1f}% {100 * r['pytorch_mfu']:>9.1f}% "
              f"{r['ceiling_speedup']:>11.2f}x")
    print("speed-up: PyTorch's median step over tinygpt's; MFU against the f32 FMA peak (bf16 on AMX can pass "
          "100%); at 100% MFU: the speed-up a step at the f32 FMA peak would give")


def compare(name, steps, torch_runs, peak, mine_p, torch_p):
    """One row: tinygpt's step reports against PyTorch's timings of the same model."""
    mine = [s["step_spread"][1] for s in steps]
    mine_fast = min(s["step_spread"][0] for s in steps)
    torch_ms = [r["median_step_s"] for r in torch_runs]
    torch_fast = min(r["fastest_step_s"] for r in torch_runs)
    step = steps[0]
    tokens_per_step = step["tokens_per_s"] * step["step_seconds"]
    flops_per_step = step["flops_per_token"] * tokens_per_step
    floor = flops_per_step / (peak * 1e9)  # seconds per step at 100% MFU
    m_ours, m_torch = statistics.median(mine), statistics.median(torch_ms)
    return {
        "model": name,
        "tinygpt_precision": mine_p,
        "pytorch_precision": torch_p,
        "tinygpt_median_ms": m_ours * 1e3,
        "tinygpt_fastest_ms": mine_fast * 1e3,
        "pytorch_median_ms": m_torch * 1e3,
        "pytorch_fastest_ms": torch_fast * 1e3,
        "speedup": m_torch / m_ours,
        "tinygpt_mfu": floor / m_ours,
        "pytorch_mfu": floor / m_torch,
        "ceiling_speedup": m_torch / floor,
    }


if __name__ == "__main__":
    main()
