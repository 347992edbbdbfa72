"""Training checkpoints: one folder per step, written atomically (temp folder + rename).

    <checkpoint_dir>/step-000500/
        <name>-step000500.safetensors   the LoRA so far (kohya keys, fp32): usable as is, and the
                                        weights a resume starts from
        optimizer.pt                    optimizer state (tensors and numbers only)
        training_state.pt               LR scheduler state and the torch RNG states
        state.json                      step, data position, config, family

Everything is loaded with `torch.load(weights_only=True)`: nothing is unpickled.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdlora.atomic import replace_dir
from sdlora.errors import SdloraError

PREFIX = "step-"


def save_checkpoint(root: Path, step: int, *, lora_name: str, lora_tensors: dict, metadata: dict,
                    optimizer_state: dict, training_state: dict, state: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in lora_tensors.items()}, str(tmp / lora_name),
                  metadata={k: str(v) for k, v in metadata.items()})
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


def prune(root: Path, keep: int) -> None:
    if keep > 0:
        for p in list_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path) -> Path:
    """A checkpoint folder, or the newest one inside a checkpoints folder."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise SdloraError(f"--resume {path}: no checkpoint there (expected a folder with state.json, or a folder "
                          f"of {PREFIX}NNNNNN checkpoints)")
    return found[-1]


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
