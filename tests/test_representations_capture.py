"""capture(): hooked activations equal a manual forward pass; sequence and tuple outputs; the sample cap."""

import numpy as np
import pytest
import torch
from torch import nn

import rankscope as rs
from rankscope.errors import InputError


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 3)

    def forward(self, x, scale=1.0):
        return self.proj(x) * scale, "extra"


def test_capture_equals_a_manual_forward_pass_and_flattens_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), TupleOut())
    x = torch.randn(4, 6, 5)  # (B, T, d): tokens are flattened to rows
    out = rs.capture(model, layers=["1", "2"], inputs=[x[:2], x[2:]], max_samples=None)
    assert out["1"].shape == (24, 5) and out["2"].shape == (24, 3) and out["1"].dtype == torch.float64
    with torch.no_grad():
        h = torch.relu(model[0](x))
        torch.testing.assert_close(out["1"], h.reshape(-1, 5).double())
        torch.testing.assert_close(out["2"], model[2].proj(h).reshape(-1, 3).double())


def test_dict_batches_are_passed_as_kwargs():
    model = TupleOut()
    x = torch.randn(3, 5)
    out = rs.capture(model, ["proj", ""], [{"x": x, "scale": 2.0}])
    with torch.no_grad():
        torch.testing.assert_close(out[""], (model.proj(x) * 2).double())


def test_cap_keeps_first_rows_or_a_uniform_reservoir():
    model = nn.Identity()
    x = torch.arange(100, dtype=torch.float64)[:, None]
    first = rs.capture(model, [""], x.split(7), max_samples=10)[""]
    assert first[:, 0].tolist() == list(range(10))
    hits = np.zeros(100)
    for seed in range(400):
        kept = rs.capture(model, [""], x.split(7), max_samples=10, sample="reservoir", seed=seed)[""]
        assert kept.shape == (10, 1) and len(set(kept[:, 0].tolist())) == 10
        hits[kept[:, 0].long().numpy()] += 1
    # each row is kept with probability 10/100: 40 of 400 draws, binomial SE √(400·0.1·0.9) = 6
    assert np.abs(hits - 40).max() < 4.5 * 6 and abs(hits[:10].mean() - hits[90:].mean()) < 12


def test_unknown_layer_is_bad_input():
    with pytest.raises(InputError, match="layers: no module named 'nope'"):
        rs.capture(nn.Linear(2, 2), ["nope"], [torch.zeros(1, 2)])
