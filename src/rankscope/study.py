"""``rankscope study``: the six-variant comparison of Jha & Reagen (arXiv 2507.09394), resumable.

Variants (``vocab.STUDY_VARIANTS``): ``mha``, ``gqa``, ``mla_prerope_input`` and ``mla_prerope_coupled`` (the
two readings of "RoPE before compression", docs/design.md §4), ``mha_decoupled`` (MHA with DeepSeek's shared
rope key, no latent) and ``mla_decoupled``; together they separate latent compression, how RoPE is applied and
rope-key sharing. Every variant of a sweep point runs with the same seeds, hence the same initial RNG stream
and the same batches (the batch of a step depends only on seed and step), and with parameter budgets matched
by the SwiGLU width (``match_budget``). A sweep axis (``lr=5e-4,2e-3``) repeats the comparison at each value,
with its own seeds (``SEED_STRIDE``) and its label in each run's config (``sweep``), store rows and run name.
Re-running skips finished runs and resumes interrupted ones.

Layout: ``OUT/study.json`` (the plan, the command, parameter counts; run directories relative to OUT, so a copied
study reads its copies), ``OUT/<sweep>/<variant>-s<seed>/``
(one run each; ``<sweep>`` is ``lr=0.002`` or ``base``), ``OUT/report.html``.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rankscope.errors import InputError
from rankscope.nn import ModelConfig
from rankscope.nn.config import parameter_count_formula
from rankscope.rundir import RunDir, write_study
from rankscope.train.config import RunConfig, resolve
from rankscope.vocab import MHA, STUDY_VARIANTS

# Sweep point i uses seeds 1000·i, 1000·i + 1, …: its runs do not repeat another point's draws. A run directory
# that already holds a config (a study planned by an earlier version, which shared seeds) keeps its saved seed, so
# resuming it never mixes two seeds' batches.
SEED_STRIDE = 1000


@dataclass(frozen=True)
class RunSpec:
    name: str  # "<variant>-s<seed>"
    directory: Path
    variant: str
    seed: int
    sweep: str  # "base" or "key=value"
    config: RunConfig

    def record(self) -> dict:
        m = self.config.model
        return {"name": self.name, "directory": str(self.directory), "variant": self.variant, "seed": self.seed,
                "sweep": self.sweep, "params": parameter_count_formula(m), "d_ff": m.d_ff,
                "kv_cache_floats_per_token": m.kv_cache_floats_per_token(), "config": self.config.to_dict()}


def match_budget(cfg: ModelConfig, target: int) -> ModelConfig:
    """``cfg`` with the SwiGLU width d_ff chosen so the parameter count is closest to ``target``.

    Each unit of d_ff costs 3·d_model parameters per layer; the attention shapes (the object of the study)
    are left as they are.
    """
    per_unit = 3 * cfg.d_model * cfg.n_layer
    base = parameter_count_formula(cfg) - per_unit * cfg.d_ff
    d_ff = max(1, round((target - base) / per_unit))
    return dataclasses.replace(cfg, d_ff=d_ff)


# Settings the study sets per run itself: a sweep over one would be overwritten without a word.
_SET_PER_RUN = ("seed", "sweep")


def parse_sweep(sweep: str | None) -> tuple[str, list[str]] | None:
    """``"lr=5e-4,2e-3"`` → ``("lr", ["5e-4", "2e-3"])``: distinct values, each a directory name (no ``/``), of a
    setting the study does not set per run (the seed, the variant's attention fields)."""
    if not sweep:
        return None
    key, sep, values = sweep.partition("=")
    key = key.strip().replace("-", "_")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key or not items:
        raise InputError(f"--sweep {sweep!r}: expected key=value1,value2,…")
    per_run = {*_SET_PER_RUN, *(k for fields in STUDY_VARIANTS.values() for k in fields)}
    if key in per_run:
        raise InputError(f"--sweep {sweep!r}: the study sets {key} per run itself; sweep another setting (not "
                         f"{sorted(per_run)})")
    if len(set(items)) < len(items):
        raise InputError(f"--sweep {sweep!r}: a value is repeated (each sweep point is one directory)")
    bad = [v for v in items if "/" in v or "\\" in v or v in (".", "..")]
    if bad:
        raise InputError(f"--sweep {sweep!r}: {bad[0]!r} cannot be a directory name (no / or \\)")
    return key, items


def plan(out: Path, preset: str = "cpu", seeds: int = 3, variants: list[str] | None = None,
         overrides: dict | None = None, sweep: str | None = None) -> list[RunSpec]:
    """Every run of the study: variants × seeds (× sweep values), budgets matched to MHA's."""
    variants = list(STUDY_VARIANTS) if not variants else variants
    unknown = [v for v in variants if v not in STUDY_VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {unknown}; choose from {list(STUDY_VARIANTS)}")
    if len(set(variants)) < len(variants):
        raise InputError(f"--variants {','.join(variants)}: a variant is repeated")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds < SEED_STRIDE:
        raise InputError(f"--seeds must be an integer in 1..{SEED_STRIDE - 1} (seeds per variant), got {seeds!r}")
    axis = parse_sweep(sweep)
    points = [("base", {})] if axis is None else [(f"{axis[0]}={v}", {axis[0]: v}) for v in axis[1]]
    specs = []
    for index, (label, point) in enumerate(points):
        common = {**(overrides or {}), **point}
        if axis is not None:
            common["sweep"] = label
        reference = resolve(preset, {**common, "attention": MHA})
        target = parameter_count_formula(reference.model)
        for s in range(seeds):  # seed-major: an interrupted study has whole seeds of every variant
            seed = SEED_STRIDE * index + s  # sweep points get their own seeds (shared by the variants of a point)
            for variant in variants:
                name = f"{variant}-s{s}"
                directory = Path(out) / label / name
                saved = RunDir(directory).read_config()  # a run planned by an earlier version keeps its seed
                run_seed = saved["train"].get("seed", seed) if saved else seed
                cfg = resolve(preset, {**common, **STUDY_VARIANTS[variant], "seed": run_seed})
                if variant != MHA and "d_ff" not in common:
                    cfg = dataclasses.replace(cfg, model=match_budget(cfg.model, target))
                specs.append(RunSpec(name, directory, variant, run_seed, label, cfg))
    return specs


def status(spec: RunSpec) -> str:
    """"done", "partial" (checkpoints, not finished) or "new"."""
    return RunDir(spec.directory).status()


def _run_one(spec: RunSpec, threads: int) -> str:
    from rankscope.train import train

    cfg = spec.config
    if threads:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, threads=threads))
    result = train(cfg, spec.directory, resume=status(spec) == "partial", progress=False)
    if result.interrupted:
        return f"{spec.sweep}/{spec.name}: interrupted at step {result.steps} (checkpointed; re-run to resume)"
    return f"{spec.sweep}/{spec.name}: val {result.val_loss:.3f} in {result.seconds:.0f} s"


def run_study(out: Path, specs: list[RunSpec], *, jobs: int = 1, command: str | None = None,
              log=print) -> dict:
    """Train every unfinished run (``jobs`` processes at a time, 1..the machine's cores) and write ``study.json``."""
    cores = os.cpu_count() or 1
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= cores:
        raise InputError(f"--jobs must be 1..{cores} (runs trained at once; this machine has {cores} cores), "
                         f"got {jobs!r}")
    out = Path(out)
    meta = {"command": command or shlex.join(["rankscope", *sys.argv[1:]]), "started": time.strftime("%F %T"),
            "runs": [s.record() for s in specs]}
    write_study(out, meta)
    todo = [s for s in specs if status(s) != "done"]
    log(f"{len(specs) - len(todo)} of {len(specs)} runs already done; training {len(todo)} "
        f"({jobs} at a time)")
    t0 = time.perf_counter()
    if jobs <= 1:
        for spec in todo:
            log(_run_one(spec, 0))
    else:
        import multiprocessing

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for line in pool.map(_run_one, todo, [1] * len(todo)):
                log(line)
    meta["seconds"] = time.perf_counter() - t0
    meta["finished"] = time.strftime("%F %T")
    write_study(out, meta)
    return meta
