"""The study end to end at toy scale: plan, budgets, resumable runs, report files, CLI; and the report in
headless Chromium (page loads, no console errors, every figure visible)."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rankscope.cli import app
from rankscope.errors import InputError
from rankscope.nn.config import parameter_count_formula
from rankscope.report.html import write_report
from rankscope.study import plan, run_study, status
from rankscope.vocab import STUDY_VARIANTS as VARIANTS

TOY = dict(vocab_size=300, n_layer=2, d_model=32, n_head=2, kv_lora_rank=16, qk_rope_dim=4, max_seq_len=32,
           max_bytes=300_000, batch_size=4, steps=12, warmup_steps=3, eval_every=6, eval_batches=2, ckpt_every=6,
           monitor_every=4, monitor_early=2, monitor_offsets="0,-2,-8", threads=1, monitor_weights=False)


FIGURES = 8  # loss, layer heatmaps, onsets, offsets, carried, head maps, ESD, layer forms
TOY_OFFSETS = "0,-2,-8"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    specs = plan(out, "smoke", seeds=1, overrides=TOY)
    run_study(out, specs, log=lambda line: None)
    write_report(out)
    return out, specs


def test_plan_matches_budgets_and_shares_seeds():
    specs = plan(Path("/nonexistent"), "cpu", seeds=2)
    assert len(specs) == 2 * len(VARIANTS)
    params = {s.variant: parameter_count_formula(s.config.model) for s in specs}
    mha = params["mha"]
    d, layers = specs[0].config.model.d_model, specs[0].config.model.n_layer
    for variant, p in params.items():  # d_ff absorbs the difference: within 3·d·n_layer/2 of MHA's count
        assert abs(p - mha) <= 3 * d * layers / 2, variant
    assert {s.config.train.seed for s in specs} == {0, 1}
    assert {s.variant for s in specs} == set(VARIANTS) >= {"mha_decoupled", "gqa"}
    cpu = specs[0].config  # the floor for the CPU study: ≥ 8 layers, dense early monitoring
    assert cpu.model.n_layer >= 8 and cpu.train.monitor_early >= 10
    assert {(s.config.model.attention, s.config.model.rope_mode) for s in specs if "prerope" in s.variant} == {
        ("mla_prerope", "input"), ("mla_prerope", "coupled")}
    swept = plan(Path("/x"), "smoke", seeds=1, sweep="lr=5e-4,2e-3", variants=["mha"])
    assert [s.config.train.lr for s in swept] == [5e-4, 2e-3] and swept[0].directory.parent.name == "lr=5e-4"
    # sweep points have their own seeds and carry their label into the config (store column, run name)
    assert [s.config.train.seed for s in swept] == [0, 1000]
    assert [s.config.train.sweep for s in swept] == ["lr=5e-4", "lr=2e-3"]


def test_a_run_planned_by_an_earlier_version_keeps_its_saved_seed(tmp_path):
    """Earlier versions shared seeds across sweep points: resuming such a study must not switch a half-trained
    run to another seed's batches."""
    from rankscope.train.config import resolve

    old = tmp_path / "lr=2e-3" / "mha-s0"
    old.mkdir(parents=True)
    resolve("smoke", {"lr": "2e-3", "seed": 0}).save(old / "config.json")
    swept = plan(tmp_path, "smoke", seeds=1, sweep="lr=5e-4,2e-3", variants=["mha"])
    assert [(s.directory.parent.name, s.config.train.seed) for s in swept] == [("lr=5e-4", 0), ("lr=2e-3", 0)]
    fresh = plan(tmp_path / "new", "smoke", seeds=1, sweep="lr=5e-4,2e-3", variants=["mha"])
    assert [s.config.train.seed for s in fresh] == [0, 1000]
    with pytest.raises(InputError, match="unknown variant"):
        plan(Path("/x"), "smoke", variants=["transformer"])
    with pytest.raises(InputError, match="--sweep"):
        plan(Path("/x"), "smoke", sweep="lr")


def test_study_runs_are_finished_and_skipped_when_rerun(study):
    out, specs = study
    assert all(status(s) == "done" for s in specs)
    lines = []
    run_study(out, specs, log=lines.append)
    assert lines[0].startswith(f"{len(specs)} of {len(specs)} runs already done")


def test_report_embeds_every_figure_and_writes_the_summary(study):
    out, specs = study
    page = (out / "report.html").read_text()
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == FIGURES
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)
    assert "http://" not in page and "https://" not in page  # self-contained
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["points"]) == 1 and len(summary["points"][0]["per_run"]) == len(specs)
    assert {r["name"] for r in summary["runs"]} == {s.name for s in specs}  # each run's resolved config
    assert all(r["config"]["model"]["n_layer"] == 2 for r in summary["runs"])
    assert {"simulated", "spike_free", "known_effect"} <= set(summary["negative_controls"])
    # one seed: no verdict can be reached, and the report says so rather than guessing
    assert all(c["verdict"] == "inconclusive" for p in summary["points"] for c in p["claims"].values())
    assert "Negative controls" in page and "Verdict" in page


def test_report_cli_on_a_run_and_on_bad_input(study, tmp_path):
    _, specs = study
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(specs[0].directory)])
    assert result.exit_code == 0, result.output
    page = (specs[0].directory / "report.html").read_text()  # a single run: its spectra, no claims template
    assert "Verdict" not in page and "Attention spectra through training" in page
    assert "points" not in json.loads((specs[0].directory / "summary.json").read_text())
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "neither a study" in result.output


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    try:  # Debian's package; needs root and the package registry
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, timeout=900, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return shutil.which("chromium")


def _render(browser: str, page: Path) -> tuple[str, str]:
    """The DOM after load, and the browser's log (console messages included)."""
    done = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    return done.stdout, done.stderr


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line and ("Uncaught" in line or "rror" in line)]


def test_report_loads_in_headless_chromium(study, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed and `apt-get install chromium` failed here (no root or no "
                    "package registry): the browser check of the report did not run")
    out, _ = study
    dom, log = _render(browser, out / "report.html")
    assert f'data-figures="{FIGURES}/{FIGURES}"' in dom, log[-2000:]
    assert not _console_errors(log), _console_errors(log)
    # the checks can fail: a page with a script error and a broken image is caught
    bad = tmp_path / "bad.html"
    bad.write_text((out / "report.html").read_text().replace("<h2>Runs</h2>", '<script>undefinedCall();</script>'
                   '<img src="data:image/png;base64,AAAA"><h2>Runs</h2>'))
    dom, log = _render(browser, bad)
    assert f'data-figures="{FIGURES}/{FIGURES + 1}"' in dom
    assert _console_errors(log)


def test_a_run_written_by_the_monitor_alone_gets_a_run_report(tmp_path):
    """rs.Monitor (and the HF/Lightning callbacks built on it) write rows but no config.json: the report still
    renders, as a run report without the claims template."""
    import torch

    import rankscope as rs
    from rankscope.nn import GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, max_seq_len=16))
    mon = rs.Monitor(model, tmp_path / "loop", every=1, kinds=("qk",), tensorboard=False)
    for step in range(3):
        mon.step(step)
    mon.close()
    page = write_report(tmp_path / "loop").read_text()
    assert "Attention spectra through training" in page and "Verdict" not in page
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) >= 3


def test_study_cli_rejects_bad_settings_before_any_work(tmp_path):
    runner = CliRunner()
    for args, message in ((["--set", "monitor_offsets=0,4"], "monitor_offsets"), (["--variants", "mla"], "unknown"),
                          (["--set", "monitor_early=-1"], "monitor_early")):
        result = runner.invoke(app, ["study", "--preset", "smoke", "--out", str(tmp_path / "s"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "s" / "base").exists()  # nothing trained
