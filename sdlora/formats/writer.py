"""Writing LoRA files: kohya format (what A1111/ComfyUI/Civitai read) or diffusers/PEFT format.

kohya: `<prefix><module_with_underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`
(+ `.lora_mid.weight`), SDXL UNet names in LDM/SGM spelling as kohya's SDXL trainer writes them.
diffusers: `unet.<module>.lora_A.weight` / `.lora_B.weight` (`text_encoder.`, `text_encoder_2.`),
the alphas folded into the up matrix (diffusers files carry no alpha: scale is 1).
Metadata values must be strings (safetensors); structured values are JSON strings, as kohya does.
"""
from __future__ import annotations

import torch

from sdlora.adapters import LoRA
from sdlora.atomic import atomic_save_file  # noqa: F401  (part of this module's API)
from sdlora.errors import SdloraError
from sdlora.families import kohya_name


def lora_state_dict(patches: dict[str, LoRA], family: str, *, fmt: str = "kohya", unet_config=None,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file for plain-LoRA patches keyed by canonical path."""
    out = {}
    for path, ad in patches.items():
        if not isinstance(ad, LoRA):
            raise SdloraError(f"{path}: a {ad.algorithm} module cannot be written as a plain LoRA; "
                              "merge with --rank to convert it by SVD")
        up, down, mid = ad.tensors["up"], ad.tensors["down"], ad.tensors.get("mid")
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        if fmt == "kohya":
            name = kohya_name(path, family, unet_config)
            out[f"{name}.lora_down.weight"] = cast(down)
            out[f"{name}.lora_up.weight"] = cast(up)
            if mid is not None:
                out[f"{name}.lora_mid.weight"] = cast(mid)
            out[f"{name}.alpha"] = torch.tensor(float(ad.alpha if ad.alpha is not None else ad.rank)).to(
                dtype or torch.float32)
        elif fmt == "diffusers":
            if mid is not None:
                raise SdloraError(f"{path}: diffusers format has no Tucker (lora_mid) layers; save as kohya")
            out[f"{path}.lora_A.weight"] = cast(down)
            out[f"{path}.lora_B.weight"] = cast(up.float() * ad.scale)
        else:
            raise SdloraError(f"unknown LoRA save format {fmt!r}; expected 'kohya' or 'diffusers'")
    return out


def save_lora(path, patches: dict[str, LoRA], family: str, *, metadata: dict[str, str] | None = None,
              fmt: str = "kohya", unet_config=None, dtype: torch.dtype | None = None) -> None:
    """Write plain-LoRA patches as one `.safetensors` LoRA file (atomically)."""
    atomic_save_file(lora_state_dict(patches, family, fmt=fmt, unet_config=unet_config, dtype=dtype),
                     path, metadata)
