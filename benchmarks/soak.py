"""Soak: kill -9 a real training run (``rankscope train``) again and again, resume it each time, and count what
the run store lost or holds twice.

1. A reference run, never interrupted, gives the keys every table should hold (run, step, layer, head_index,
   kind, null, offset, … as each table has them; the ``run`` tag aside) and the run's wall time.
2. ``--kills N`` times: start the run (``--resume`` from the second start on), wait a random instant in
   [0, 0.8 × the reference time] and ``kill -9`` it (a run that finished first is started afresh); after each
   kill, count the parts no commit names (a kill that landed inside a flush). The run flushes every step.
3. ``--per-table``: for each table, a fresh run is killed the moment its second part of that table appears
   (its writer pauses 2 s there, so the kill lands inside that flush, after an earlier commit).
4. Each run is resumed to the end; then its keys are compared with the reference: rows lost (keys missing),
   rows not in the reference, keys held twice, and ``rankscope store check`` problems other than the dead
   flushes' parts.

Run:  .venv/bin/python benchmarks/soak.py [--kills 20] [--per-table] [--seed 0] [--steps 24]
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLOW_PART = """
import sys, time
import rankscope.store.parts as P
real, slow_table, nth, seen = P.write_part, sys.argv.pop(1), int(sys.argv.pop(1)), []
def slow(directory, table, arrow):  # a window after the nth part of one table: the kill lands inside its flush
    out = real(directory, table, arrow)
    seen.append(table)
    if table == slow_table and seen.count(table) == nth:
        time.sleep(2.0)
    return out
P.write_part = slow
from rankscope.cli import run
sys.argv = ["rankscope", *sys.argv[1:]]
run()
"""


def settings(steps: int, corpus: Path) -> list[str]:
    values = dict(vocab_size=300, n_layer=2, d_model=32, n_head=2, kv_lora_rank=16, qk_rope_dim=4, max_seq_len=32,
                  max_bytes=300_000, batch_size=4, steps=steps, warmup_steps=2, eval_every=6, eval_batches=1,
                  ckpt_every=1, monitor_every=2, repr_every=3, threads=1, data=str(corpus))  # a flush every step
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


def command(run: Path, args: list[str], resume: bool, slow: tuple[str, int] | None = None) -> list[str]:
    head = ([sys.executable, "-c", SLOW_PART, slow[0], str(slow[1])] if slow else
            [sys.executable, "-m", "rankscope.cli"])
    return [*head, "train", "--preset", "smoke", "--attention", "mha", "--run", str(run), *args,
            *(["--resume"] if resume else [])]


def keys(run: Path) -> dict[str, list[tuple]]:
    """Table → its rows' keys (the ``run`` tag left out, so two runs compare)."""
    import warnings

    from rankscope.store import RunStore
    from rankscope.store.check import KEY

    store = RunStore(run)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for table in ("attention", "weights", "spectra", "repr", "train"):
            if table not in store.tables():
                out[table] = []
                continue
            columns = [c for c in store.sql(f"select * from {table} limit 0").columns if c in KEY and c != "run"]
            frame = store.sql(f"select {', '.join(chr(34) + c + chr(34) for c in columns)} from {table}")
            out[table] = [tuple(r) for r in frame.astype(str).itertuples(index=False)]
    return out


def uncommitted(run: Path) -> int:
    from rankscope.store import parts as P

    metrics = run / "metrics"
    return len(P.scan(metrics).uncommitted()) if metrics.is_dir() else 0


def kill_at_random(run: Path, args: list[str], resume: bool, horizon: float, rng: random.Random) -> str:
    proc = subprocess.Popen(command(run, args, resume), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait = rng.uniform(0, horizon)
    try:
        proc.wait(timeout=wait)
        code = proc.returncode
        return "finished" if code == 0 else f"failed ({code}): {proc.stderr.read().decode()[-300:]}"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return f"killed at {wait:.2f} s"


def kill_when_part(run: Path, args: list[str], table: str, nth: int = 2) -> str:
    """A fresh run killed the moment its ``nth`` part of ``table`` appears (its writer pauses there)."""
    metrics = run / "metrics"
    proc = subprocess.Popen(command(run, args, False, slow=(table, nth)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_dir() and len(list(metrics.glob(f"{table}-*.parquet"))) >= nth:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"killed at {table} part {nth}"
        time.sleep(0.002)
    return "finished before the part" if proc.returncode == 0 else f"failed ({proc.returncode})"


def verify(run: Path, expected: dict[str, list[tuple]]) -> tuple[int, int, int, dict]:
    """(rows lost, rows not in the reference, keys held twice, store check problems by kind) of a finished run."""
    from collections import Counter

    from rankscope.store.check import check

    got = keys(run)
    lost = sum(len(set(expected[t]) - set(got[t])) for t in expected)
    extra = sum(len(set(got[t]) - set(expected[t])) for t in expected)
    twice = sum(n - 1 for t in got for n in Counter(got[t]).values() if n > 1)
    return lost, extra, twice, dict(Counter(p.kind for p in check(run)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--per-table", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    opts = parser.parse_args()
    rng = random.Random(opts.seed)
    work = Path(tempfile.mkdtemp(prefix="rankscope-soak-"))
    corpus = work / "corpus.txt"
    import rankscope

    text = "\n".join(p.read_text() for p in sorted(Path(rankscope.__file__).parent.rglob("*.py")))
    corpus.write_text(text[:300_000])
    args = settings(opts.steps, corpus)

    t0 = time.perf_counter()
    subprocess.run(command(work / "reference", args, False), check=True, capture_output=True)
    reference = time.perf_counter() - t0
    horizon = 0.8 * reference  # a resumed run has less left to do: most kills still land in a running process
    expected = keys(work / "reference")
    print(f"reference run: {reference:.1f} s, rows " + ", ".join(f"{t} {len(k)}" for t, k in expected.items()))

    kills, inside, failures, checked = 0, 0, [], []

    def finish(run: Path) -> None:  # resume to the end, then compare with the reference
        done = subprocess.run(command(run, args, True), capture_output=True)
        if done.returncode != 0:
            failures.append(f"{run.name}: the resume failed ({done.returncode}): {done.stderr.decode()[-300:]}")
        checked.append(verify(run, expected))

    run, fresh = work / "random-0", 0
    for i in range(opts.kills):
        before = uncommitted(run)
        outcome = kill_at_random(run, args, run.exists(), horizon, rng)
        dead = uncommitted(run) - before
        if outcome.startswith("killed"):
            kills, inside = kills + 1, inside + (dead > 0)
        elif outcome.startswith("failed"):
            failures.append(outcome)
        print(f"{i + 1:3d}. {run.name}: {outcome}; {dead} new uncommitted parts")
        if outcome == "finished":  # check it, then start a fresh run so later kills land in a running one
            checked.append(verify(run, expected))
            fresh += 1
            run = work / f"random-{fresh}"
    if run.exists():
        finish(run)
    for table in ("attention", "weights", "spectra", "train", "repr") if opts.per_table else ():
        run = work / f"at-{table}"
        outcome = kill_when_part(run, args, table)
        dead = uncommitted(run)
        if outcome.startswith("killed"):
            kills, inside = kills + 1, inside + (dead > 0)
        else:
            failures.append(f"{run.name}: {outcome}")
        print(f"  {run.name}: {outcome}; {dead} uncommitted parts")
        finish(run)

    lost, extra, twice = (sum(c[i] for c in checked) for i in range(3))
    problems: dict[str, int] = {}
    for c in checked:
        for kind, n in c[3].items():
            problems[kind] = problems.get(kind, 0) + n
    print(f"runs checked: {len(checked)}; kills: {kills} ({inside} inside a flush); resumes that failed: "
          f"{len(failures)}")
    print(f"rows lost: {lost}, rows not in the reference: {extra}, keys held twice: {twice}")
    print(f"store check: {problems or 'clean'} (uncommitted parts are the dead flushes', which readers ignore)")
    for line in failures:
        print("  ", line)
    if not opts.keep:
        shutil.rmtree(work)
    else:
        print(f"kept {work}")
    return 1 if lost or extra or twice or failures or set(problems) - {"uncommitted", "temporary"} else 0


if __name__ == "__main__":
    sys.exit(main())
