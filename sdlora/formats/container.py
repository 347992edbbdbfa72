"""The file container: safetensors header-only reading, tensor loading, legacy `.pt/.ckpt`.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (per tensor:
dtype, shape, data_offsets; optional `__metadata__` str -> str), then the raw bytes. Reading the
header alone gives names, shapes, dtypes and metadata without touching tensor data (for
detection, `sdlora inspect` and the UI library). Pickles are never unpickled beyond
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import LoraFormatError

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit for the JSON header
PICKLE_SUFFIXES = (".pt", ".ckpt", ".pth", ".bin")


@dataclass
class TensorInfo:
    dtype: str                 # safetensors dtype name: F32, F16, BF16, ...
    shape: tuple[int, ...]


@dataclass
class Header:
    """What a file says about itself without loading tensors."""
    path: Path | None
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_size: int = 0       # N: the JSON length (the data starts at 8 + N)
    file_size: int = 0
    container: str = "safetensors"

    @property
    def names(self) -> list[str]:
        return list(self.tensors)


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8",
            torch.int8: "I8", torch.int16: "I16"}.get(dtype, str(dtype))


def read_header(path) -> Header:
    """Names, shapes, dtypes and metadata of a LoRA file without loading its tensors.

    `.pt/.ckpt` files have no separate header: they are loaded (weights_only) to describe them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such LoRA file: {path}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        state = load_pickle(path)
        return header_of_state_dict(state, path, container="pickle")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraFormatError(f"{path}: not a safetensors file (only {size} bytes); expected an 8-byte header "
                                  "length followed by a JSON header. Re-download the file.")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or n < 2:
            raise LoraFormatError(f"{path}: not a safetensors file (its first 8 bytes give a header length of {n}); "
                                  "if it is a .pt/.ckpt pickle, give it that extension")
        if 8 + n > size:
            raise LoraFormatError(f"{path}: truncated safetensors file: the header needs {8 + n} bytes but the file "
                                  f"has {size}. Re-download it.")
        raw = f.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise LoraFormatError(f"{path}: not a safetensors file (its header is not valid JSON: {e})") from None
    metadata = doc.pop("__metadata__", None) or {}
    tensors, data_end = {}, 0
    for name, info in doc.items():
        try:
            tensors[name] = TensorInfo(str(info["dtype"]), tuple(int(s) for s in info["shape"]))
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise LoraFormatError(f"{path}: damaged safetensors header (entry {name!r} has no valid "
                                  "dtype/shape/data_offsets)") from None
    if 8 + n + data_end > size:
        raise LoraFormatError(f"{path}: truncated safetensors file: its tensors need {8 + n + data_end} bytes but "
                              f"the file has {size}. Re-download it.")
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, n, size)


def header_of_state_dict(state: dict[str, torch.Tensor], path=None, metadata=None, container="state_dict") -> Header:
    tensors = {k: TensorInfo(_torch_dtype_name(v.dtype), tuple(v.shape)) for k, v in state.items()}
    size = path.stat().st_size if path is not None else 0
    return Header(Path(path) if path else None, tensors, dict(metadata or {}), 0, size, container)


def load_pickle(path) -> dict[str, torch.Tensor]:
    """A legacy `.pt/.ckpt` LoRA, loaded with weights_only=True (plain tensors and containers only)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for objects, RuntimeError/EOFError for junk
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoraFormatError(
            f"{path}: refused to load this pickle file: it is not a plain tensor file loadable with "
            f"torch.load(weights_only=True) ({first}). Pickles can run code, so only plain tensors are read; "
            "convert the file to .safetensors with a tool you trust.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise LoraFormatError(f"{path}: not a LoRA: the pickle holds a {type(obj).__name__}, "
                              "expected a dict of named tensors")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise LoraFormatError(f"{path}: not a LoRA: the pickle holds no tensors")
    return state


def load_tensors(path, header: Header | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a file, on CPU, in their stored dtype."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return load_pickle(path)
    header = header or read_header(path)
    from safetensors.torch import load_file
    try:
        return load_file(os.fspath(path), device="cpu")
    except Exception as e:
        raise LoraFormatError(f"{path}: damaged safetensors file ({e}); re-download it") from None
