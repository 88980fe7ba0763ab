"""safetensors checkpoints read from their headers and written as a stream, one tensor in memory at a time."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from qdpo.config import read_json
from qdpo.errors import UserError

# 2 GB shards: a 7B bf16 model becomes 7 files, and no more than one tensor is ever held while writing.
SHARD_BYTES = 2 * 1024**3
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


class TensorEntry(Protocol):
    """What the writer needs to know of a tensor before its data arrives (qdpo.merge.Planned is one)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int: ...


def checkpoint_tensors(base_dir: Path) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    """Name → (file, shape, dtype) of every tensor in a safetensors checkpoint, from the headers alone."""
    from safetensors import safe_open

    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        files = list(dict.fromkeys(read_json(index)["weight_map"].values()))
    elif (base_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(
            f"{base_dir} has no safetensors weights (model.safetensors or its index); "
            "qdpo merges safetensors checkpoints only."
        )
    found = {}
    for name in files:
        with safe_open(str(base_dir / name), "pt") as f:
            for key in f.keys():
                header = f.get_slice(key)
                found[key] = (base_dir / name, tuple(header.get_shape()), _SAFETENSORS_DTYPES[header.get_dtype()])
    return found


def write_tensor(f: BinaryIO, tensor: torch.Tensor) -> None:
    """Append one tensor's raw bytes to an open file."""
    f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(path: Path, entries: Sequence[TensorEntry], tensors: Iterable[torch.Tensor]) -> None:
    """Write one safetensors file: the header from the entries, then each tensor as it arrives."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": _DTYPE_CODES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for e, tensor in zip(entries, tensors, strict=True):
            if tuple(tensor.shape) != e.shape or tensor.dtype != e.dtype:
                raise RuntimeError(
                    f"merge produced {e.name} as {tuple(tensor.shape)} {tensor.dtype}, planned {e.shape} {e.dtype}"
                )
            write_tensor(f, tensor)


def shards(entries: Sequence[TensorEntry], max_bytes: int) -> list[list[TensorEntry]]:
    """Split the tensors, in order, into files of at most max_bytes (a larger single tensor gets a file of its own)."""
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    return groups


def write_sharded(
    target: Path,
    entries: Sequence[TensorEntry],
    tensors: Iterator[torch.Tensor],
    max_shard_bytes: int,
    echo: Callable[[str], None],
) -> None:
    """Stream tensors, in entry order, into sharded model-*.safetensors files plus model.safetensors.index.json."""
    groups = shards(entries, max_shard_bytes)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(target / name, group, (next(tensors) for _ in group))
        weight_map.update({e.name: name for e in group})
        echo(f"  wrote {name} ({sum(e.nbytes for e in group) / 1e9:.2f} GB)")
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
