"""Shared helpers of the mixing/merge tests: cached tiny models, LoRA files, diffusers reference."""
import copy
import functools

import torch

from sdlora.families import canonical_modules, get_family, live_path
from sdlora.adapters import LoRA
from sdlora.formats.reader import LoraFile
from sdlora.formats.writer import save_lora
from tiny import lora_pipeline, tiny_components, tiny_configs


@functools.lru_cache(maxsize=None)
def _pristine(family: str):
    return tiny_components(family)


def components(family: str, dtype=torch.float32) -> dict:
    """A fresh copy of the tiny model of `family` (built once per session)."""
    comps = copy.deepcopy(_pristine(family))
    return {k: v.to(dtype) for k, v in comps.items()} if dtype != torch.float32 else comps


def modules(comps) -> dict:
    out = {}
    for comp, model in comps.items():
        out.update(canonical_modules(comp, model))
    return out


def attention_paths(comps) -> list[str]:
    """What a default kohya LoRA targets: UNet attention projections + text-encoder attention/MLP."""
    return [p for p in modules(comps)
            if (p.startswith("unet.") and ".transformer_blocks." in p and (".to_" in p or ".ff." in p))
            or (not p.startswith("unet.") and ".encoder.layers." in p)]


def weight(comps, path) -> torch.Tensor:
    comp = comps[path.split(".")[0]]
    return comp.get_submodule(live_path(comp, path)).weight


def write(path, patches, family, configs=None):
    """A kohya file (as kohya/A1111 name things) with kohya's base-model metadata."""
    configs = tiny_configs(family) if configs is None else configs   # {}: the real-size model
    save_lora(path, patches, family, unet_config=configs.get("unet"),
              metadata={"ss_base_model_version": get_family(family).ss_base_model_version})
    return str(path)


def state(comps) -> dict:
    return {f"{c}.{k}": v.detach().clone() for c, m in comps.items() for k, v in m.state_dict().items()}


def diffusers_fuse(family, comps, files_and_weights):
    """Reference: diffusers load_lora_weights ×n + set_adapters(per-component weights) + fuse_lora."""
    pipe = lora_pipeline(family, comps)
    names = []
    for i, (f, _) in enumerate(files_and_weights):
        pipe.load_lora_weights(f, adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, adapter_weights=[w for _, w in files_and_weights])
    pipe.fuse_lora(components=list(comps), adapter_names=names)
    pipe.unload_lora_weights()
    return comps


def pipeline_folder(family, path, dtype=torch.float32, seed=0):
    """A complete tiny diffusers pipeline saved at `path` (tiny VAE, real CLIP tokenizer files)."""
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline)
    from transformers import CLIPTokenizer

    from sdlora.families import CONFIG_DIR, load_config
    comps = components(family)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                        layers_per_block=1).eval()
    tok = CLIPTokenizer.from_pretrained(CONFIG_DIR / "tokenizer")
    sched = PNDMScheduler.from_config(load_config(family, "scheduler"))
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=comps["text_encoder"], text_encoder_2=comps["text_encoder_2"],
                                         tokenizer=tok, tokenizer_2=tok, unet=comps["unet"], scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=comps["text_encoder"], tokenizer=tok, unet=comps["unet"],
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to(dtype)
    pipe.save_pretrained(path)
    return path


def random_lora(comps, paths, rank=4, seed=0, alpha=None, scale=0.1):
    """Plain LoRA adapters for `paths` of live components (conv targets get LoCon shapes)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in paths:
        comp = comps[path.split(".")[0]]
        w = comp.get_submodule(live_path(comp, path)).weight
        if w.dim() == 4:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * scale
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * scale
        else:
            down = torch.randn(rank, w.shape[1], generator=g) * scale
            up = torch.randn(w.shape[0], rank, generator=g) * scale
        out[path] = LoRA(up, down, alpha=alpha if alpha is not None else rank / 2)
    return out


def lora_file(patches, family) -> LoraFile:
    """An in-memory LoraFile (what read_lora returns) for adapters built by a test."""
    return LoraFile(patches, family, format="kohya")
