"""Reading checkpoints tensor by tensor: no page of a file stays mapped once its tensor is read, and DeepSeek-V3's
block-quantized FP8 weights come out dequantized (checked against safetensors' own reader and an independent
block expansion)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rankscope.errors import CheckpointError
from rankscope.probes.load import open_checkpoint


def _mapped_kib(path: Path) -> int:
    """Resident KiB of every mapping of ``path`` in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: range perms offset dev inode
            inside = len(fields) >= 6 and fields[-1] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_tensors_are_read_without_keeping_the_file_mapped(tmp_path):
    """Reading every tensor of a 32 MB file leaves (almost) none of it resident as mapped pages, and each tensor
    equals what safetensors' own reader gives."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(1024, 1024, generator=g).to(torch.bfloat16) for i in range(16)}
    tensors["scalar_count"] = torch.arange(7, dtype=torch.int64)
    tensors["empty"] = torch.zeros(0, 3)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    ckpt = open_checkpoint(path)
    held = {name: ckpt.tensor(name) for name in ckpt.names}
    file_kib = path.stat().st_size // 1024
    assert file_kib > 30_000
    assert _mapped_kib(path) < file_kib / 100  # at most the header's pages: the data were read, not mapped
    reference = load_file(str(path))  # safetensors' own reader (it maps the file: measured above, before it)
    assert set(held) == set(reference)
    for name, t in held.items():
        assert t.dtype == reference[name].dtype and t.shape == reference[name].shape, name
        assert torch.equal(t, reference[name]), name

def _fp8_checkpoint(tmp_path: Path, shape=(300, 260), block=(128, 128), bad_scale=False):
    g = torch.Generator().manual_seed(1)
    w8 = (torch.randn(*shape, generator=g) * 20).to(torch.float8_e4m3fn)
    grid = (-(-shape[0] // block[0]) + (1 if bad_scale else 0), -(-shape[1] // block[1]))
    scale = torch.rand(*grid, generator=g) * 0.01 + 1e-3
    d = tmp_path / "v3"
    d.mkdir()
    save_file({"model.layers.0.mlp.down_proj.weight": w8, "model.layers.0.mlp.down_proj.weight_scale_inv": scale,
               "model.layers.0.input_layernorm.weight": torch.ones(shape[1])}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v3",
                                               "quantization_config": {"weight_block_size": list(block)}}))
    return d, w8, scale


def test_fp8_weights_are_read_dequantized(tmp_path):
    """W = W₈ · s per block (an independent expansion of the scale grid), float32 to 2⁻²⁴; the scales are not
    listed as weights of their own."""
    d, w8, scale = _fp8_checkpoint(tmp_path, block=(128, 64))
    ckpt = open_checkpoint(d)
    name = "model.layers.0.mlp.down_proj.weight"
    assert name + "_scale_inv" not in ckpt.names and name in ckpt.names
    assert ckpt.dtype(name) == torch.float32
    got = ckpt.tensor(name)
    full = scale.double().repeat_interleave(128, 0)[:300].repeat_interleave(64, 1)[:, :260]
    expected = w8.double() * full
    assert got.dtype == torch.float32 and got.shape == (300, 260)
    assert torch.allclose(got.double(), expected, rtol=2.0**-24, atol=0)
    assert torch.equal(ckpt.tensor("model.layers.0.input_layernorm.weight"), torch.ones(260))


def test_fp8_scale_of_the_wrong_shape_is_named(tmp_path):
    d, _, _ = _fp8_checkpoint(tmp_path, bad_scale=True)
    ckpt = open_checkpoint(d)
    with pytest.raises(CheckpointError, match=r"down_proj\.weight'.*weight_scale_inv has shape \(4, 3\), "
                                              r"expected \(3, 3\)"):
        ckpt.tensor("model.layers.0.mlp.down_proj.weight")
