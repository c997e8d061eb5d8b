#!/usr/bin/env python3
r"""Compare the training step of two tinygpt builds on a noisy machine.

Runs `BIN bench --json --no-matmul --steps S` for the two binaries alternately (A, B, A, B, ...), so
that a slow spell of the machine falls on both alike, and prints per model the median and the
fastest of each binary's ms/step and the ratio of the medians. Build the two variants first,
for example:

    git stash && cargo build --release && cp target/release/tinygpt /tmp/tinygpt-a
    git stash pop && cargo build --release && cp target/release/tinygpt /tmp/tinygpt-b
    python3 benches/ab.py /tmp/tinygpt-a /tmp/tinygpt-b --pairs 8

To compare settings of one build that an environment variable selects, give it a wrapper:

    printf '#!/bin/sh\nexec env VAR=1 /tmp/tinygpt-a "$@"\n' > /tmp/tinygpt-var && chmod +x /tmp/tinygpt-var

Standard library only. Prints figures; decides nothing.
"""

import argparse
import json
import statistics
import subprocess
import sys


def step_times(binary, steps):
    """Mean ms/step per model from one `bench` run."""
    cmd = [binary, "bench", "--json", "--no-matmul", "--steps", str(steps)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{binary} bench failed ({run.returncode}):\n{run.stderr}")
    return {m["name"]: m["step"]["step_seconds"] * 1e3 for m in json.loads(run.stdout)["models"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="the first tinygpt binary (the baseline)")
    parser.add_argument("b", help="the second tinygpt binary")
    parser.add_argument("--pairs", type=int, default=5, help="A, B runs (default 5)")
    parser.add_argument("--steps", type=int, default=20, help="steps per model per run (default 20)")
    args = parser.parse_args()
    runs = {"a": [], "b": []}
    for pair in range(args.pairs):
        for side in ("a", "b"):
            runs[side].append(step_times(getattr(args, side), args.steps))
        print(f"pair {pair + 1}/{args.pairs}: a {runs['a'][-1]}  b {runs['b'][-1]}", file=sys.stderr)
    print(f"{'model':<18} {'A median (min)':>20} {'B median (min)':>20} {'B / A':>7}")
    for model in runs["a"][0]:
        a = [r[model] for r in runs["a"]]
        b = [r[model] for r in runs["b"]]
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{model:<18} {f'{ma:.1f} ({min(a):.1f})':>20} {f'{mb:.1f} ({min(b):.1f})':>20} {mb / ma:>7.3f}")
    print(f"ms/step over {args.pairs} alternated pairs of {args.steps} steps per model")


if __name__ == "__main__":
    main()
