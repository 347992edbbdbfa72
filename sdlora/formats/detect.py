"""What kind of file is this, and which model family is it for (docs/formats.md "File kinds", "Family detection").

`refuse_non_lora` rejects, with a message that says what the file is, the things that sit in
LoRA folders but are not SD LoRAs: cloneofsimo "safeloras", full checkpoints, textual-inversion
embeddings, and LoRAs for Flux/SD3/DiT/Stable Cascade. `detect_family` lets the tensors decide
(text-encoder prefixes, UNet block structure, then shapes); metadata only picks among the families
they leave, and metadata they contradict is reported, not obeyed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sdlora.errors import LoraFormatError
from sdlora.formats.container import Header
from sdlora.formats.keys import ParsedKeys

_SAFELORAS = re.compile(r"^(unet|text_encoder):\d+:(up|down)$")
_CHECKPOINT = ("model.diffusion_model.", "cond_stage_model.", "first_stage_model.", "conditioner.embedders.")
_NON_SD = [  # (pattern on the key, what it is)
    (re.compile(r"^lora_unet_(double|single)_blocks_|(^|\.)(double_blocks|single_blocks|single_transformer_blocks)\."),
     "Flux"),
    (re.compile(r"^lora_unet_joint_blocks_|(^|\.)joint_blocks\.|^lora_te3_"), "SD3"),
    (re.compile(r"^lora_prior_"), "Stable Cascade"),
    (re.compile(r"^lora_transformer_|^transformer\.|^diffusion_model\.(blocks|layers)\."), "a DiT model (Flux/SD3/PixArt/...)"),
]
_TI_KEYS = {"emb_params", "string_to_param", "clip_l", "clip_g", "string_to_token", "name", "step"}
SD_FAMILIES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


def _metadata_family(md: dict[str, str]) -> tuple[str | None, str]:
    base = md.get("ss_base_model_version", "")
    if base.startswith("sdxl"):
        return "sdxl", f"ss_base_model_version={base}"
    if base.startswith("sd_v2"):
        return "sd2", f"ss_base_model_version={base}"
    if base.startswith("sd_v1"):
        return "sd1", f"ss_base_model_version={base}"
    if base:
        raise LoraFormatError(f"this LoRA was trained for {base!r} (ss_base_model_version), not SD1.x/SD2.x/SDXL; "
                              "sdlora only loads Stable Diffusion 1.x/2.x/XL LoRAs")
    arch = md.get("modelspec.architecture", "")
    for prefix, fam in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-v2", "sd2"), ("stable-diffusion-v1", "sd1")):
        if arch.startswith(prefix):
            return fam, f"modelspec.architecture={arch}"
    if arch:
        raise LoraFormatError(f"this file is for {arch!r} (modelspec.architecture), not SD1.x/SD2.x/SDXL; "
                              "sdlora only loads Stable Diffusion 1.x/2.x/XL LoRAs")
    if md.get("ss_v2") == "True":
        return "sd2", "ss_v2=True"
    return None, ""


def refuse_non_lora(header: Header, parsed: ParsedKeys) -> None:
    names = header.names
    where = f"{header.path}: " if header.path else ""
    if not names:
        raise LoraFormatError(f"{where}not a LoRA: the file holds no tensors")
    if any(_SAFELORAS.match(k) for k in names):
        raise LoraFormatError(
            f"{where}this is an old cloneofsimo/lora 'safeloras' file (keys like 'unet:0:up'): it stores modules by "
            "the order they were patched, not by name, so it cannot be placed reliably; no mainstream tool loads it. "
            "Retrain or convert it with cloneofsimo's own scripts (lora_diffusion) to a kohya/diffusers LoRA.")
    for pattern, what in _NON_SD:
        hits = [k for k in names if pattern.search(k)]
        if hits:
            raise LoraFormatError(f"{where}this is a LoRA for {what}, not for SD1.x/SD2.x/SDXL (e.g. key {hits[0]!r}); "
                                  "sdlora only loads Stable Diffusion 1.x/2.x/XL LoRAs")
    ckpt = [k for k in names if k.startswith(_CHECKPOINT)]
    if ckpt:
        raise LoraFormatError(
            f"{where}this is a full model checkpoint, not a LoRA ({len(ckpt)} tensors such as {ckpt[0]!r}); "
            "use it as a base model instead")
    if not parsed.modules:
        top = {k.split(".")[0] for k in names}
        if top <= _TI_KEYS:
            raise LoraFormatError(f"{where}this is a textual-inversion embedding, not a LoRA (keys {sorted(top)}); "
                                  "load it as an embedding")
        if parsed.embeddings and not parsed.unknown:
            return  # embeddings only: read_lora reports the tokens
        if sum(k.endswith((".weight", ".bias")) for k in names) > 0.9 * len(names):
            raise LoraFormatError(f"{where}this looks like full model weights, not a LoRA ({len(names)} tensors such as "
                                  f"{names[0]!r}, none with LoRA parts like lora_down/lora_A/hada_w1_a)")
        raise LoraFormatError(f"{where}not a LoRA: none of its {len(names)} keys (e.g. {names[0]!r}) is a known LoRA key")


# UNet block structure that exists in only one of SD1/SD2 (4 levels, depth 1) or SDXL (3 levels)
_SDXL_ONLY = re.compile(
    r"transformer_blocks[._][1-9]|add_embedding|label_emb|output_blocks[._][0-2][._]1[._](?!conv)|up_blocks[._]0[._]attentions"
    r"|output_blocks[._]2[._]2[._]conv|text_encoder_2\.|^lora_te[12]_|^text_encoders\.clip_g\.")
_SD12_ONLY = re.compile(
    r"down_blocks[._]0[._]attentions|down_blocks[._]3[._]|up_blocks[._]3[._]|up_blocks[._]2[._]attentions"
    r"|input_blocks[._](1|2|9|10|11)[._]|output_blocks[._](9|10|11)[._]|output_blocks[._]2[._]1[._]conv"
    r"|down_blocks[._]2[._]downsamplers|output_blocks[._][6-8][._]1[._]")
_CROSS_KV = re.compile(r"attn2[._]to_[kv]$")
_TE_Q = re.compile(r"(?:^lora_te_|^text_encoder\.|^lycoris_text_model|^text_encoders\.clip_[lh]\.)"
                   r".*?layers[._](\d+)[._]")
_PROJ_IN = re.compile(r"proj_in$")
_CLIP_H = re.compile(r"^text_encoders\.clip_h\.")  # ComfyUI names SD2's OpenCLIP ViT-H text encoder clip_h
# modules every family has, with the same names and (real-size) shapes: they cannot tell families apart
_UNET_PREFIX = r"^(?:lora_unet_|lycoris_(?!text_model)|oft_unet_|unet\.|diffusion_model\.)"
_UNET = re.compile(_UNET_PREFIX)
_TOP_LEVEL = re.compile(_UNET_PREFIX + r"(conv_in|conv_out|conv_norm_out|time_embedding[._]linear_[12]"
                        r"|time_embed[._][02]|input_blocks[._]0[._]0|out[._][02])$")
FAMILY_ORDER = ("sd1", "sd2", "sdxl")


def labels(fams) -> str:
    names = [SD_FAMILIES[f] for f in FAMILY_ORDER if f in fams]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


@dataclass
class FamilyGuess:
    family: str | None          # decided family, or None when the evidence leaves several
    evidence: str               # why, in words
    fits: tuple[str, ...]       # the families the keys and shapes allow (metadata not counted)
    conflict: str = ""          # metadata that contradicts the tensors, in words (for a warning)


def _in_width(shapes: dict[str, tuple]) -> int | None:
    for part in ("down", "hada_w1_b"):
        if part in shapes and len(shapes[part]) >= 2:
            return shapes[part][1]
    return None


def _undecided_why(names: list[str]) -> str:
    """Why names and shapes fit every family: which kind of modules the file holds."""
    unet = [n for n in names if _UNET.search(n)]
    if names and len(unet) == len(names) and all(_TOP_LEVEL.search(n) for n in names):
        return (f"only top-level UNet modules (e.g. {names[0]}), which every family has with the same names "
                "and shapes")
    if names and not unet:
        return f"only text-encoder modules (e.g. {names[0]}) with no width or depth that only one family has"
    return "no module name or shape that only one family has"


def tensor_family(header: Header, parsed: ParsedKeys) -> tuple[tuple[str, ...], str]:
    """(families the keys and shapes fit, why): docs/formats.md "Family detection" without the metadata."""
    names = list(parsed.modules)
    xl = [n for n in names if _SDXL_ONLY.search(n)]
    sd = [n for n in names if _SD12_ONLY.search(n)]
    if xl and len(xl) >= len(sd):
        return ("sdxl",), f"SDXL-only module names (e.g. {xl[0]})"
    votes: dict[str, str] = {}
    for name, mod in parsed.modules.items():
        shapes = {p: header.tensors[k].shape for p, k in mod.keys.items()}
        width = _in_width(shapes)
        if _CROSS_KV.search(name) and width in (768, 1024, 2048):
            votes.setdefault({768: "sd1", 1024: "sd2", 2048: "sdxl"}[width],
                             f"cross-attention input width {width} ({name})")
        m = _TE_Q.search(name)
        if m and int(m[1]) >= 12:
            votes.setdefault("sd2", f"text-encoder layer {m[1]} (SD1 has 12)")
        elif m and name.endswith(("q_proj", "q_proj.weight")) and width in (768, 1024):
            votes.setdefault({768: "sd1", 1024: "sd2"}[width], f"text-encoder width {width}")
        if _CLIP_H.search(name):
            votes.setdefault("sd2", f"ComfyUI clip_h text encoder, SD2's ({name})")
        if _PROJ_IN.search(name) and "down" in shapes:
            votes.setdefault("sd1" if len(shapes["down"]) == 4 else "sd2/sdxl",
                             f"{'conv' if len(shapes['down']) == 4 else 'linear'} proj_in LoRA ({name})")
    if "sdxl" in votes:
        return ("sdxl",), votes["sdxl"]
    sd1, sd2, linear = ("sd1" in votes), ("sd2" in votes), ("sd2/sdxl" in votes)
    if sd1 and not (sd2 or linear):
        return ("sd1",), votes["sd1"]
    if sd2 and not sd1:
        return ("sd2",), votes["sd2"]
    if linear and not sd1 and sd:  # SD1/SD2 block names with a linear proj_in: SD2
        return ("sd2",), f"{votes['sd2/sdxl']} with SD1/SD2 block names"
    if len(votes) > 1:
        return FAMILY_ORDER, "conflicting evidence: " + "; ".join(votes.values())
    if linear:
        return ("sd2", "sdxl"), votes["sd2/sdxl"]
    if sd:
        return ("sd1", "sd2"), f"SD1/SD2-only module names (e.g. {sd[0]}), no shape that tells SD1 from SD2"
    return FAMILY_ORDER, _undecided_why(names)


def detect_family(header: Header, parsed: ParsedKeys) -> FamilyGuess:
    """Keys and shapes decide; metadata (`ss_base_model_version`, modelspec) only picks among the
    families they leave, and a metadata family they rule out is reported as a conflict."""
    fits, why = tensor_family(header, parsed)
    md_fam, md_why = _metadata_family(header.metadata)
    conflict = ""
    if md_fam and md_fam not in fits:
        conflict = (f"its metadata says {SD_FAMILIES[md_fam]} ({md_why}) but its keys and shapes say "
                    f"{labels(fits)} ({why}); going by the keys and shapes")
    if len(fits) == 1:
        return FamilyGuess(fits[0], why, fits, conflict)
    if md_fam in fits:
        return FamilyGuess(md_fam, f"{md_why}; keys and shapes fit {labels(fits)}: {why}", fits)
    return FamilyGuess(None, f"{labels(fits)} fit: {why}", fits, conflict)
