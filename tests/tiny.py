"""Tiny models with the real module structure of SD1.5, SD2.1 and SDXL (small widths, random weights).

The block layout (block types, layers_per_block, which blocks have attention, conv vs linear
proj_in) is that of the real configs in sdlora/configs, so every module name and LDM index is the
real one; only widths, head counts and depths (SDXL transformer depth 10 -> 2) are smaller.
"""
import torch

from sdlora.families import build_text_encoder, build_unet, load_config

CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def tiny_configs(family: str) -> dict[str, dict]:
    """component -> config for a tiny model of `family`."""
    unet = load_config(family, "unet")
    te = dict(load_config(family, "text_encoder"), **CLIP_TINY)
    if family == "sdxl":
        te2 = dict(load_config(family, "text_encoder_2"), **CLIP_TINY)
        te2.update(hidden_size=48, intermediate_size=96, projection_dim=32)
        unet.update(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], cross_attention_dim=80,
                    transformer_layers_per_block=[1, 2, 2], addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8, sample_size=8)
        return {"unet": unet, "text_encoder": te, "text_encoder_2": te2}
    unet.update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32, norm_num_groups=8, sample_size=8,
                attention_head_dim=8 if family == "sd1" else [2, 4, 4, 4])
    return {"unet": unet, "text_encoder": te}


def tiny_components(family: str, seed: int = 0, dtype=torch.float32) -> dict:
    """component -> randomly initialised module (deterministic for a seed)."""
    torch.manual_seed(seed)
    out = {}
    for comp, cfg in tiny_configs(family).items():
        model = build_unet(cfg, "cpu") if comp == "unet" else build_text_encoder(cfg, "cpu")
        out[comp] = model.to(dtype=dtype).eval().requires_grad_(False)
    return out


def lora_pipeline(family: str, comps: dict):
    """A diffusers pipeline around tiny components, for LoRA loading only (no VAE/tokenizer/scheduler)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if family == "sdxl":
        return StableDiffusionXLPipeline(vae=None, text_encoder=comps["text_encoder"], text_encoder_2=comps["text_encoder_2"],
                                         tokenizer=None, tokenizer_2=None, unet=comps["unet"], scheduler=None)
    return StableDiffusionPipeline(vae=None, text_encoder=comps["text_encoder"], tokenizer=None, unet=comps["unet"],
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
