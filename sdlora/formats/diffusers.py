"""diffusers / PEFT dotted key names (docs/formats.md "Dotted names").

Flavours: PEFT (`unet.<path>.lora_A.weight`, `.lora_B.weight`, optional `.default` adapter name,
`lora_B.bias`, `lora_magnitude_vector`), raw PEFT saves (`base_model.model.<path>`), the old
LoRACompatible layers (`<path>.lora.down.weight`), the old attention processors
(`<attn>.processor.to_q_lora.down.weight`, `to_out_lora` = `to_out.0`) and the old
text-encoder patch (`<path>.lora_linear_layer.down.weight`). Component prefixes `unet.`,
`text_encoder.`, `text_encoder_2.`; old files also wrote UNet keys with no prefix.
"""
from __future__ import annotations

import re

from sdlora.families import COMPONENTS, clip_layouts

# file suffix -> normalized part name; matched longest first
SUFFIXES = {
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "up_bias",
    "lora_A.default.weight": "down", "lora_B.default.weight": "up", "lora_B.default.bias": "up_bias",
    "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
    "lora_magnitude_vector.default": "magnitude", "lora_magnitude_vector.default.weight": "magnitude",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "dora_scale": "dora_scale",
}
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_ORDER = sorted(SUFFIXES, key=len, reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, normalized part) or None when the key has no known suffix."""
    m = _PROCESSOR.match(key)
    if m:
        attn, proj, part = m.groups()
        return f"{attn}.{'to_out.0' if proj == 'to_out' else proj}", part
    for suffix in _ORDER:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], SUFFIXES[suffix]
    return None


def candidates(module: str) -> list[str]:
    """Canonical paths a dotted module name may mean, most likely first."""
    if module.startswith("base_model.model."):
        module = module[len("base_model.model."):]
    comp, _, rest = module.partition(".")
    if comp in COMPONENTS:
        names = [(comp, rest)]
    else:  # no component prefix: old UNet attn-processor files, raw PEFT saves
        names = [(c, module) for c in COMPONENTS]
    out = []
    for c, name in names:
        out.append(f"{c}.{name}")
        if c != "unet":   # saved from a transformers-5 CLIPTextModel: canonical names have the text_model level
            out += [f"{c}.{n}" for n in clip_layouts(name)[1:] if n.startswith("text_model.")]
    return out
