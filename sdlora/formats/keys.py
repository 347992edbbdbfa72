"""Split a LoRA file's keys into modules and normalized parts, whatever the key scheme.

Parts are normalized across schemes (`lora_up.weight` = `lora_B.weight` = `lora.up.weight` =
`up`), so building an adapter never looks at spellings. Keys no scheme understands are kept
in `unknown` and reported, never dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sdlora.formats import comfy, diffusers, kohya

# kohya/LyCORIS suffixes after the first dot -> normalized part (identity unless renamed)
KOHYA_PARTS = {"lora_up.weight": "up", "lora_down.weight": "down", "lora_mid.weight": "mid",
               "lora_B.weight": "up", "lora_A.weight": "down"}
LYCORIS_PARTS = ("alpha", "scale", "bias", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                 "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                 "lokr_t2", "diff", "diff_b", "w_norm", "b_norm", "oft_blocks", "oft_diag", "rescale", "weight",
                 "on_input", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight",
                 "bias_indices", "bias_values", "bias_size")  # last three: LyCORIS extraction's sparse residual
KOHYA_PARTS.update({p: p for p in LYCORIS_PARTS})
# LyCORIS suffixes also seen after dotted diffusers names (not the bare weight/bias/scale)
DOTTED_EXTRA = tuple(p for p in LYCORIS_PARTS if p not in ("weight", "bias", "scale"))
BUNDLE_PREFIX = "bundle_emb."


@dataclass
class Module:
    name: str                                        # module name as written (normalized for dotted keys)
    scheme: str                                      # "kohya" | "diffusers" | "comfy"
    keys: dict[str, str] = field(default_factory=dict)  # part -> file key


@dataclass
class ParsedKeys:
    modules: dict[str, Module] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    embeddings: dict[str, list[str]] = field(default_factory=dict)  # bundle_emb token -> keys
    duplicate: list[str] = field(default_factory=list)


def _split_dotted(key: str):
    got = diffusers.split_key(key)
    if got is not None:
        return got
    for part in sorted(DOTTED_EXTRA, key=len, reverse=True):
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    return None


def parse_keys(names) -> ParsedKeys:
    out = ParsedKeys()
    for key in names:
        if key.startswith(BUNDLE_PREFIX):
            token = key[len(BUNDLE_PREFIX):].split(".", 1)[0]
            out.embeddings.setdefault(token, []).append(key)
            continue
        if kohya.claims(key):
            module, suffix = kohya.split_key(key)
            part, scheme = KOHYA_PARTS.get(suffix), "kohya"
        else:
            got = _split_dotted(key)
            (module, part) = got if got else (None, None)
            scheme = "comfy" if module and comfy.claims(module) else "diffusers"
        if part is None:
            out.unknown.append(key)
            continue
        mod = out.modules.setdefault(module, Module(module, scheme))
        if part in mod.keys:  # e.g. lora_B.weight and lora_B.default.weight for one module
            out.duplicate.append(key)
            continue
        mod.keys[part] = key
    return out
