"""LoRAs for tests: random adapters for tiny (or real-size) models, LoRA files, and diffusers' own
load+fuse as the reference they are checked against."""
import copy
import functools
from pathlib import Path

import torch

from sdlora.families import canonical_modules, get_family, live_path, module_table
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
    """The live weight at a canonical path (under a PEFT wrapper, its base layer's)."""
    comp = comps[path.split(".")[0]]
    mod = comp.get_submodule(live_path(comp, path))
    return (mod.base_layer if hasattr(mod, "base_layer") else mod).weight


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


# ---------------------------------------------------------------------------------------------
# references: diffusers' own load + fuse

def table(family):
    """Canonical path -> ModuleInfo for every Linear/Conv2d/norm/embedding of the tiny model."""
    return module_table(family, tiny_configs(family), include_norms=True)


def linear_conv(family):
    """Canonical path -> ModuleInfo for every Linear/Conv2d of the tiny model."""
    return module_table(family, tiny_configs(family))


def lora_pair(shape, rank, g, dtype=torch.float32):
    out, inn, k = shape[0], shape[1], tuple(shape[2:])
    down = torch.randn(rank, inn, *k, generator=g) * 0.5
    up = torch.randn(out, rank, *([1, 1] if k else []), generator=g) * 0.5
    return up.to(dtype), down.to(dtype)


def diffusers_deltas(family, lora_path):
    """canonical path -> ΔW that diffusers' load_lora_weights + fuse_lora apply to the tiny model."""
    comps = tiny_components(family)
    before = {p: weight(comps, p).detach().clone() for p in linear_conv(family)}
    pipe = lora_pipeline(family, comps)
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora(components=list(comps))
    out = {}
    for p, w0 in before.items():
        d = weight(comps, p).detach() - w0
        if d.abs().max() > 0:
            out[p] = d
    return out, before


def assert_matches_diffusers(lf, family, lora_path, tol=1e-4):
    ref, base = diffusers_deltas(family, lora_path)
    assert set(ref) == set(lf.patches), (set(ref) ^ set(lf.patches))
    for p, ad in lf.patches.items():
        torch.testing.assert_close(ad.delta(base[p]), ref[p], rtol=tol, atol=tol, msg=p)


# ---------------------------------------------------------------------------------------------
# LoRA files for a model given by its configs (the UI tests' embedded model)

ATTN = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def lora_patches(family: str, configs: dict, *, seed: int, rank: int = 4, scale: float = 0.3) -> dict:
    """Random plain LoRAs on every attention projection (UNet and text encoders) of a model."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, info in module_table(family, configs).items():
        if path.rsplit(".", 1)[-1] in ATTN or path.endswith("to_out.0"):
            o, i = info.shape[0], info.shape[1]
            out[path] = LoRA(torch.randn(o, rank, generator=g) * scale, torch.randn(rank, i, generator=g) * scale,
                             alpha=float(rank))
    return out


def write_lora(path: Path, family: str, configs: dict, *, seed: int, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, lora_patches(family, configs, seed=seed), family, metadata=metadata or {},
              unet_config=configs.get("unet"))
    return path


def write_sdxl_lora(path: Path) -> Path:
    """A LoRA with SDXL key names (kohya lora_te1_/lora_te2_/lora_unet_ SGM spelling): the wrong family
    for an SD1 base."""
    return write_lora(path, "sdxl", tiny_configs("sdxl"), seed=99, metadata={"ss_base_model_version": "sdxl_base_v1-0"})


def lora_delta(tensors: dict, name: str) -> torch.Tensor:
    """ΔW of one kohya module straight from a file's tensors: (alpha / rank) · up @ down."""
    up, down = tensors[f"{name}.lora_up.weight"].float(), tensors[f"{name}.lora_down.weight"].float()
    rank = down.shape[0]
    alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
    return (alpha / rank) * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))
