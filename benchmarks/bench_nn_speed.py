"""Forward + backward steps per second of the default GPT for every attention variant, side by side in one run.

Usage: python benchmarks/bench_nn_speed.py [--batch 16] [--seq 128] [--steps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from rankscope.nn import GPT, ModelConfig, describe

VARIANTS = [("mha", {}), ("gqa", {}), ("mqa", {}), ("mla_prerope", {"rope_mode": "input"}),
            ("mla_prerope", {"rope_mode": "coupled"}), ("mla_decoupled", {}),
            ("mla_decoupled", {"q_lora_rank": 64})]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'variant':<34} {'params':>9} {'steps/s':>8} {'vs mha':>7}")
    base = None
    for attention, extra in VARIANTS:
        cfg = ModelConfig(attention=attention, **extra)
        model = GPT(cfg)
        idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
        model(idx, idx)[1].backward()  # warm-up
        t0 = time.perf_counter()
        for _ in range(args.steps):
            model.zero_grad(set_to_none=True)
            model(idx, idx)[1].backward()
        rate = args.steps / (time.perf_counter() - t0)
        base = base or rate
        label = describe(cfg)["variant"] + "".join(f" {k}={v}" for k, v in extra.items() if k != "rope_mode")
        print(f"{label:<34} {describe(cfg)['params']:>9,} {rate:>8.2f} {rate / base:>7.2f}")


if __name__ == "__main__":
    main()
