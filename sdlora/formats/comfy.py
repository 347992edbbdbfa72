"""ComfyUI's own LoRA key names: what its LoraSave node writes and its loader's "generic" spellings.

ComfyUI comfy/lora.py `model_lora_keys_unet` maps `diffusion_model.<LDM/SGM module>` (the model's
own state-dict names, e.g. `diffusion_model.input_blocks.1.1.proj_in`) and `model_lora_keys_clip`
maps `text_encoders.<CLIP state-dict module>`, where the text encoders are named by ComfyUI's
sd1_clip/sd2_clip/sdxl_clip models: `clip_l.transformer.text_model.*` (SD1, SDXL's first),
`clip_h.transformer.text_model.*` (SD2) and `clip_g.transformer.text_model.*` plus
`clip_g.transformer.text_projection` (SDXL's second). comfy_extras/nodes_lora_extract.py LoraSave
writes exactly these (`lora_up/lora_down`, no alpha, `.diff` for 1-D weights such as norms,
`.diff_b` for biases, fp16). The other spellings ComfyUI accepts (`lora_unet_` + LDM or diffusers
names, `lycoris_`, `lora_te*_`, `unet.`/`text_encoder.` dotted names) are the kohya and diffusers
schemes already handled in kohya.py/diffusers.py. ComfyUI's loader takes no bare `clip_l.` prefix.
"""
from __future__ import annotations

import functools
import json

from sdlora.families import ldm_unet_name, load_config, module_table

PREFIXES = ("diffusion_model.", "text_encoders.")
# ComfyUI's text-encoder name per family and diffusers component (sd1_clip/sd2_clip/sdxl_clip)
CLIP_NAMES = {"sd1": {"text_encoder": "clip_l"}, "sd2": {"text_encoder": "clip_h"},
              "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}
# ComfyUI gives every CLIP a `text_projection` (identity for CLIP-L/H, comfy/clip_model.py), so
# LoraSave may write one; diffusers' SD1/SD2 and SDXL-first text encoders have none, and the pooled
# output it projects is unused by those pipelines, so such entries change nothing.
NO_EFFECT = ("text_encoders.clip_l.transformer.text_projection", "text_encoders.clip_h.transformer.text_projection")


def claims(module: str) -> bool:
    return module.startswith(PREFIXES)


def aliases(family: str, configs: dict | None = None) -> dict[str, str]:
    """ComfyUI module name -> canonical path, for every Linear/Conv2d/norm/embedding of the model."""
    return _aliases(family, json.dumps(configs or {}, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _aliases(family: str, configs_json: str) -> dict[str, str]:
    configs = json.loads(configs_json) or None
    unet_cfg = (configs or {}).get("unet") or load_config(family, "unet")
    out = {}
    for path in module_table(family, configs, include_norms=True):
        comp, _, name = path.partition(".")
        if comp == "unet":
            ldm = ldm_unet_name(name, unet_cfg)
            if ldm:
                out["diffusion_model." + ldm] = path
        else:
            out[f"text_encoders.{CLIP_NAMES[family][comp]}.transformer.{name}"] = path
    return out
