"""`rankscope repr`: prints the metrics the inputs allow, with values equal to the library's; bad input exits 2."""

import numpy as np
import pytest
from typer.testing import CliRunner

from rankscope import representations as rr
from rankscope.cli import app

runner = CliRunner()


@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(120) % 4
    H = 3 * rng.standard_normal((4, 6))[y] + rng.standard_normal((120, 6))
    W = rng.standard_normal((4, 6))
    paths = {k: tmp_path / f"{k}.npy" for k in ("H", "y", "W", "L", "bad")}
    np.save(paths["H"], H), np.save(paths["y"], y), np.save(paths["W"], W), np.save(paths["L"], H @ W.T)
    np.save(paths["bad"], y[:-1])
    return H, y, W, paths


def test_repr_prints_every_metric_the_inputs_allow(arrays):
    H, y, _, p = arrays
    out = runner.invoke(app, ["repr", str(p["H"])], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "RankMe" in out.output and "TwoNN" in out.output and "NC1" not in out.output
    out = runner.invoke(app, ["repr", str(p["H"]), "--labels", str(p["y"]), "--weights", str(p["W"]),
                              "--logits", str(p["L"])], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    for name in ("NC1", "VCI", "CDNV", "NC2 ETF distance", "NC3", "UNC3", "NC4"):
        assert name in out.output
    assert f"{rr.nc1(H, y):.5g}" in out.output and f"{rr.vci(H, y):.5g}" in out.output


def test_repr_bad_input_exits_2_with_one_clear_line(arrays, tmp_path):
    *_, p = arrays
    out = runner.invoke(app, ["repr", str(p["H"]), "--labels", str(p["bad"])], env={"COLUMNS": "300"})
    assert out.exit_code == 2
    assert "y: has 119 labels but the features have 120 rows" in out.output
    out = runner.invoke(app, ["repr", str(tmp_path / "missing.npy")], env={"COLUMNS": "300"})
    assert out.exit_code == 2 and "cannot be read as a .npy array" in out.output
