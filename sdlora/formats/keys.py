"""Split a LoRA file's keys into modules and normalized parts, whatever the key scheme.

Parts are normalized across schemes (`lora_up.weight` = `lora_B.weight` = `lora.up.weight` =
`up`), so building an adapter never looks at spellings. Keys no scheme understands are kept
in `unknown` and reported, never dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sdlora.adapters import LoRA, known_parts
from sdlora.formats import comfy, diffusers, kohya
from sdlora.formats.modules import MODIFIERS, SPARSE_PARTS

# LoRA's parts as the underscore (kohya) scheme spells them; every other part is written under its
# own name (LyCORIS style): the registered algorithms' parts and the modifiers
KOHYA_LORA_PARTS = {"lora_up.weight": "up", "lora_down.weight": "down", "lora_mid.weight": "mid",
                    "lora_B.weight": "up", "lora_A.weight": "down"}
OWN_NAME_MODIFIERS = frozenset(m for m in MODIFIERS if m != "magnitude") | frozenset(SPARSE_PARTS)  # PEFT's is dotted


def own_name_parts() -> frozenset[str]:
    """Parts written under their own names: every registered algorithm's (LoRA's excepted) and the
    modifiers. Asked once per file, so an algorithm registered later is known to the next read."""
    return frozenset(known_parts() - set(LoRA.parts)) | OWN_NAME_MODIFIERS


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


def _split_dotted(key: str, dotted: list[str]):
    got = diffusers.split_key(key)
    if got is not None:
        return got
    # LyCORIS parts also seen after dotted diffusers names (not the bare weight/bias/scale)
    for part in dotted:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    return None


def parse_keys(names) -> ParsedKeys:
    out = ParsedKeys()
    own = own_name_parts()
    # LyCORIS parts also seen after dotted diffusers names (not the bare weight/bias/scale), longest first
    dotted = sorted(own - {"weight", "bias", "scale"}, key=len, reverse=True)
    for key in names:
        if key.startswith(BUNDLE_PREFIX):
            token = key[len(BUNDLE_PREFIX):].split(".", 1)[0]
            out.embeddings.setdefault(token, []).append(key)
            continue
        if kohya.claims(key):
            module, suffix = kohya.split_key(key)
            part = KOHYA_LORA_PARTS.get(suffix) or (suffix if suffix in own else None)
            scheme = "kohya"
        else:
            got = _split_dotted(key, dotted)
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
