"""Read model weights from disk safely and lazily: safetensors, Hugging Face model dirs, weights-only torch files.

Accepted inputs to :func:`open_checkpoint`:

- a Hugging Face model directory: ``model.safetensors.index.json``, ``model.safetensors``,
  ``pytorch_model.bin.index.json`` or ``pytorch_model.bin`` (first found wins, so safetensors is preferred),
  else the directory's only ``*.safetensors`` file; ``config.json`` is parsed when present;
- a single ``.safetensors`` file;
- a sharded index ``*.index.json`` (``{"weight_map": {tensor name: shard file}}``), shards beside it, read in
  file-name order;
- a ``.pt`` / ``.pth`` / ``.bin`` state dict: a dict of tensors, or a dict whose ``"state_dict"`` or ``"model"``
  entry is one; always read with ``torch.load(weights_only=True)`` (memory-mapped when the file is in the zip
  format), so pickled code is refused, never executed;
- a llama.cpp ``.gguf`` file (``probes.gguf``): tensors dequantised to float32 one at a time, LLaMA-family
  names, shapes and q/k row order mapped to Hugging Face's, the config built from the GGUF metadata;
- a hub id ``org/name`` (or a bare ``name`` such as ``gpt2``) that is not a local path: the snapshot in the local
  Hugging Face cache (``huggingface_hub.snapshot_download(local_files_only=True)``, so it works offline), else
  downloaded (``*.json`` and ``*.safetensors`` only) unless ``HF_HUB_OFFLINE`` is set.

Laziness and memory. Safetensors headers are read and checked at open (the file must be as long as the
header says, so truncation is reported at open, not mid-analysis); each shard keeps one ``safe_open``
handle (for the dtypes torch cannot take from a buffer), and :meth:`Checkpoint.tensor` reads one tensor at a time
into a buffer of its own (``pread``, no memory map), so resident memory follows the tensors the caller holds: a
tensor's pages are gone once the caller drops it, and peak memory follows the largest layer, not the file.
Block-quantized FP8 weights (DeepSeek-V3's ``weight`` in float8 with a ``weight_scale_inv`` of one inverse scale
per 128×128 block, ``quantization_config.weight_block_size``) are read dequantized, as float32, and their scale
tensors are not listed as weights of their own. Torch files are unpickled at open (to
validate them and learn names, shapes and dtypes); zip-format files are memory-mapped and kept, legacy
(non-zip) files are read into memory, and of those only the most recently used shard is kept.

Bounds. A safetensors header is refused at open, from its length and a count of its entries before it is
parsed, when it is longer than ``MAX_HEADER_BYTES`` (100 MB, safetensors' own limit) or declares more than
``MAX_TENSORS`` tensors (200,000: DeepSeek-V3 has about 92,000 names in all its shards together and Kimi K2
about 140,000, while one shard holds a few thousand), or more than ``KEYS_PER_TENSOR`` times as many JSON keys
(entries without tensors, e.g. in ``__metadata__``); a sharded index may name no more than ``MAX_TENSORS``
either. JSON nested too deep to parse (headers, indexes, config.json) is refused, not a ``RecursionError``. An
index's shards must lie in the index's directory: a shard path is relative, with no ``..`` leaving it (checked on
the path as written, so the symlinks of a Hugging Face cache snapshot, which point into its blob store, are
followed as usual). A torch file's tensors must be dense and hold data (no sparse or meta tensors). A
config.json's head counts and widths (``CONFIG_DIMS``), where present, are positive integers.

Every failure raises :class:`~rankscope.errors.CheckpointError` with one line naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from rankscope.errors import CheckpointError, one_line

# Looked for in a model directory, in this order (safetensors first).
DIR_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_FILE_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors", ".json", ".gguf")  # a missing file of these is not a hub id
ACCEPTED = (
    "a Hugging Face model directory, .safetensors, a sharded .index.json, "
    ".pt / .pth / .bin state dict, a .gguf file, or a hub id org/name"
)
# Safetensors header dtype strings → torch dtypes (those this torch build has).
_ST_DTYPES = {
    key: getattr(torch, name)
    for key, name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
        "C64": "complex64",
    }.items()
    if hasattr(torch, name)
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # safetensors itself refuses larger headers
MAX_TENSORS = 200_000  # tensors in one file or index (see the module docstring for real models' counts)
READ_CHUNK = 2**30  # bytes per pread call (one call may read at most about 2 GiB)
KEYS_PER_TENSOR = 8  # JSON keys a header may hold per tensor allowed: 4 per tensor entry, room for metadata
# config.json fields that are head counts or widths: a 0 (or -1, or 2.5) would divide by zero in a layout
CONFIG_DIMS = ("hidden_size", "n_embd", "n_embed", "d_model", "num_attention_heads", "n_head", "num_heads",
               "num_key_value_heads", "num_kv_heads", "head_dim", "d_kv", "kv_lora_rank", "qk_nope_head_dim",
               "v_head_dim")
_HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")  # org/name, or a bare name (gpt2)


# --------------------------------------------------------------------------------------------- safetensors


class _SafetensorsFile:
    """One safetensors file: header checked at open, one ``safe_open`` handle kept for reads."""

    def __init__(self, path: Path):
        self.path = path
        self.header = _read_safetensors_header(path)  # name → {"dtype", "shape", "data_offsets"}, file order
        try:
            self.handle = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({one_line(e)})") from None
        with path.open("rb") as f:
            self.data_start = 8 + struct.unpack("<Q", f.read(8))[0]  # the data follow the header

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        key = self.header[name]["dtype"]
        return _ST_DTYPES[key] if key in _ST_DTYPES else self.tensor(name).dtype

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor in a buffer of its own, read with ``pread``: no page of the file stays mapped into the
        process, so resident memory follows the tensors held, not the file read so far."""
        entry = self.header[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        begin, end = (int(v) for v in entry["data_offsets"])
        if dtype is None or end == begin or sys.byteorder != "little":  # safetensors' own reader for the rest
            return self._via_safe_open(name)
        buf = bytearray(end - begin)
        view, done = memoryview(buf), 0
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while done < len(buf):
                    got = os.preadv(fd, [view[done:done + READ_CHUNK]], self.data_start + begin + done)
                    if got == 0:
                        raise OSError(f"the file ends {len(buf) - done} bytes short of the tensor's end")
                    done += got
            finally:
                os.close(fd)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({one_line(e)})") from None
        return torch.frombuffer(buf, dtype=dtype).reshape([int(v) for v in entry["shape"]])

    def _via_safe_open(self, name: str) -> torch.Tensor:
        try:
            return self.handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{name}' ({one_line(e)})") from None


def _json(text: bytes | str, bad) -> Any:
    """Parsed JSON, or ``bad(problem)`` raised: invalid, or nested too deep for the parser."""
    try:
        return json.loads(text)
    except RecursionError:
        raise bad("JSON nested too deep to parse") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"header is not valid JSON: {one_line(e)}") from None


def _read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Parse and check a safetensors header (u64 little-endian length, then JSON); tensors in data order."""

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt or truncated safetensors file ({problem})")

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: refused: the safetensors header is {n:,} bytes long, more than the "
                                  f"{MAX_HEADER_BYTES:,} a header may have")
        if n > size - 8:
            raise bad(f"header length says {n} bytes, the file has {size - 8} after it")
        raw = f.read(n)
    if not raw.lstrip()[:1] == b"{":
        raise bad("header is not a JSON object")
    declared = raw.count(b'"data_offsets"')  # every entry has one: counted before anything is parsed
    if declared > MAX_TENSORS:
        raise CheckpointError(f"{path}: refused: the safetensors header declares {declared:,} tensors, more than the "
                              f"{MAX_TENSORS:,} a file may hold")
    keys = raw.count(b":")  # every JSON key has one: a tensor entry 4, a metadata entry 1 (more only inside strings)
    if keys > KEYS_PER_TENSOR * MAX_TENSORS:
        raise CheckpointError(f"{path}: refused: the safetensors header has {keys:,} keys or more, more than the "
                              f"{KEYS_PER_TENSOR * MAX_TENSORS:,} ({KEYS_PER_TENSOR} per tensor) a file may hold")
    header = _json(raw, bad)
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size, end_max = size - 8 - n, 0
    for name, entry in header.items():
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = [int(v) for v in entry["shape"]]
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"header entry '{name}' lacks dtype, shape or data_offsets") from None
        if not 0 <= begin <= end or any(v < 0 for v in shape):
            raise bad(f"header entry '{name}' has invalid offsets or shape")
        item = _ST_DTYPES[dtype].itemsize if dtype in _ST_DTYPES else None
        if item is not None and math.prod(shape) * item != end - begin:
            raise bad(f"tensor '{name}' {dtype}{shape} needs {math.prod(shape) * item} bytes, not {end - begin}")
        end_max = max(end_max, end)
    if end_max > data_size:
        raise bad(f"data is {data_size} bytes, the header needs {end_max}")
    return dict(sorted(header.items(), key=lambda kv: (int(kv[1]["data_offsets"][0]), kv[0])))


# --------------------------------------------------------------------------------------------- torch files


class _TorchFile:
    """One weights-only torch state dict; names/shapes/dtypes learnt at open, the dict kept if memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        state = self._load()
        self.meta = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        self.mmapped = zipfile.is_zipfile(path)
        self.state: dict[str, torch.Tensor] | None = state

    def names(self) -> list[str]:
        return list(self.meta)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self.meta[name][1]

    def tensor(self, name: str) -> torch.Tensor:
        if self.state is None:
            self.state = self._load()
        return self.state[name]

    def release(self) -> None:
        """Drop an in-memory (non-mmapped) state dict; it is re-read on the next access."""
        if not self.mmapped:
            self.state = None

    def _load(self) -> dict[str, torch.Tensor]:
        path = self.path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": not the user's concern here
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as e:
            text = str(e)
            found = re.search(r"GLOBAL ([\w.]+)", text)
            if found:
                raise CheckpointError(
                    f"{path}: refused: the file contains pickled code, which rankscope never executes "
                    f"(it imports {found.group(1)}; torch.load(weights_only=True) blocked it)"
                ) from None
            reason = re.search(r"(Unsupported operand \d+|Unsupported [^.\n]*)", text)
            raise CheckpointError(
                f"{path}: corrupt or not a torch file (the weights-only unpickler stopped at: "
                f"{reason.group(1) if reason else one_line(e)})"
            ) from None
        except Exception as e:  # corrupt zip, EOF, bad magic number, …: all one message
            problem = f"{type(e).__name__}: {one_line(e)}"
            raise CheckpointError(f"{path}: corrupt or truncated torch file ({problem})") from None
        return _state_dict(path, obj)


def _state_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a loaded torch object: a dict of tensors, or its "state_dict" / "model" entry."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict (holds a {type(obj).__name__}, expected a dict of tensors)")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: not a state dict (entry {key!r} is a {type(value).__name__}; expected a dict of tensors, "
                "or a dict with a 'state_dict' or 'model' entry holding one)"
            )
        if value.layout != torch.strided:
            raise CheckpointError(f"{path}: tensor '{key}' is a {value.layout} tensor; rankscope reads dense weights "
                                  "(save it with .to_dense())")
        if value.is_meta:
            raise CheckpointError(f"{path}: tensor '{key}' is a meta tensor: it has a shape {tuple(value.shape)} but "
                                  "no values in the file")
    return dict(obj)


# --------------------------------------------------------------------------------------------- checkpoint


_Source = _SafetensorsFile | _TorchFile


@dataclass
class Checkpoint:
    """Weights on disk: tensor names in file/shard order, shapes and dtypes without loading, tensors one by one."""

    path: Path
    config: dict | None
    names: list[str]
    _where: dict[str, _Source] = field(repr=False, compare=False, default_factory=dict)
    _held: _TorchFile | None = field(default=None, repr=False, compare=False)  # the in-memory torch shard
    _fp8: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # FP8 weight → its scale's name

    def _source(self, name: str) -> _Source:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, read from the header / state dict, without loading its data."""
        return self._source(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's stored dtype (float32 for a block-quantized FP8 weight, which is read dequantized)."""
        return torch.float32 if name in self._fp8 else self._source(name).dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor on CPU in its stored dtype (never cast; a block-quantized FP8 weight dequantized to float32,
        ``dequantize_fp8``); torch-file tensors may share the mmapped storage."""
        if name in self._fp8:
            return dequantize_fp8(self._read(name), self._read(self._fp8[name]), fp8_block(self.config),
                                  f"{self.path}: '{name}'")
        return self._read(name)

    def _read(self, name: str) -> torch.Tensor:
        src = self._source(name)
        if isinstance(src, _TorchFile) and src is not self._held:
            if self._held is not None:
                self._held.release()  # keep at most one in-memory (non-mmapped) torch shard
            self._held = src
        return src.tensor(name)

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in the order asked."""
        return {name: self.tensor(name) for name in names}


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A lazily read Checkpoint for a model dir, safetensors file, sharded index, torch state dict, GGUF file or
    hub id."""
    p = Path(path).expanduser()
    if not p.exists():
        if _HUB_ID.match(str(path)) and not str(path).endswith(_FILE_SUFFIXES):
            p = _download(str(path))
        else:
            raise CheckpointError(f"{path}: no such file or directory")
    if p.is_file() and p.name.endswith(".gguf"):
        from rankscope.probes.gguf import GGUFFile

        src = GGUFFile(p)
        if isinstance(src.config, dict):
            _check_dims(p, src.config)  # built from the GGUF metadata: the same head counts and widths
        return Checkpoint(path=p, config=src.config, names=src.names(), _where=dict.fromkeys(src.names(), src))
    config = None
    if p.is_dir():
        config = _read_config(p / "config.json")
        weights = _find_weights(p)
    else:
        weights = p
        if p.name in DIR_WEIGHTS or p.name.endswith(".index.json"):
            config = _read_config(p.parent / "config.json")
    names, where = _open_weights(weights)
    fp8 = {n: n + "_scale_inv" for n in names if n.endswith("weight") and n + "_scale_inv" in where
           and where[n].dtype(n) in FP8_DTYPES}
    scales = set(fp8.values())
    return Checkpoint(path=p, config=config, names=[n for n in names if n not in scales], _where=where, _fp8=fp8)


FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def fp8_block(config: dict | None) -> tuple[int, int]:
    """The (rows, cols) of one scale block: ``quantization_config.weight_block_size``, DeepSeek-V3's 128×128 when
    the config does not say."""
    q = (config or {}).get("quantization_config") or {}
    block = q.get("weight_block_size") if isinstance(q, dict) else getattr(q, "weight_block_size", None)
    return (int(block[0]), int(block[1])) if block else (128, 128)


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], where: str,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = W₈ ⊙ S, S the inverse scale of each block of ``block`` rows × cols (DeepSeek-V3's ``weight_scale_inv``,
    shape (…, ⌈rows/bo⌉, ⌈cols/bi⌉)). In float32 a product of a 4-significant-bit FP8 value and a float32 scale
    is rounded once, a relative error ≤ 2⁻²⁴ per entry, far below FP8's own 2⁻⁴; in float64 it is exact. One row
    block at a time, so no full-size scale matrix is made. ``CheckpointError`` naming ``where`` when the scale's
    shape does not fit."""
    bo, bi = block
    rows, cols = w.shape[-2:]
    grid = (*w.shape[:-2], -(-rows // bo), -(-cols // bi))
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(f"{where}: weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {grid} "
                              f"for {tuple(w.shape)} in {bo}×{bi} blocks")
    out = w.to(dtype)  # (…, rows, cols)
    scale = scale_inv.to(dtype)
    for i in range(grid[-2]):
        out[..., i * bo:(i + 1) * bo, :] *= scale[..., i, None, :].repeat_interleave(bi, -1)[..., :cols]
    return out


def _find_weights(d: Path) -> Path:
    for name in DIR_WEIGHTS:
        if (d / name).is_file():
            return d / name
    singles = sorted(d.glob("*.safetensors"))
    if len(singles) == 1:
        return singles[0]
    extra = f"; {len(singles)} other .safetensors files, which is ambiguous" if singles else ""
    raise CheckpointError(f"{d}: no weights found (looked for {', '.join(DIR_WEIGHTS)}{extra})")


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deep to parse") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    _check_dims(path, config)
    return config


def _check_dims(path: Path, config: dict, where: str = "") -> None:
    """``CheckpointError`` where a head count or width (``CONFIG_DIMS``) of the config, or of a sub-config such as
    CLIP's ``text_config``, is present but not a positive integer."""
    for key, value in config.items():  # per-layer lists (a GGUF's hybrid layers: 0 heads where no attention) pass
        if key in CONFIG_DIMS and value is not None and not isinstance(value, list) and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{path}: {where}{key} is {value!r}; a head count or width must be a positive "
                                  "integer")
        if isinstance(value, dict) and not where:  # one level of sub-configs (text_config, vision_config, ...)
            _check_dims(path, value, f"{key}.")


def _open_file(path: Path) -> _Source:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.name.endswith(".safetensors"):
        return _SafetensorsFile(path)
    if path.name.endswith(TORCH_SUFFIXES):
        return _TorchFile(path)
    raise CheckpointError(f"{path}: unknown file type '{path.suffix}' (accepted: {ACCEPTED})")


def _open_weights(path: Path) -> tuple[list[str], dict[str, _Source]]:
    if path.name.endswith(".json"):
        return _open_index(path)
    src = _open_file(path)
    names = src.names()
    return names, dict.fromkeys(names, src)


def _open_index(path: Path) -> tuple[list[str], dict[str, _Source]]:
    """A sharded index: shards in file-name order (model-00001-of-…, model-00002-of-…), each in its file order."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deep to parse") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({one_line(e)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: not a sharded index (no 'weight_map' of tensor name → shard file)")
    if len(weight_map) > MAX_TENSORS:
        raise CheckpointError(f"{path}: names {len(weight_map):,} tensors, more than the {MAX_TENSORS:,} a "
                              "checkpoint may hold")
    wanted: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        wanted.setdefault(shard, set()).add(name)
    names: list[str] = []
    where: dict[str, _Source] = {}
    for shard in wanted:
        inside = os.path.normpath(shard)
        if not shard or os.path.isabs(inside) or inside == ".." or inside.startswith(".." + os.sep) or Path(
                inside).drive:
            raise CheckpointError(f"{path}: shard '{shard}' lies outside the index's directory; an index may only "
                                  "name files beside it (or below it)")
    for shard, listed in sorted(wanted.items()):
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{path}: shard '{shard}' is missing ({shard_path}: no such file or directory)")
        src = _open_file(shard_path)
        present = src.names()
        missing = listed.difference(present)
        if missing:
            raise CheckpointError(f"{shard_path}: lacks tensor '{min(missing)}' that {path.name} places there")
        for name in present:
            if name in listed:
                names.append(name)
                where[name] = src
        if isinstance(src, _TorchFile):
            src.release()
    return names, where


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _download(repo_id: str) -> Path:
    """The local snapshot of a hub model: from the local cache first (offline), else downloaded (json and
    safetensors only); a CheckpointError saying why not."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: no such file or directory (and huggingface_hub, which would look for it in "
                              "the Hugging Face cache or on the hub, is not installed)") from None
    patterns = ["*.json", "*.safetensors"]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        if any(local.glob("*.safetensors")) or any(local.glob("*.safetensors.index.json")):
            return local  # a snapshot with weights (an older huggingface_hub may return one with a config only)
    except Exception:  # not in the cache (LocalEntryNotFoundError), or a bad id: try the hub unless offline
        pass
    prefix = f"{repo_id}: no such file or directory, not in the local Hugging Face cache"
    if _hub_offline():
        raise CheckpointError(f"{prefix}, and HF_HUB_OFFLINE is set, so the hub was not asked")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise CheckpointError(f"{prefix}, and the hub could not give it ({type(e).__name__}: {one_line(e)})") from None
