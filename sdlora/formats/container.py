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
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import LoraFormatError
from sdlora.paths import check_input_file

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
    if not (path.exists() or path.is_symlink()):
        raise FileNotFoundError(f"no such LoRA file: {path}")
    check_input_file(path, "LoRA file")      # a folder, a link loop, a device: said as such
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
    except RecursionError:   # json's C parser recurses per nesting level; a real header is 3 levels deep
        raise LoraFormatError(f"{path}: damaged safetensors header: its JSON is nested thousands of levels deep "
                              "(a real header has 3 levels). Re-download the file.") from None
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoraFormatError(f"{path}: damaged safetensors header: __metadata__ must be an object of text values "
                              f"(safetensors' own rule), found {_describe(metadata)}. Re-download the file or "
                              "re-save it with valid metadata.")
    tensors, data_end = {}, 0
    for name, info in doc.items():
        try:
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if (not isinstance(info["dtype"], str) or not all(type(s) is int and s >= 0 for s in shape)
                    or not all(type(o) is int for o in (begin, end)) or not 0 <= begin <= end):
                raise ValueError
            tensors[name] = TensorInfo(info["dtype"], shape)
            data_end = max(data_end, end)
        except (KeyError, TypeError, ValueError, IndexError):
            raise LoraFormatError(f"{path}: damaged safetensors header (entry {name!r} has no valid "
                                  "dtype/shape/data_offsets)") from None
    if 8 + n + data_end > size:
        raise LoraFormatError(f"{path}: truncated safetensors file: its tensors need {8 + n + data_end} bytes but "
                              f"the file has {size}. Re-download it.")
    return Header(path, tensors, {str(k): str(v) for k, v in metadata.items()}, n, size)


def _describe(value) -> str:
    if isinstance(value, dict):
        bad = next(k for k, v in value.items() if not isinstance(v, str))
        return f"{bad!r} holding a JSON {_json_type(value[bad])}"
    return f"a JSON {_json_type(value)}"


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__)


def header_of_state_dict(state: dict[str, torch.Tensor], path=None, metadata=None, container="state_dict") -> Header:
    tensors = {k: TensorInfo(_torch_dtype_name(v.dtype), tuple(v.shape)) for k, v in state.items()}
    size = path.stat().st_size if path is not None else 0
    return Header(Path(path) if path else None, tensors, dict(metadata or {}), 0, size, container)


def pickle_refusal(e: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in our words: torch's own message is several
    paragraphs with terminal colour codes, addressed to someone calling torch.load."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it stores a Python object ({m[1]}), not only tensors"
    if "Unsupported operand" in text or type(e).__name__ == "UnpicklingError":
        return "it stores Python objects, not only tensors"
    return "it is not a PyTorch tensor file (unreadable or damaged)"


def load_pickle(path) -> dict[str, torch.Tensor]:
    """A legacy `.pt/.ckpt` LoRA, loaded with weights_only=True (plain tensors and containers only)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for objects, RuntimeError/EOFError/KeyError for junk
        raise LoraFormatError(
            f"{path}: refused to load this pickle file: {pickle_refusal(e)}. Pickles can run code, so only plain "
            "tensors are read (torch.load with weights_only=True); convert the file to .safetensors with a tool "
            "you trust.") from None
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
    try:
        return load_safetensors(path)[0]
    except OSError:
        raise
    except Exception as e:
        raise LoraFormatError(f"{path}: damaged safetensors file ({e}); re-download it") from None


def load_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a safetensors file, whatever bytes its name is made of.

    safetensors takes a str path and refuses one that is not valid UTF-8 (a name from an old
    Latin-1 archive, kept by Python as surrogate escapes); such files are read through Python.
    """
    from safetensors import safe_open
    from safetensors.torch import load, load_file
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with open(path, "rb") as f:
            data = f.read()
        return load(data), _raw_metadata(data)
    with safe_open(name, "pt") as f:
        meta = f.metadata() or {}
    return load_file(name, device="cpu"), meta


def _raw_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}
