"""What a report reads: the runs of a study (``study.json``) or of one run (``config.json``), and their rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rankscope.errors import InputError
from rankscope.store import RunStore

_PRE = {("mla_prerope", "input"): "mla_prerope_input", ("mla_prerope", "coupled"): "mla_prerope_coupled"}


@dataclass
class StudyData:
    root: Path
    meta: dict  # study.json (or a one-run stand-in)
    runs: pd.DataFrame  # name, directory, variant, seed, sweep, params, kv_cache_floats_per_token, steps, finished
    qk: pd.DataFrame  # every run's attention rows, with name/variant/seed/sweep
    train: pd.DataFrame  # every run's training scalars

    def spectra(self, run: str, sweep: str, where: str) -> pd.DataFrame:
        """Eigenvalues and null quantiles of one run's forms matching the SQL condition ``where``."""
        directory = self.runs.set_index(["sweep", "name"]).loc[(sweep, run), "directory"]
        return RunStore(directory).sql(f"select * from spectra where {where} order by step")


def _one_run(root: Path) -> dict:
    cfg = json.loads((root / "config.json").read_text())
    model = cfg["model"]
    variant = _PRE.get((model["attention"], model.get("rope_mode")), model["attention"])
    return {"command": None, "runs": [{"name": root.name, "directory": str(root), "variant": variant,
                                       "seed": cfg["train"]["seed"], "sweep": "base", "params": None,
                                       "kv_cache_floats_per_token": None, "config": cfg}]}


def load(root: str | Path) -> StudyData:
    """The runs and rows under ``root`` (a study directory or a single run directory)."""
    root = Path(root)
    if (root / "study.json").exists():
        meta = json.loads((root / "study.json").read_text())
    elif (root / "config.json").exists():
        meta = _one_run(root)
    else:
        raise InputError(f"{root}: neither a study (study.json) nor a run (config.json)")
    runs = pd.DataFrame(meta["runs"])
    runs["steps"] = [r["config"]["train"]["steps"] for r in meta["runs"]]
    runs["finished"] = [(Path(d) / "checkpoints" / "final").exists() for d in runs["directory"]]
    if len(runs) > 1 and runs["finished"].any():  # a study still training: compare finished runs only
        runs = runs[runs["finished"]].reset_index(drop=True)
    qk, train = [], []
    for run in runs.itertuples():
        store = RunStore(run.directory)
        tables = store.tables()
        tag = {"name": run.name, "variant": run.variant, "seed": run.seed, "sweep": run.sweep}
        if "qk" in tables:
            qk.append(store.sql("select * exclude (run) from qk").assign(**tag))
        if "train" in tables:
            train.append(store.sql("select * exclude (run) from train order by step").assign(**tag))
    if not qk:
        raise InputError(f"{root}: no diagnostics stored yet (train with monitor_every > 0)")
    return StudyData(root, meta, runs, pd.concat(qk, ignore_index=True),
                     pd.concat(train, ignore_index=True) if train else pd.DataFrame())
