"""Tiny models with the real module structure of SD1.5, SD2.1 and SDXL (small widths, random weights).

The block layout (block types, layers_per_block, which blocks have attention, conv vs linear
proj_in) is that of the real configs in sdlora/configs, so every module name and LDM index is the
real one; only widths, head counts and depths (SDXL transformer depth 10 -> 2) are smaller.

Two forms: components alone (tiny_components, for loading and mixing tests), and complete diffusers
pipelines (tiny_pipeline: the same UNet and text encoders with the real 49,408-token vocabulary so
the real CLIP tokenizer works, a tiny AutoencoderKL with 3 levels (4x downscale, so 32-64 px images
give 8-16 px latents) and a DDPM scheduler with the family's betas and prediction type).
"""
import os
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from sdlora.families import CONFIG_DIR, build_text_encoder, build_unet, load_config
from sdlora.pipelines import EMBEDDED_MODEL

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


# ---------------------------------------------------------------------------------------------
# complete pipelines

# the real tokenizer's ids: <|startoftext|> 49406, <|endoftext|> 49407 (also the pad token)
CLIP_IDS = dict(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
VAE_TINY = dict(block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=1, norm_num_groups=4,
                sample_size=64, scaling_factor=0.5)


def tiny_pipeline_configs(family: str) -> dict[str, dict]:
    cfgs = tiny_configs(family)
    for te in ("text_encoder", "text_encoder_2"):
        if te in cfgs:
            cfgs[te] = dict(cfgs[te], **CLIP_IDS)
    cfgs["vae"] = dict(load_config(family, "vae"), **VAE_TINY)
    return cfgs


def tiny_pipeline(family: str = "sd1", seed: int = 0, prediction_type: str | None = None):
    """A diffusers pipeline of `family` with tiny random weights (deterministic for a seed)."""
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)
    torch.manual_seed(seed)
    cfgs = tiny_pipeline_configs(family)
    comps = {"unet": build_unet(cfgs["unet"], "cpu"), "vae": AutoencoderKL.from_config(cfgs["vae"])}
    for te in ("text_encoder", "text_encoder_2"):
        if te in cfgs:
            comps[te] = build_text_encoder(cfgs[te], "cpu")
    tok = CLIPTokenizer.from_pretrained(str(CONFIG_DIR / "tokenizer"))
    sched = load_config(family, "scheduler")
    sched.pop("_class_name")
    if prediction_type:
        sched["prediction_type"] = prediction_type
    scheduler = DDPMScheduler.from_config(sched)
    for m in comps.values():
        m.eval().requires_grad_(False)
    if family == "sdxl":
        return StableDiffusionXLPipeline(tokenizer=tok, tokenizer_2=tok, scheduler=scheduler, **comps)
    return StableDiffusionPipeline(tokenizer=tok, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False, **comps)


def save_tiny_pipeline(path, family: str = "sd1", seed: int = 0, prediction_type: str | None = None):
    pipe = tiny_pipeline(family, seed, prediction_type)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


TE_COMPS = ("text_encoder", "text_encoder_2")


def probe_inputs(pipe, seed=1):
    """Fixed random inputs for the UNet (and token ids for the text encoders) of a tiny pipeline:
    (sample, timesteps, context, unet kwargs, ids)."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    sample = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    kw = {}
    if cfg.addition_embed_type == "text_time":
        pooled = pipe.text_encoder_2.config.projection_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
    ids = torch.randint(0, 49406, (2, 7), generator=g)
    return sample, torch.tensor([10, 500]), ctx, kw, ids


def probe_outputs(pipe, inputs=None):
    """component -> output on `probe_inputs`: the UNet's prediction, each text encoder's
    penultimate hidden states (what SDXL uses)."""
    sample, t, ctx, kw, ids = inputs or probe_inputs(pipe)
    with torch.no_grad():
        out = {"unet": pipe.unet(sample, t, ctx, **kw).sample}
        for te in TE_COMPS:
            if getattr(pipe, te, None) is not None:
                out[te] = getattr(pipe, te)(ids, output_hidden_states=True).hidden_states[-2]
    return out


# ---------------------------------------------------------------------------------------------
# the embedded model (UI tests): before it existed, SDLORA_TEST_BASE named a folder of its structure

def base_spec() -> str | None:
    """None (the embedded model) when it exists, else $SDLORA_TEST_BASE."""
    if (EMBEDDED_MODEL / "model_index.json").is_file():
        return None
    env = os.environ.get("SDLORA_TEST_BASE")
    if env and (Path(env) / "model_index.json").is_file():
        return env
    pytest.fail(f"no base model for the UI tests: the embedded model {EMBEDDED_MODEL} is missing and "
                "SDLORA_TEST_BASE does not name a diffusers model folder")


def write_image(path, fmt: str, size=(8, 8)):
    """A small red image file in `fmt` (PNG, JPEG, WEBP, BMP)."""
    from PIL import Image
    Image.new("RGB", size, (200, 30, 30)).save(path, format=fmt)
    return path
