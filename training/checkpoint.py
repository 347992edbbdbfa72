"""Training checkpoints: one folder per step, written atomically (temp folder + rename).

    <checkpoint_dir>/step-000500/
        <name>-step000500.safetensors   the LoRA so far (kohya keys, fp32): usable as is, and the
                                        weights a resume starts from
        optimizer.pt                    optimizer state (tensors and numbers only)
        training_state.pt               LR scheduler state and the torch RNG states
        state.json                      step, data position, the run's full resolved config (so
                                        `sdlora train --resume DIR` needs nothing else), family, loss history

A write builds `.step-NNNNNN.<id>/` beside and renames it into place; what a killed write leaves
behind is tidied by `recover` at the start of the next run (a finished folder is restored, never
deleted). Folders get the normal mode (0755 under umask 022): mkdir, not tempfile.mkdtemp (0700).
Everything is loaded with `torch.load(weights_only=True)`: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from sdlora.atomic import replace_dir
from sdlora.errors import SdloraError

PREFIX = "step-"
_LEFTOVER = re.compile(r"\.(step-\d+)\.")     # .step-000006.<id> (a write) or .step-000006.old.<id> (a swap)


def save_checkpoint(root: Path, step: int, *, lora_name: str, lora_tensors: dict, metadata: dict,
                    optimizer_state: dict, training_state: dict, state: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()                         # umask applies (mkdtemp would make it 0700)
    try:
        # written through open() so the file gets the umask's mode (safetensors' save_file makes 0600)
        (tmp / lora_name).write_bytes(save({k: v.detach().contiguous().cpu() for k, v in lora_tensors.items()},
                                           metadata={k: str(v) for k, v in metadata.items()}))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(training_state, tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, lora_file=lora_name), indent=1))
        replace_dir(tmp, final)         # a re-save of the same step swaps, never leaves half a folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file())


def _complete(folder: Path) -> Path | None:
    """The finished checkpoint in a leftover folder: itself (state.json is written last) or, for a
    swap's trash folder, the old checkpoint moved into it."""
    for p in (folder, folder / "old"):
        if (p / "state.json").is_file():
            return p
    return None


def recover(root: Path) -> None:
    """Tidy what an interrupted write left in `root`: a complete checkpoint whose final folder is
    missing is moved into place; every other `.step-*` leftover is deleted."""
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        m = _LEFTOVER.match(d.name)
        if not m or not d.is_dir():
            continue
        final, done = root / m[1], _complete(d)
        if done is not None and not final.exists():
            try:
                os.rename(done, final)
            except OSError:         # another process (DDP) got there first
                pass
        shutil.rmtree(d, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    if keep > 0:
        for p in list_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path) -> Path:
    """A checkpoint folder, or the newest one inside a checkpoints folder (after `recover`)."""
    path = Path(path)
    recover(path if path.is_dir() and not (path / "state.json").exists() else path.parent)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise SdloraError(f"--resume {path}: no checkpoint there (expected a folder with state.json, or a folder "
                          f"of {PREFIX}NNNNNN checkpoints)")
    return found[-1]


def stored_config(path) -> dict:
    """The resolved config of the run that wrote the checkpoint at `path` (see `find_checkpoint`)."""
    found = find_checkpoint(path)
    try:
        return json.loads((found / "state.json").read_text())["config"]
    except (OSError, KeyError, ValueError) as e:
        raise SdloraError(f"checkpoint {found} has no readable config ({type(e).__name__}: {e})") from None


def load_checkpoint(path: Path) -> dict:
    try:
        state = json.loads((path / "state.json").read_text())
        return {
            "state": state,
            "lora": load_file(str(path / state["lora_file"])),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
            "training": torch.load(path / "training_state.pt", weights_only=True, map_location="cpu"),
        }
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise SdloraError(f"checkpoint {path} is incomplete or damaged ({type(e).__name__}: {e})") from None
