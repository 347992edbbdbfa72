"""The hashes the ecosystem uses to name a LoRA file.

* addnet / `sshs_model_hash`: SHA-256 of the bytes after the safetensors header (8 + N bytes),
  so editing metadata does not change it (kohya-ss/sd-scripts library/train_util.py
  `addnet_hash_safetensors`: reads the 8-byte length n, seeks to n + 8, hashes the rest).
  A1111 writes its first 12 hex digits as `Lora hashes` in the image infotext.
* SHA-256 of the whole file; AutoV2 (Civitai, A1111 model hash) = its first 10 hex digits.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 20


def _sha256(f, start: int = 0) -> str:
    h = hashlib.sha256()
    f.seek(start)
    for chunk in iter(lambda: f.read(BLOCK), b""):
        h.update(chunk)
    return h.hexdigest()


def addnet_hash(path) -> str:
    """SHA-256 (hex) of a safetensors file's bytes after its header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return _sha256(f, 8 + n)


def file_sha256(path) -> str:
    with open(path, "rb") as f:
        return _sha256(f)


def lora_hashes(path) -> dict[str, str]:
    """{"sha256", "autov2", "addnet", "addnet_short"} for a file (addnet only for .safetensors)."""
    path = Path(path)
    full = file_sha256(path)
    out = {"sha256": full, "autov2": full[:10]}
    if path.suffix.lower() == ".safetensors":
        out["addnet"] = addnet_hash(path)
        out["addnet_short"] = out["addnet"][:12]
    return out
