"""kohya / A1111 / Civitai / LyCORIS underscore key names (docs/formats.md "Underscore names").

A key is `<prefix><module path with "." -> "_">.<suffix>`; the module is everything before the
first dot (A1111 `key.split(".", 1)`). The flattening cannot be inverted (`to_q`, `proj_in`,
`ff_net_0_proj` hold real underscores), so names are looked up in an alias table built from the
target model's canonical module names: diffusers and LDM/SGM spellings for the UNet, the
per-family text-encoder prefixes, and the `lycoris_` prefix of LyCORIS' standalone wrapper.
"""
from __future__ import annotations

import functools
import json

from sdlora.families import get_family, ldm_unet_name, load_config, module_table

# prefixes of SD LoRA keys in this scheme; `oft_unet_` is kohya's own OFT network
PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lycoris_", "oft_unet_")


def claims(key: str) -> bool:
    return key.startswith(PREFIXES)


def split_key(key: str) -> tuple[str, str]:
    """(module name as written in the file, suffix)."""
    module, _, suffix = key.partition(".")
    return module, suffix


def flat(name: str) -> str:
    return name.replace(".", "_")


def aliases(family: str, configs: dict | None = None) -> dict[str, tuple[str, ...]]:
    """File module name -> canonical paths it may mean (more than one only for `lycoris_` SDXL text names).

    Covers every Linear/Conv2d and every norm/embedding module (targets of full and norm diffs).
    """
    return _aliases(family, json.dumps(configs or {}, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _aliases(family: str, configs_json: str) -> dict[str, tuple[str, ...]]:
    configs = json.loads(configs_json) or None
    fam = get_family(family)
    unet_cfg = (configs or {}).get("unet")
    if unet_cfg is None:
        unet_cfg = load_config(family, "unet")
    table = module_table(family, configs, include_norms=True)
    out: dict[str, list[str]] = {}

    def add(file_name, path):
        lst = out.setdefault(file_name, [])
        if path not in lst:
            lst.append(path)

    for path in table:
        comp, _, name = path.partition(".")
        if comp == "unet":
            spellings = [flat(name)]
            ldm = ldm_unet_name(name, unet_cfg)
            if ldm:
                spellings.append(flat(ldm))
            for s in spellings:
                for prefix in ("lora_unet_", "lycoris_", "oft_unet_"):
                    add(prefix + s, path)
        else:
            add(fam.kohya_prefix(comp) + flat(name), path)
            if comp == "text_encoder" and len(fam.text_encoders) > 1:
                add("lora_te_" + flat(name), path)  # ComfyUI maps lora_te_ to SDXL's CLIP-L too
            add("lycoris_" + flat(name), path)
    return {k: tuple(v) for k, v in out.items()}
