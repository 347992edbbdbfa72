"""What a mix is and where it goes: entries, the target model, and each module's recipe.

A mix is a list of MixEntry (a LoRA file and its multipliers). Planning turns it into, for every
canonical module path, the recipe ((adapter, strength), ...) in entry order, where the strength is
the entry's UNet or text-encoder multiplier (A1111 `unet_multiplier` / `te_multiplier`) times its
block weight. Mixer (patching), Router (per-sample routing), `mix` and `fuse` share this, and
check_fit refuses a mix that does not fit the model before any of them changes anything.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sdlora.blocks import BlockSpec, block_weight, parse_lbw
from sdlora.errors import FamilyMismatchError, LoraFormatError, SdloraError, UnmatchedKeysError
from sdlora.families import COMPONENTS, get_family, live_path, load_config
from sdlora.fusion import Recipe
from sdlora.lora_cache import LoraCache


@dataclass(frozen=True)
class MixEntry:
    """One LoRA of a mix: a file path (or an already-read LoraFile) and its multipliers.

    `unet`/`text_encoder` are A1111's unet/te multipliers (text_encoder covers both SDXL encoders);
    `blocks` are LoRA Block Weight values (preset name, 12/17/20/26 numbers, or {slot: weight}).
    """
    source: Any
    unet: float = 1.0
    text_encoder: float = 1.0
    blocks: BlockSpec | None = None

    @classmethod
    def parse(cls, spec: str, **kwargs) -> MixEntry:
        """From a `--lora` argument: `PATH[:WEIGHT]` (UNet and text encoder alike) or `PATH:TE:UNET`."""
        from sdlora.extra_networks import split_lora_arg
        path, te, unet = split_lora_arg(spec)
        return cls(path, unet=unet, text_encoder=te, **kwargs)

    @classmethod
    def of(cls, ref) -> MixEntry:
        """From an extra_networks.LoraRef (a `<lora:…>` tag or `--lora` argument with its file)."""
        return cls(str(ref.path), unet=ref.unet, text_encoder=ref.te, blocks=ref.blocks)

    @property
    def name(self) -> str:
        src = getattr(self.source, "path", None) or self.source
        return Path(src).name if isinstance(src, (str, os.PathLike)) else type(src).__name__


@dataclass
class Target:
    """What a mix is applied to: the family and each component's config (for names and shapes)."""
    family: str
    configs: dict[str, dict]

    @property
    def unet_config(self) -> dict:
        return self.configs.get("unet") or load_config(self.family, "unet")


def load_sources(entries: Sequence[MixEntry], family: str | None, configs: dict | None,
                 cache: LoraCache) -> list:
    """Each entry's LoraFile (read through the cache), checked to be of one family."""
    loras = []
    for e in entries:
        lora = e.source if hasattr(e.source, "patches") else cache.get(e.source, family, configs)
        fam = getattr(lora, "family", None)
        if family is None:
            family = fam
        elif fam is not None and fam != family:
            raise FamilyMismatchError(f"{e.name} is a {get_family(fam).label} LoRA but the model is "
                                      f"{get_family(family).label}; use a LoRA made for {get_family(family).label}")
        loras.append(lora)
    return loras


def strengths(entry: MixEntry, lora, unet_config) -> dict[str, float]:
    """Effective strength of each module of one entry (multiplier × block weight), zeros left out."""
    lbw = parse_lbw(entry.blocks) if entry.blocks is not None else None
    out = {}
    for path in lora.patches:
        s = float(entry.unet if path.startswith("unet.") else entry.text_encoder)
        if lbw is not None:
            s *= block_weight(lbw, path, unet_config)
        if s != 0.0:
            out[path] = s
    return out


def plan(entries: Sequence[MixEntry], loras: Sequence, unet_config) -> dict[str, Recipe]:
    """canonical path -> ((adapter, strength), ...) over all entries, in entry order."""
    for e in entries:
        for v in (e.unet, e.text_encoder):
            if not math.isfinite(float(v)):
                raise SdloraError(f"{e.name}: multiplier {v!r} is not a finite number")
    recipes: dict[str, list] = {}
    for e, lora in zip(entries, loras):
        for path, s in strengths(e, lora, unet_config).items():
            recipes.setdefault(path, []).append((lora.patches[path], s))
    return {p: tuple(r) for p, r in recipes.items()}


def check_fit(entries: Sequence[MixEntry], loras: Sequence, shape_of: Callable[[str], tuple | None],
              components: Sequence[str], unet_config) -> None:
    """Raise before anything changes if a module is missing from the target or does not fit it."""
    for e, lora in zip(entries, loras):
        active = strengths(e, lora, unet_config)
        missing, misfit = [], []
        absent = sorted({p.partition(".")[0] for p in active} - set(components))
        if absent:
            raise SdloraError(f"{e.name} has {'/'.join(absent)} modules but the model has no {'/'.join(absent)}; "
                              "load a model with it or set that multiplier to 0")
        for path, ad in lora.patches.items():
            problem = ad.shape_problem() if hasattr(ad, "shape_problem") else None
            if problem:   # adapters built in code, not read from a file, are checked here
                raise LoraFormatError(f"{e.name}: {path}: {problem}; nothing was changed")
            if path.partition(".")[0] not in components:
                continue
            shape = shape_of(path)
            if shape is None:
                missing.append(path)
            elif not ad.target_shape_ok(tuple(shape)):
                misfit.append(f"{path} (model weight {tuple(shape)})")
        for bad, what in ((missing, "not found in the model"), (misfit, "do not fit the model's weight shape")):
            if bad:
                raise UnmatchedKeysError(
                    f"{e.name}: {len(bad)} module(s) {what}: {', '.join(bad[:8])}{' …' if len(bad) > 8 else ''}. "
                    "The LoRA was probably made for another model (family or size); nothing was changed")


def component_configs(components: Mapping[str, torch.nn.Module]) -> dict[str, dict]:
    """component -> config dict (the form of sdlora/configs/<family>/<component>/config.json)."""
    out = {}
    for comp, model in components.items():
        if comp == "unet":
            out[comp] = dict(model.config)
        else:
            out[comp] = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    return out


def components_of(obj) -> dict[str, torch.nn.Module]:
    """The components of a diffusers pipeline (or a dict of them) a mix can touch, by name."""
    if isinstance(obj, Mapping):
        unknown = set(obj) - set(COMPONENTS)
        if unknown:
            raise SdloraError(f"unknown component(s) {sorted(unknown)}; expected some of {', '.join(COMPONENTS)}")
        found = {k: v for k, v in obj.items() if v is not None}
    else:
        found = {k: getattr(obj, k) for k in COMPONENTS if getattr(obj, k, None) is not None}
    if not found:
        raise SdloraError(f"{type(obj).__name__} has none of {', '.join(COMPONENTS)}; pass a diffusers pipeline "
                          "or a dict of its components")
    return found


def find_module(components: Mapping[str, torch.nn.Module], path: str) -> torch.nn.Module | None:
    """The live module at a canonical path, or None when absent or without a real weight."""
    comp = components[path.partition(".")[0]]
    try:
        mod = comp.get_submodule(live_path(comp, path))
    except AttributeError:
        return None
    w = getattr(mod, "weight", None)
    return mod if isinstance(w, torch.Tensor) and not w.is_meta else None
