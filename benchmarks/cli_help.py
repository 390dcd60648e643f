"""Wall time of ``rankscope --help`` and each command's ``--help`` in a fresh process (the target: under 1 s each),
beside the bare interpreter start and ``import torch`` for scale.

    python benchmarks/cli_help.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("", "analyze", "describe", "diff", "train", "study", "report", "sql", "repr", "demo")
RANKSCOPE = str(Path(sys.executable).with_name("rankscope"))


def wall(cmd: list[str], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    python = wall([sys.executable, "-c", "pass"])
    torch = wall([sys.executable, "-c", "import torch"])
    print(f"{'command':<28} {'median s':>9}  (python alone {python:.2f} s, import torch {torch:.2f} s)")
    for c in COMMANDS:
        t = wall([RANKSCOPE, *([c] if c else []), "--help"])
        print(f"{'rankscope ' + (c + ' ' if c else '') + '--help':<28} {t:9.2f}  {'ok' if t < 1 else 'over 1 s'}")


if __name__ == "__main__":
    main()
