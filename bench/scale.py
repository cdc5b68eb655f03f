"""Benchmark: a memory-bounded sensitivity sweep of a GPT-2-small-sized stack (124 M parameters) on one machine.

The model is GPT-2 small's shape with random weights (no download): 12 pre-norm blocks, d=768, 12 heads,
a 3072-wide GELU MLP, vocabulary 50257 with the token embedding tied to the LM head, 1024 positions. Each
size runs in a child process (``analyse`` on the factory, so the sweep holds the model once) under
``--memory``; the parent samples the child's resident memory (process and its children, /proc, every 50 ms)
and the child reports the kernel's peak (VmHWM). The metric is KL against the fp32 logits of seeded random
token ids. Prints a table of how time grows with layers x candidates at three depths; the last line is JSON
with ``params``, ``peak_rss_gb`` and ``budget_gb`` of the largest model.
Run: python bench/scale.py [--budget 3GB] [--samples 4] [--seq 16] [--candidates int8,int4/block32]
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, WIDTH, HEADS, POSITIONS = 50257, 768, 12, 1024
DEPTHS = (2, 6, 12)


class Block(nn.Module):
    """GPT-2 block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); causal scaled-dot-product attention."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.c_attn, self.c_proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.c_fc, self.mlp_proj = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(WIDTH, dim=2)
        q, k, v = (z.view(b, t, HEADS, WIDTH // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, WIDTH)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2Stack(nn.Module):
    """Token ids (N, T) -> logits (N, T, 50257); the LM head reads the token embedding (tied, one layer)."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(POSITIONS, WIDTH)
        self.h = nn.ModuleList(Block() for _ in range(blocks))
        self.ln_f = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _stack(blocks: int) -> GPT2Stack:
    torch.manual_seed(blocks)  # distinct random weights: no two layers identical (Core ML would dedupe them)
    return GPT2Stack(blocks).eval()


def gpt2_2() -> GPT2Stack:
    """2 blocks of GPT-2 small's shape (53 M parameters, mostly the tied embedding)."""
    return _stack(2)


def gpt2_6() -> GPT2Stack:
    """6 blocks of GPT-2 small's shape (82 M parameters)."""
    return _stack(6)


def gpt2_small() -> GPT2Stack:
    """GPT-2 small's shape: 12 blocks, 124 M parameters."""
    return _stack(12)


FACTORIES = {2: "gpt2_2", 6: "gpt2_6", 12: "gpt2_small"}


def _rss_tree(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


def child(blocks: int, args: argparse.Namespace) -> dict:
    """One sweep in this process; its figures as a dict."""
    from coreml_opt.sensitivity import analyse
    from coreml_opt.sensitivity.memory import peak_rss_bytes

    ids = torch.randint(0, VOCAB, (args.samples, args.seq), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    result = analyse(f"{Path(__file__).resolve()}:{FACTORIES[blocks]}", [f"ids:1,{args.seq}:int32"], ids,
                     metric="kl", candidates=args.candidates, progress=False, memory=args.budget,
                     batch_size=args.batch_size)
    wall = time.perf_counter() - t0
    params = sum(p.numel() for p in _stack(blocks).parameters())
    trial_s = result.timing["compression"] + result.timing["evaluation"]
    return {"blocks": blocks, "params": params, "layers": len(result.layers),
            "candidates": len(result.candidates), "trials": len(result.trials), "sweep_s": round(wall, 1),
            "trial_s": round(trial_s, 1), "cache_s": round(result.timing["activation_cache"], 1),
            "compression_s": round(result.timing["compression"], 1),
            "evaluation_s": round(result.timing["evaluation"], 1),
            "baseline_s": round(result.timing["baseline"], 1), "hwm_gb": peak_rss_bytes() / 2**30}


def run_child(blocks: int, args: argparse.Namespace) -> dict:
    """Run ``child`` in a fresh process, sampling its resident memory (and its children's) every 50 ms."""
    cmd = [sys.executable, __file__, "--child", str(blocks), "--budget", args.budget, "--samples", str(args.samples),
           "--seq", str(args.seq), "--candidates", args.candidates, "--batch-size", str(args.batch_size)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _rss_tree(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"error: the {blocks}-block sweep failed (exit {proc.returncode})")
    row = json.loads(out.strip().splitlines()[-1])
    row["sampled_gb"] = peak[0] / 2**30
    row["peak_rss_gb"] = max(row["sampled_gb"], row["hwm_gb"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="3GB", help="the sweeps' --memory (default 3GB)")
    p.add_argument("--samples", type=int, default=4, help="token sequences evaluated per trial (default 4)")
    p.add_argument("--seq", type=int, default=16, help="tokens per sequence (default 16)")
    p.add_argument("--candidates", default="int8,int4/block32", help="specs per layer (default int8,int4/block32)")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size (default 8)")
    p.add_argument("--depths", default=",".join(map(str, DEPTHS)), help="block counts to sweep (default 2,6,12)")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args)))
        return
    from coreml_opt.report.tables import format_table
    from coreml_opt.sensitivity.memory import parse_memory

    budget_gb = parse_memory(args.budget) / 2**30
    rows = [run_child(int(d), args) for d in args.depths.split(",")]
    print(f"GPT-2-small-shaped stacks (random init), {args.samples} x {args.seq} token ids, KL vs fp32, "
          f"candidates {args.candidates}, --memory {args.budget}")
    print(format_table(
        ["blocks", "params (M)", "layers", "cands", "trials", "sweep s", "trials s", "simulate s", "evaluate s",
         "s/trial", "trials/min", "cache s", "peak RSS GiB"],
        [[r["blocks"], f"{r['params'] / 1e6:.1f}", r["layers"], r["candidates"], r["trials"], r["sweep_s"],
          r["trial_s"], r["compression_s"], r["evaluation_s"], f"{r['trial_s'] / max(r['trials'], 1):.2f}",
          f"{60 * r['trials'] / max(r['sweep_s'], 1e-9):.1f}", r["cache_s"], f"{r['peak_rss_gb']:.2f}"]
         for r in rows]))
    big = rows[-1]
    print(json.dumps({"model": f"GPT-2-small-shaped stack, {big['blocks']} blocks, random init",
                      "params": big["params"], "peak_rss_gb": round(big["peak_rss_gb"], 3),
                      "sampled_peak_rss_gb": round(big["sampled_gb"], 3), "budget_gb": round(budget_gb, 3),
                      "under_budget": big["peak_rss_gb"] <= budget_gb, "trials": big["trials"],
                      "trials_per_min": round(60 * big["trials"] / big["sweep_s"], 1), "sweep_s": big["sweep_s"]}))


if __name__ == "__main__":
    main()
