"""What a report reads: the runs of a study (``study.json``) or of one run (``config.json``), and their rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rankscope.errors import InputError
from rankscope.rundir import METRICS, RunDir, read_study
from rankscope.store import RunStore
from rankscope.vocab import variant_of


@dataclass
class StudyData:
    root: Path
    meta: dict  # study.json (or a one-run stand-in)
    runs: pd.DataFrame  # name, directory, variant, seed, sweep, params, kv_cache_floats_per_token, steps, finished
    attention: pd.DataFrame  # every run's attention rows (qk, qk_content, qk_rope, ov), with name/variant/seed/sweep
    train: pd.DataFrame  # every run's training scalars

    def spectra(self, run: str, sweep: str, where: str) -> pd.DataFrame:
        """Eigenvalues and null quantiles of one run's forms matching the SQL condition ``where``."""
        record = self.runs.set_index(["sweep", "name"]).loc[(sweep, run)]
        stack = record.get("stack")
        if isinstance(stack, str):  # one stack of a model with several
            where = f"({where}) and coalesce(stack, '') = '{_quoted(stack)}'"
        return RunStore(record["directory"]).sql(f"select * from spectra where {where} order by step")


def _quoted(text: str) -> str:
    """``text`` inside a SQL string literal."""
    return text.replace("'", "''")


def _one_run(root: Path, cfg: dict) -> dict:
    model, train = cfg["model"], cfg["train"]
    if not isinstance(model.get("attention"), str) or not isinstance(train.get("seed"), int) or not isinstance(
            train.get("steps"), int):
        raise InputError(f"{RunDir(root).config_path}: not a rankscope run config (model.attention, train.seed or "
                         f"train.steps missing or of the wrong type)")
    variant = variant_of(model["attention"], model.get("rope_mode"))
    return {"command": None, "runs": [{"name": root.name, "directory": str(root), "variant": variant,
                                       "seed": train["seed"], "sweep": "base", "params": None,
                                       "kv_cache_floats_per_token": None, "config": cfg}]}


def _monitored_run(root: Path) -> dict | None:
    """A run written by ``rs.Monitor``, a training-loop callback or a checkpoint series (rows, no config.json): its
    stand-in record; one record per attention stack (``<run>/<stack>``, variant ``<variant> (<stack>)``) when the
    rows come from a model with several."""
    store = RunStore(root)
    if not (root / METRICS).is_dir() or "attention" not in store.tables():
        return None
    variants = store.sql("select variant, count(*) as n from attention group by variant order by n desc")
    variant = next((v for v in variants["variant"] if isinstance(v, str) and v), "unknown")
    columns = store.sql("select * from attention limit 0").columns
    stacks = sorted(store.sql("select distinct stack from attention")["stack"].fillna("")) if "stack" in columns \
        else [""]
    one = len(stacks) == 1
    return {"command": None, "runs": [{"name": root.name if one else f"{root.name}/{stack}", "directory": str(root),
                                       "variant": variant if one else f"{variant} ({stack or 'main'})", "seed": 0,
                                       "sweep": "base", "params": None, "kv_cache_floats_per_token": None,
                                       "config": None, **({} if one else {"stack": stack})} for stack in stacks]}


def load(root: str | Path) -> StudyData:
    """The runs and rows under ``root``: a study directory, a run of ``rankscope train`` (config.json), or a run
    written by ``rs.Monitor`` / the training-loop callbacks (only its rows)."""
    root = Path(root)
    meta = read_study(root)
    if meta is None:
        config = RunDir(root).read_config(strict=True)  # a config.json that is there but broken is named
        meta = _one_run(root, config) if config is not None else _monitored_run(root)
        if meta is None:
            raise InputError(f"{root}: neither a study (study.json) nor a run (config.json or monitor rows in "
                             f"{METRICS}/)")
    for r in meta["runs"]:
        r.setdefault("config", None)
        section = r["config"].get("train") if isinstance(r["config"], dict) else None
        if r["config"] is not None and not (isinstance(section, dict) and isinstance(section.get("steps"), int)):
            raise InputError(f"{root}: the record of run {r['name']!r} has a config without train.steps")
    runs = pd.DataFrame(meta["runs"])
    runs["steps"] = [r["config"]["train"]["steps"] if r["config"] else
                     int(RunStore(r["directory"]).sql("select max(step) as s from attention")["s"].iloc[0])
                     for r in meta["runs"]]
    runs["finished"] = [RunDir(d).finished() for d in runs["directory"]]
    if len(runs) > 1 and runs["finished"].any():  # a study still training: compare finished runs only
        runs = runs[runs["finished"]].reset_index(drop=True)
    attention, train = [], []
    for run in runs.itertuples():
        store = RunStore(run.directory)
        tables = store.tables()
        tag = {"name": run.name, "variant": run.variant, "seed": run.seed, "sweep": run.sweep}
        stack = getattr(run, "stack", None)  # one stack of a model with several (a monitored run's record)
        where = f" where coalesce(stack, '') = '{_quoted(stack)}'" if isinstance(stack, str) else ""
        if "attention" in tables:
            attention.append(store.sql(f"select * exclude (run) from attention{where}").assign(**tag))
        if "train" in tables:
            train.append(store.sql("select * exclude (run) from train order by step").assign(**tag))
    if not attention:
        raise InputError(f"{root}: no diagnostics stored yet (train with monitor_every > 0)")
    return StudyData(root, meta, runs, _current(pd.concat(attention, ignore_index=True)),
                     pd.concat(train, ignore_index=True) if train else pd.DataFrame())


def _current(attention: pd.DataFrame) -> pd.DataFrame:
    """Attention rows in today's columns: parts of earlier versions have no offset (they were read at Δ = 0)
    and lack the newer statistics (NaN)."""
    offset = attention["offset"].fillna(0).astype(int) if "offset" in attention else 0
    attention = attention.assign(offset=offset)
    for col in ("top_energy_vs_null", "bulk_effective_rank"):
        if col not in attention:
            attention[col] = float("nan")
    return attention
