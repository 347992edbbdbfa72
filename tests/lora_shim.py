"""TEST-ONLY STAND-IN for `sdlora.formats.read_lora`, used only while the loader is not merged.

It reads exactly what `sdlora.formats.writer.save_lora` writes in kohya format (plain LoRA/LoCon
`lora_down`/`lora_up`/`alpha`/`lora_mid`) and returns the LoraFile contract of the BRIEF. When the
real reader exists, `install(monkeypatch)` does nothing and the tests run against it.
"""
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

import sdlora.formats
from sdlora.adapters import LoRA
from sdlora.errors import FamilyMismatchError, UnmatchedKeysError
from sdlora.families import FAMILIES, get_family, kohya_name, module_table

_BY_VERSION = {f.ss_base_model_version: f.name for f in FAMILIES.values()}


@dataclass
class ShimLoraFile:
    patches: dict
    family: str
    format: str = "kohya"
    metadata: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)
    unmatched: list = field(default_factory=list)
    path: str | None = None


def read_lora(path, *, family=None, configs=None, allow_partial=False):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    file_family = _BY_VERSION.get(meta.get("ss_base_model_version"))
    if family and file_family and family != file_family:
        raise FamilyMismatchError(f"{path} is a {get_family(file_family).label} LoRA, the model is "
                                  f"{get_family(family).label}")
    family = family or file_family
    configs = configs or {}
    table = module_table(family, configs)
    names = {kohya_name(p, family, configs.get("unet")): p for p in table}
    groups = {}
    for key, t in tensors.items():
        module, _, suffix = key.partition(".")
        groups.setdefault(module, {})[suffix] = t
    patches, unmatched = {}, []
    for module, g in groups.items():
        if module not in names:
            unmatched += [f"{module}.{s}" for s in g]
            continue
        alpha = g.get("alpha")
        ad = LoRA(g["lora_up.weight"], g["lora_down.weight"], g.get("lora_mid.weight"),
                  alpha=None if alpha is None else float(alpha.float()))
        if not ad.target_shape_ok(table[names[module]].shape):
            raise UnmatchedKeysError(f"{module}: does not fit {table[names[module]].shape}")
        patches[names[module]] = ad
    if unmatched and not allow_partial:
        raise UnmatchedKeysError(f"unmatched keys: {unmatched[:5]}")
    return ShimLoraFile(patches, family, metadata=meta, unmatched=unmatched, path=str(path))


def install(monkeypatch):
    """Make `sdlora.formats.read_lora` exist for the test (real one preferred)."""
    if not hasattr(sdlora.formats, "read_lora"):
        monkeypatch.setattr(sdlora.formats, "read_lora", read_lora, raising=False)


def random_lora(comps, paths, rank=4, seed=0, alpha=None, scale=0.1):
    """Plain LoRA adapters for `paths` of live components (conv targets get LoCon shapes)."""
    from sdlora.families import live_path
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
