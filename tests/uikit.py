"""Helpers for the UI tests: the base model they run on, LoRA files that fit it, and a wrong-family one.

The base is the embedded tiny model when it is installed (sample_data/models/tiny-sd); before it
lands, SDLORA_TEST_BASE names a model folder of the same structure. Neither: the tests fail and say so.
"""
import os
from pathlib import Path

import pytest
import torch

from sdlora.adapters import LoRA
from sdlora.families import module_table
from sdlora.formats.writer import save_lora
from sdlora.pipelines import EMBEDDED_MODEL
from tiny import tiny_configs

ATTN = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def base_spec() -> str | None:
    """None (the embedded model) when it exists, else $SDLORA_TEST_BASE."""
    if (EMBEDDED_MODEL / "model_index.json").is_file():
        return None
    env = os.environ.get("SDLORA_TEST_BASE")
    if env and (Path(env) / "model_index.json").is_file():
        return env
    pytest.fail(f"no base model for the UI tests: the embedded model {EMBEDDED_MODEL} is missing and "
                "SDLORA_TEST_BASE does not name a diffusers model folder")


def lora_patches(family: str, configs: dict, *, seed: int, rank: int = 4, scale: float = 0.3) -> dict:
    """Random plain LoRAs on every attention projection (UNet and text encoders) of a model."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, info in module_table(family, configs).items():
        if path.rsplit(".", 1)[-1] in ATTN or path.endswith("to_out.0"):
            o, i = info.shape[0], info.shape[1]
            out[path] = LoRA(torch.randn(o, rank, generator=g) * scale, torch.randn(rank, i, generator=g) * scale,
                             alpha=float(rank))
    return out


def write_lora(path: Path, family: str, configs: dict, *, seed: int, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, lora_patches(family, configs, seed=seed), family, metadata=metadata or {},
              unet_config=configs.get("unet"))
    return path


def write_sdxl_lora(path: Path) -> Path:
    """A LoRA with SDXL key names (kohya lora_te1_/lora_te2_/lora_unet_ SGM spelling): the wrong family
    for an SD1 base."""
    return write_lora(path, "sdxl", tiny_configs("sdxl"), seed=99, metadata={"ss_base_model_version": "sdxl_base_v1-0"})


def lora_delta(tensors: dict, name: str) -> torch.Tensor:
    """ΔW of one kohya module straight from a file's tensors: (alpha / rank) · up @ down."""
    up, down = tensors[f"{name}.lora_up.weight"].float(), tensors[f"{name}.lora_down.weight"].float()
    rank = down.shape[0]
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
    return (alpha / rank) * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))
