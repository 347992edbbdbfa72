"""Writes that never leave a half-written file or folder behind: build beside, then rename."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdlora.errors import SdloraError


def atomic_save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """safetensors save that never leaves a half-written file at `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise SdloraError(f"cannot write {path}: folder {path.parent} does not exist; create it or pick another path")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final` (same file system). An existing `final` is swapped
    out and deleted only after the new folder is in place; if the swap fails it is put back."""
    if not final.exists():
        os.replace(tmp, final)
        return
    trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old."))
    os.rename(final, trash / "old")
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(trash / "old", final)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)
