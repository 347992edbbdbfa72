"""The model families (SD1.x, SD2.x, SDXL): their components, configs and module names.

Canonical module names are the names LoRA files use, not whatever the installed libraries call
things today:
  * UNet: diffusers `UNet2DConditionModel` names (`down_blocks.0.attentions.0.proj_in`), with an
    LDM/SGM alias for every module (`input_blocks.1.1.proj_in`) because kohya's SDXL trainer and
    single-file checkpoints use those;
  * text encoders: transformers 4.x `CLIPTextModel` names (`text_model.encoder.layers.0...`).
    transformers 5.x dropped the `text_model.` level from CLIPTextModel; `live_path` maps back.
A canonical path is `<component>.<module name>`, e.g. `text_encoder_2.text_model.final_layer_norm`.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet",) + TEXT_ENCODERS


@dataclass(frozen=True)
class Family:
    name: str                       # "sd1" | "sd2" | "sdxl"
    label: str                      # what users call it
    text_encoders: tuple[str, ...]  # diffusers component names
    cross_attention_dim: int        # width of the UNet's cross-attention context
    te_widths: tuple[int, ...]      # hidden size of each text encoder
    ss_base_model_version: str      # kohya's `ss_base_model_version`
    modelspec_architecture: str     # SAI modelspec `modelspec.architecture` of a LoRA

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet",) + self.text_encoders

    def kohya_prefix(self, component: str) -> str:
        """The prefix kohya/A1111 put before module names of this component."""
        if component == "unet":
            return "lora_unet_"
        if len(self.text_encoders) == 1:
            return "lora_te_"
        return "lora_te1_" if component == "text_encoder" else "lora_te2_"


FAMILIES = {
    "sd1": Family("sd1", "SD1.x", ("text_encoder",), 768, (768,), "sd_v1", "stable-diffusion-v1/lora"),
    "sd2": Family("sd2", "SD2.x", ("text_encoder",), 1024, (1024,), "sd_v2",
                  "stable-diffusion-v2-768-v/lora"),
    "sdxl": Family("sdxl", "SDXL", ("text_encoder", "text_encoder_2"), 2048, (768, 1280),
                   "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}") from None


def load_config(family: str, component: str) -> dict:
    """The real-size config of a component as shipped in sdlora/configs/<family>/."""
    sub = "scheduler/scheduler_config.json" if component == "scheduler" else f"{component}/config.json"
    return json.loads((CONFIG_DIR / family / sub).read_text())


def family_of_unet_config(config) -> str:
    """Which family a UNet2DConditionModel config belongs to (by its conditioning)."""
    cfg = dict(config)
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    if cfg.get("use_linear_projection"):
        return "sd2"
    return "sd1"


# ---------------------------------------------------------------------------------------------
# building components from configs (meta device for name/shape tables, real for tests)

def build_unet(config: dict, device="meta"):
    from diffusers import UNet2DConditionModel
    with torch.device(device):
        return UNet2DConditionModel.from_config(config)


def build_text_encoder(config: dict, device="meta"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = {k: v for k, v in config.items() if k != "architectures"}
    cls = CLIPTextModelWithProjection if "WithProjection" in config.get("architectures", [""])[0] else CLIPTextModel
    with torch.device(device):
        return cls(CLIPTextConfig(**cfg))


def build_component(family: str, component: str, config: dict | None = None, device="meta"):
    config = config if config is not None else load_config(family, component)
    return build_unet(config, device) if component == "unet" else build_text_encoder(config, device)


# ---------------------------------------------------------------------------------------------
# canonical <-> live names

def _flattened_clip(model) -> bool:
    """True for transformers>=5 CLIPTextModel, which has no `text_model` level."""
    return type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model")


def clip_layouts(name: str) -> tuple[str, ...]:
    """A CLIP text-encoder module name as given, then in the other layout: transformers 4 nests the
    model under `text_model.`, transformers 5 does not (`text_projection` is outside it in both).
    Files name modules either way; canonical names always have the level."""
    if name.startswith("text_model."):
        return name, name[len("text_model."):]
    if not name or name.startswith("text_projection"):
        return (name,)
    return name, "text_model." + name


def canonical_name(component: str, model, live_name: str) -> str:
    """Canonical path of a live module name of `model` (the `component` of a pipeline)."""
    if component != "unet" and _flattened_clip(model):
        live_name = "text_model." + live_name if live_name else "text_model"
    return f"{component}.{live_name}"


def live_path(model, canonical_path: str) -> str:
    """Module name inside the live component model for a canonical path (component stripped)."""
    _, _, name = canonical_path.partition(".")
    if _flattened_clip(model) and name.startswith("text_model."):
        name = name[len("text_model."):]
    return name


def canonical_modules(component: str, model) -> dict[str, torch.nn.Module]:
    """Every Linear/Conv2d of a live (or meta) component, by canonical path."""
    return {canonical_name(component, model, n): m for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@dataclass(frozen=True)
class ModuleInfo:
    shape: tuple[int, ...]   # weight shape
    has_bias: bool


NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding)


def module_table(family: str, configs: dict[str, dict] | None = None, *,
                 include_norms: bool = False) -> dict[str, ModuleInfo]:
    """Canonical path -> weight shape for every Linear/Conv2d of a family's components.

    `configs` (component -> config) overrides the real-size configs, e.g. for a tiny model.
    `include_norms` adds GroupNorm/LayerNorm/Embedding modules (targets of full and norm diffs).
    """
    configs = configs or {}
    key = json.dumps({c: configs.get(c) for c in get_family(family).components}, sort_keys=True)
    return _module_table(family, key, include_norms)


@functools.lru_cache(maxsize=16)
def _module_table(family: str, configs_json: str, include_norms: bool = False) -> dict[str, ModuleInfo]:
    configs = json.loads(configs_json)
    table = {}
    for comp in get_family(family).components:
        model = build_component(family, comp, configs.get(comp))
        for path, mod in canonical_modules(comp, model).items():
            table[path] = ModuleInfo(tuple(mod.weight.shape), mod.bias is not None)
        if include_norms:
            for n, mod in model.named_modules():
                if isinstance(mod, NORM_TYPES) and getattr(mod, "weight", None) is not None:
                    table[canonical_name(comp, model, n)] = ModuleInfo(tuple(mod.weight.shape),
                                                                       getattr(mod, "bias", None) is not None)
    return table


# ---------------------------------------------------------------------------------------------
# diffusers <-> LDM/SGM UNet names (docs/formats.md "UNet names")

_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LDM = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return _RESNET_LDM.get(head, head) + ("." + rest if rest else "")


def ldm_unet_name(name: str, config) -> str | None:
    """LDM/SGM name (`input_blocks.4.1.proj_in`) of a diffusers UNet module name, or None."""
    cfg = dict(config)
    for d, ldm in _TOP_LDM.items():
        if name == d or name.startswith(d + "."):
            return ldm + name[len(d):]
    layers = cfg.get("layers_per_block", 2)
    per = layers + 1  # LDM blocks per diffusers down block (resnets/attentions + downsampler)
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?$", name)
    if m:
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4] or ""
        if kind == "downsamplers":
            return f"input_blocks.{per * (i + 1)}.0.op" if tail == "conv" else None
        base = f"input_blocks.{1 + per * i + j}"
        return f"{base}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"{base}.1.{tail}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$", name)
    if m:
        kind, j, tail = m[1], int(m[2]), m[3] or ""
        if kind == "attentions":
            return f"middle_block.1.{tail}"
        return f"middle_block.{2 * j}.{_resnet_tail(tail)}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?$", name)
    if m:
        i, kind, j, tail = int(m[1]), m[2], int(m[3]), m[4] or ""
        per_up = layers + 1  # up blocks have one more resnet than down blocks
        if kind == "upsamplers":
            has_attn = "CrossAttn" in cfg["up_block_types"][i]
            return f"output_blocks.{per_up * i + per_up - 1}.{2 if has_attn else 1}.{tail}"
        base = f"output_blocks.{per_up * i + j}"
        return f"{base}.0.{_resnet_tail(tail)}" if kind == "resnets" else f"{base}.1.{tail}"
    return None


def ldm_block_slot(ldm_name: str) -> str | None:
    """A1111 "LoRA Block Weight" slot (IN00..IN11, M00, OUT00..OUT11) of an LDM UNet name."""
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)", ldm_name)
    if not m:
        return None  # time embedding, conv_out, ...: not in any block
    if m[1] == "middle_block":
        return "M00"
    return ("IN" if m[1] == "input_blocks" else "OUT") + f"{int(m[2]):02d}"


def block_slot(canonical_path: str, unet_config) -> str | None:
    """Block-weight slot of a canonical module path: BASE for text encoders, IN/M/OUT for UNet."""
    comp, _, name = canonical_path.partition(".")
    if comp in TEXT_ENCODERS:
        return "BASE"
    ldm = ldm_unet_name(name, unet_config)
    return ldm_block_slot(ldm) if ldm else None


def kohya_name(canonical_path: str, family: str, unet_config=None, ldm: bool | None = None) -> str:
    """kohya/A1111 module name of a canonical path.

    SDXL UNet modules get LDM/SGM names (as kohya's SDXL trainer writes them) unless ldm=False;
    SD1/SD2 UNet modules get diffusers names, as kohya writes them.
    """
    fam = get_family(family)
    comp, _, name = canonical_path.partition(".")
    if comp == "unet" and (ldm if ldm is not None else family == "sdxl"):
        name = ldm_unet_name(name, unet_config or load_config(family, "unet")) or name
    return fam.kohya_prefix(comp) + name.replace(".", "_")
