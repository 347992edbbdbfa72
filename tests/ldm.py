"""Build single-file checkpoints in the original LDM/SGM key layout from diffusers/transformers
components, as A1111/Civitai files are laid out (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.transformer.*` (CLIP-L), `cond_stage_model.model.*` (OpenCLIP), SDXL's
`conditioner.embedders.{0,1}.*`).

The UNet names come from sdlora.families.ldm_unet_name; the VAE and text-encoder names are written
out here from the LDM/OpenCLIP module layouts. Nothing here is trusted on its own: the tests load the
files with diffusers' own LDM->diffusers converters and require every tensor back unchanged, which
checks this layout independently.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from sdlora.families import CONFIG_DIR, build_text_encoder, build_unet, load_config, ldm_unet_name

PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
TE_PREFIX = {
    ("sd1", "text_encoder"): "cond_stage_model.transformer.",
    ("sd2", "text_encoder"): "cond_stage_model.model.",
    ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.",
    ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
}
OPENCLIP = {("sd2", "text_encoder"), ("sdxl", "text_encoder_2")}


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    out = {}
    for mod_name, mod in unet.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            ldm = ldm_unet_name(mod_name, unet.config)
            assert ldm is not None, f"no LDM name for UNet module {mod_name}"
            out[PREFIX["unet"] + ldm + "." + p_name] = p.detach()
    return out


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n_up = len(vae.config.up_block_types)
    out = {}
    for name, t in vae.state_dict().items():
        new = name
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out", r"\1.norm_out", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d+)", lambda m: f".mid.block_{int(m[1]) + 1}", new)
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", new)
        if m:
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if t.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                t = t[:, :, None, None]
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample", new)
        new = re.sub(r"\.conv_shortcut\.", ".nin_shortcut.", new)
        out[PREFIX["vae"] + new] = t.detach()
    return out


def _text_model_state(te) -> dict[str, torch.Tensor]:
    """State dict with transformers 4.x names (text_model.*) whatever the installed version."""
    sd = te.state_dict()
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def clip_to_ldm(te, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach() for k, v in _text_model_state(te).items() if not k.startswith("text_projection")}


def openclip_to_ldm(te, prefix: str) -> dict[str, torch.Tensor]:
    sd = _text_model_state(te)
    width = te.config.hidden_size
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           # OpenCLIP computes x @ text_projection: (width, proj); SD2 files carry one too
           prefix + "text_projection": sd["text_projection.weight"].T.contiguous() if "text_projection.weight" in sd
           else torch.randn(width, width)}
    for i in range(te.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.in_proj_{part}"] = torch.cat([sd[src + f"self_attn.{x}_proj.{part}"] for x in "qkv"])
            out[dst + f"attn.out_proj.{part}"] = sd[src + f"self_attn.out_proj.{part}"]
            out[dst + f"ln_1.{part}"] = sd[src + f"layer_norm1.{part}"]
            out[dst + f"ln_2.{part}"] = sd[src + f"layer_norm2.{part}"]
            out[dst + f"mlp.c_fc.{part}"] = sd[src + f"mlp.fc1.{part}"]
            out[dst + f"mlp.c_proj.{part}"] = sd[src + f"mlp.fc2.{part}"]
    return {k: v.detach() for k, v in out.items()}


def to_ldm(family: str, components: dict) -> dict[str, torch.Tensor]:
    """One LDM/SGM state dict from {"unet", "vae", "text_encoder"[, "text_encoder_2"]} modules."""
    sd = {**unet_to_ldm(components["unet"]), **vae_to_ldm(components["vae"])}
    for comp in ("text_encoder", "text_encoder_2"):
        if comp in components:
            prefix = TE_PREFIX[(family, comp)]
            convert = openclip_to_ldm if (family, comp) in OPENCLIP else clip_to_ldm
            sd.update(convert(components[comp], prefix))
    return sd


# ---------------------------------------------------------------------------------------------
# tiny components + a config root (one folder per family) describing them

def tiny_vae_config(family: str) -> dict:
    cfg = load_config(family, "vae")
    cfg.update(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, layers_per_block=1, sample_size=16)
    return cfg


def tiny_model(family: str, seed: int = 0) -> tuple[dict, dict]:
    """(configs, modules) of a tiny model of `family`, VAE included."""
    from diffusers import AutoencoderKL
    from tiny import tiny_configs
    configs = dict(tiny_configs(family), vae=tiny_vae_config(family))
    torch.manual_seed(seed)
    modules = {}
    for comp, cfg in configs.items():
        if comp == "unet":
            modules[comp] = build_unet(cfg, "cpu")
        elif comp == "vae":
            modules[comp] = AutoencoderKL.from_config(cfg)
        else:
            modules[comp] = build_text_encoder(cfg, "cpu")
    for m in modules.values():
        with torch.no_grad():  # norms init to exactly 1/0: perturb so a swapped tensor shows
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        m.eval().requires_grad_(False)
    return configs, modules


def config_root(tmp: Path, family: str, configs: dict) -> Path:
    """A copy of sdlora/configs with `family`'s component configs replaced by `configs`."""
    root = Path(tmp) / "configs"
    if not root.exists():
        shutil.copytree(CONFIG_DIR, root, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    for comp, cfg in configs.items():
        (root / family / comp / "config.json").write_text(json.dumps(cfg))
    return root
