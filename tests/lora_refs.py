"""Helpers for format tests: random LoRA tensors for tiny models, and diffusers' own load+fuse as reference."""
import torch

from sdlora.families import live_path, module_table
from tiny import lora_pipeline, tiny_components, tiny_configs


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


def weight_of(comps, path):
    comp = comps[path.split(".")[0]]
    mod = comp.get_submodule(live_path(comp, path))
    return (mod.base_layer if hasattr(mod, "base_layer") else mod).weight


def diffusers_deltas(family, lora_path):
    """canonical path -> ΔW that diffusers' load_lora_weights + fuse_lora apply to the tiny model."""
    comps = tiny_components(family)
    before = {p: weight_of(comps, p).detach().clone() for p in linear_conv(family)}
    pipe = lora_pipeline(family, comps)
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora(components=list(comps))
    out = {}
    for p, w0 in before.items():
        d = weight_of(comps, p).detach() - w0
        if d.abs().max() > 0:
            out[p] = d
    return out, before


def assert_matches_diffusers(lf, family, lora_path, tol=1e-4):
    ref, base = diffusers_deltas(family, lora_path)
    assert set(ref) == set(lf.patches), (set(ref) ^ set(lf.patches))
    for p, ad in lf.patches.items():
        torch.testing.assert_close(ad.delta(base[p]), ref[p], rtol=tol, atol=tol, msg=p)
