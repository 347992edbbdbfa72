"""Apply several weighted LoRAs to a live model by patching its weights, and restore them bit-exactly.

W' = W0 + Σ_k s_k·ΔW_k for additive adapters (in entry order), then the non-additive ones (DoRA)
in entry order on top of that, always starting from the pristine W0. s_k is the entry's UNet or
text-encoder multiplier (A1111 `unet_multiplier` / `te_multiplier`) times its block weight.
Computation is fp32 on the weight's device; the result is cast to the weight's dtype and becomes
the parameter's data (same Parameter object, no hooks), so inference runs the unmodified forward
at base speed.

Only weights a mix touches are backed up. When the backup lives on the weight's device (CPU
models; `backup_device=None`), the base tensor itself is kept and the patched weight gets new
memory, so neither apply nor restore copies the base (ComfyUI does the same). For a CUDA model
the default keeps a CPU copy instead (A1111's choice), so a mix costs no extra VRAM.
Changing a mix rewrites only the modules whose list of (adapter, strength) changed; the result is
always what a fresh apply onto the base would give, whatever the history. LoRA files are parsed
once and kept in a bounded CPU cache (sdlora.lora_cache); planning is sdlora.mixplan, the weight
math sdlora.fusion. MixEntry and LoraCache are importable from here too: they are this API's types.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdlora.errors import SdloraError
from sdlora.families import family_of_unet_config, get_family
from sdlora.fusion import bias_deltas, fused_bias, fused_weight
from sdlora.lora_cache import DEFAULT_CACHE, LoraCache
from sdlora.mixplan import (MixEntry, Recipe, Target, check_fit, component_configs, components_of, find_module,
                            load_sources, plan)

__all__ = ["LoraCache", "MixEntry", "MixResult", "Mixer", "mixer_for", "patched_mixer"]


def _copy(t: torch.Tensor, device) -> torch.Tensor:
    """A copy of t on device (default: t's). empty+copy_: `Tensor.to(copy=True)` is several times slower on CPU."""
    return torch.empty_like(t, device=device or t.device).copy_(t.detach())


def _recipe_key(recipe: Recipe | None):
    return None if recipe is None else tuple((id(ad), s) for ad, s in recipe)


@dataclass(frozen=True)
class MixResult:
    updated: tuple[str, ...]    # modules whose weights were (re)computed
    restored: tuple[str, ...]   # modules given back their base weights


class Mixer:
    """Weighted LoRAs patched into a live pipeline (or a dict of its components)."""

    def __init__(self, pipe_or_components, *, family: str | None = None, cache: LoraCache | None = None,
                 backup_device: str | torch.device | None = "cpu"):
        self.components = components_of(pipe_or_components)
        from sdlora.quant import is_quantized
        if any(is_quantized(m) for m in self.components.values()):
            raise SdloraError("this base is stored quantized (--base-precision): its weights cannot be patched; "
                              "LoRAs are routed by hooks instead (sdlora.routing, what generate does)")
        if family is None:
            if "unet" not in self.components:
                raise SdloraError("no unet to tell the model family from; pass family='sd1'|'sd2'|'sdxl'")
            family = family_of_unet_config(self.components["unet"].config)
        self.target = Target(get_family(family).name, component_configs(self.components))
        self.cache = cache if cache is not None else DEFAULT_CACHE
        self.backup_device = backup_device   # None: keep backups next to the weights
        self._recipes: dict[str, Recipe] = {}
        self._weights: dict[str, torch.Tensor] = {}          # pristine weights of patched modules
        self._biases: dict[str, torch.Tensor | None] = {}    # pristine biases (None: we created it)
        self._active: tuple[MixEntry, ...] = ()

    @property
    def family(self) -> str:
        return self.target.family

    @property
    def active(self) -> tuple[MixEntry, ...]:
        return self._active

    @property
    def patched(self) -> frozenset[str]:
        """Canonical paths of the modules currently patched."""
        return frozenset(self._recipes)

    @property
    def backup_bytes(self) -> int:
        return sum(t.nbytes for t in self._weights.values()) + \
            sum(t.nbytes for t in self._biases.values() if t is not None)

    def _module(self, path: str) -> torch.nn.Module | None:
        return find_module(self.components, path)

    def _shape(self, path: str):
        mod = self._module(path)
        return None if mod is None else tuple(mod.weight.shape)

    def apply(self, entries: Sequence[MixEntry]) -> MixResult:
        """Make `entries` the active mix. Reads, validates, then patches only what changed.

        A call that fails leaves the model as it was: errors found before patching change nothing;
        an error while patching (out of memory, Ctrl-C) puts every module it touched back to its
        previous mix, recomputed from the base exactly as it was computed before.
        """
        entries = tuple(entries)
        loras = load_sources(entries, self.family, self.target.configs, self.cache)
        recipes = plan(entries, loras, self.target.unet_config)
        check_fit(entries, loras, self._shape, tuple(self.components), self.target.unet_config)
        before = dict(self._recipes)
        updated, restored = [], []
        try:
            with torch.no_grad():
                for path in [p for p in self._recipes if p not in recipes]:
                    restored.append(path)
                    self._restore_module(path)
                for path, recipe in recipes.items():
                    if _recipe_key(self._recipes.get(path)) != _recipe_key(recipe):
                        updated.append(path)
                        self._write(path, recipe)
                        self._recipes[path] = recipe
        except BaseException:
            self._roll_back(before, restored + updated)
            raise
        self._recipes = dict(recipes)
        self._active = entries
        return MixResult(tuple(updated), tuple(restored))

    def _roll_back(self, before: dict[str, Recipe], touched: list[str]) -> None:
        """Put the modules in `touched` back to their recipes in `before` (base weights if none)."""
        try:
            with torch.no_grad():
                for path in touched:
                    if path in self._weights:
                        self._restore_module(path)
                    if path in before:
                        self._write(path, before[path])
            self._recipes = before
        except BaseException:
            self.restore()   # cannot rebuild the previous mix (e.g. out of memory again): the base at least
            raise

    def restore(self) -> None:
        """Give every patched weight (and bias) back its base value, bit for bit."""
        with torch.no_grad():
            for path in list(self._weights):
                self._restore_module(path)
        self._recipes, self._active = {}, ()

    def _backup(self, w: torch.Tensor) -> torch.Tensor:
        """The base weight's backup: the base tensor itself when backups live on its device (as
        ComfyUI; nothing is copied), else a copy on the backup device (A1111's CPU copy of a CUDA model)."""
        if self.backup_device is None or torch.device(self.backup_device) == w.device:
            return w.detach()
        return _copy(w, self.backup_device)

    def _write(self, path: str, recipe: Recipe) -> None:
        mod = self._module(path)
        w = mod.weight
        if path not in self._weights:
            self._weights[path] = self._backup(w)
        # never write into the base tensor: while it is the weight (its own backup), the patched
        # weight goes into new memory, swapped in after; later writes go into that memory
        swap = self._weights[path].data_ptr() == w.data_ptr()
        target = torch.empty_like(w) if swap else w
        w0 = self._weights[path].to(w.device)
        if target.dtype == torch.float32:
            new = fused_weight(w0, recipe, out=target)
            if new is not target:
                target.copy_(new)
        else:
            target.copy_(fused_weight(w0, recipe))
        if swap:
            w.data = target
        self._write_bias(path, mod, recipe)

    def _write_bias(self, path: str, mod, recipe: Recipe) -> None:
        w = mod.weight
        b0 = self._biases[path] if path in self._biases else mod.bias
        deltas = bias_deltas(None if b0 is None else b0.to(w.device), recipe)
        if not deltas:
            if path in self._biases:
                self._restore_bias(path, mod)
            return
        if path not in self._biases:
            self._biases[path] = None if mod.bias is None else _copy(mod.bias, self.backup_device)
            if mod.bias is None:       # a bias update on a module without one: ours, removed on restore
                mod.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                              requires_grad=False)
        mod.bias.copy_(fused_bias(None if b0 is None else b0.to(w.device), deltas, w))

    def _restore_module(self, path: str) -> None:
        mod = self._module(path)
        w0, w = self._weights.pop(path), mod.weight
        if w0.device == w.device and w0.dtype == w.dtype and w0.shape == w.shape:
            w.data = w0           # the base tensor itself (or a same-device copy)
        else:
            w.copy_(w0)           # backup kept elsewhere (CPU for a CUDA model), or the model moved
        if path in self._biases:
            self._restore_bias(path, mod)
        self._recipes.pop(path, None)

    def _restore_bias(self, path: str, mod) -> None:
        b0 = self._biases.pop(path)
        if b0 is None:
            mod.bias = None
        else:
            mod.bias.copy_(b0)


_MIXERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def patched_mixer(pipe_or_components) -> Mixer | None:
    """The Mixer mixer_for keeps for this model, if one was made."""
    return _MIXERS.get(next(iter(components_of(pipe_or_components).values())))


def mixer_for(pipe_or_components) -> Mixer:
    """The Mixer of a pipeline (or components dict), made on first use and kept with its UNet (or
    first component), so a mix stays patched between calls and a change rewrites only what changed."""
    comps = components_of(pipe_or_components)
    key = next(iter(comps.values()))
    mixer = _MIXERS.get(key)
    if mixer is None or any(mixer.components.get(k) is not v for k, v in comps.items()):
        if mixer is not None:
            mixer.restore()
        mixer = _MIXERS[key] = Mixer(comps)
    return mixer
