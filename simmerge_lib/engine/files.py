"""Safetensors files as the engine reads and writes them: headers, ``pread`` / ``pwrite`` of one tensor, shard
sizes and the greedy shard grouping (the one rule every output layout follows, here and in chapter 07's plans)."""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import CheckpointError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_IO_CHUNK = 1 << 30  # pread/pwrite move at most ~2 GiB per call on Linux


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header: sane length, valid JSON, known dtypes, sizes matching shapes, and
    every tensor inside the file (a truncated shard fails here, before any merging)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a mapping)")
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt header entry for {name!r} ({exc!r})") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, "
                                  f"file has {size}")
        out[name] = TensorInfo(path, dtype, shape, data_start + begin, end - begin)
    return out


def read_tensor(fd: int, info: TensorInfo, out: Tensor | None = None) -> Tensor:
    """The tensor ``info`` describes, read with ``pread`` from ``fd`` (``info.path`` opened ``O_RDONLY``) into a
    fresh buffer, in its stored dtype and shape.

    Why not ``mmap`` (``safetensors.safe_open``): pages of a mapped file that were touched count in the process's
    resident set for as long as the file stays mapped, so reading a shard through a mapping costs its size in RSS
    on top of the tensor copies; ``pread`` goes through the page cache, which is not resident set. The caller owns
    the returned tensor (it may be modified in place). Safe to call from several threads on one ``fd``.
    ``out``: a tensor of ``info``'s dtype and shape to read into (a reused buffer) instead of a new one."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out.view(-1).view(torch.uint8)
    view = memoryview(buf.numpy()) if info.nbytes else memoryview(b"")
    done = 0
    try:
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:done + _IO_CHUNK]], info.offset + done)
            if got <= 0:
                raise CheckpointError(f"{info.path}: truncated while reading at byte {info.offset + done}")
            done += got
    except OSError as exc:
        raise CheckpointError(f"{info.path}: cannot read at byte {info.offset + done} "
                              f"({exc.strerror or exc})") from None
    return buf.view(info.dtype).reshape(info.shape)


def write_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:done + _IO_CHUNK], offset + done)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CheckpointError(f"{path}: disk full while writing") from None
        raise CheckpointError(f"{path}: write failed ({exc.strerror or exc})") from None


def tensor_bytes(t: Tensor) -> memoryview:
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def header_bytes(entries: dict[str, dict[str, Any]]) -> bytes:
    """A safetensors header (length prefix + JSON) for ``entries`` (name -> dtype, shape, data_offsets)."""
    body = json.dumps({"__metadata__": {"format": "pt"}, **entries}, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # safetensors aligns the data start to 8 bytes
    return struct.pack("<Q", len(body)) + body


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB', 1000 -> bytes (decimal units as in transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"shard size {text!r} not understood (e.g. 2GB, 500MB)") from None


def shard_groups(sizes: Sequence[int], shard_size: str | int) -> list[list[int]]:
    """Greedy shards in order: indices of ``sizes`` (bytes), a new shard starting when the next tensor would pass
    ``shard_size`` (a tensor larger than the limit gets a shard of its own)."""
    limit = parse_size(shard_size)
    if limit <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size!r}")
    groups: list[list[int]] = [[]]
    used = 0
    for i, nbytes in enumerate(sizes):
        if groups[-1] and used + nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += nbytes
    return groups
