"""Tiny but complete SD1/SD2/SDXL pipelines for trainer tests: tests/tiny.py's UNet and text
encoders (with the real 49,408-token vocabulary so the real CLIP tokenizer works), a tiny
AutoencoderKL (3 levels: 4x downscale, so 32-64 px images give 8-16 px latents) and a DDPM
scheduler with the family's betas and prediction type.
"""
import torch
from transformers import CLIPTokenizer

from sdlora.families import CONFIG_DIR, build_text_encoder, build_unet, load_config
from tiny import tiny_configs

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
