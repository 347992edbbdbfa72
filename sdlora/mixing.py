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
once and kept in a bounded CPU cache keyed by path, size and mtime.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sdlora.adapters import LoRA
from sdlora.blocks import BlockSpec, block_weight, parse_lbw
from sdlora.errors import FamilyMismatchError, LoraFormatError, SdloraError, UnmatchedKeysError
from sdlora.families import COMPONENTS, family_of_unet_config, get_family, live_path, load_config


# ---------------------------------------------------------------------------------------------
# what to apply

def split_weight(spec: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` -> (path, weight); a drive colon (`C:\\x.safetensors`) is part of the path."""
    path, sep, tail = spec.rpartition(":")
    if not sep or os.path.isfile(spec):
        return spec, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return spec, 1.0  # the colon belongs to the path
    if not path:
        raise SdloraError(f"--lora {spec!r}: no file before ':{tail}'; expected PATH[:WEIGHT]")
    if not math.isfinite(weight):
        raise SdloraError(f"--lora {spec!r}: weight {tail!r} is not a finite number; expected PATH[:WEIGHT]")
    return path, weight


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
        """From `PATH[:WEIGHT]` (the weight goes to UNet and text encoder alike)."""
        path, weight = split_weight(spec)
        return cls(path, unet=weight, text_encoder=weight, **kwargs)

    @property
    def name(self) -> str:
        src = getattr(self.source, "path", None) or self.source
        return Path(src).name if isinstance(src, (str, os.PathLike)) else type(src).__name__


# ---------------------------------------------------------------------------------------------
# the file cache

def _read_lora(path, family, configs):
    from sdlora.formats import read_lora
    return read_lora(path, family=family, configs=configs)


def _nbytes(t: torch.Tensor) -> int:
    # a sparse tensor (LyCORIS sparse residual) has no .nbytes: count what it stores
    return t.indices().nbytes + t.values().nbytes if t.is_sparse else t.nbytes


def _lora_nbytes(lora) -> int:
    return sum(_nbytes(t) for ad in lora.patches.values() for t in getattr(ad, "tensors", {}).values()
               if isinstance(t, torch.Tensor))


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class LoraCache:
    """Parsed LoRA files on CPU, least recently used evicted past `max_bytes` of tensors.

    Keyed by (real path, size, mtime, target family and configs): a file edited on disk is read
    again, an unchanged one never is. The entry just loaded is kept even if it alone is too big.
    """

    def __init__(self, max_bytes: int = 4 << 30, reader: Callable | None = None):
        self.max_bytes = max_bytes
        self.reader = reader or _read_lora
        self.reads = 0                       # files actually read (for tests and the UI)
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()

    def get(self, path, family: str | None, configs: dict | None):
        from sdlora.paths import check_input_file
        check_input_file(path, "LoRA file")     # missing, a folder, a link loop: said before reading
        real = os.path.realpath(path)
        st = os.stat(real)
        key = (real, st.st_size, st.st_mtime_ns, family, _digest(configs))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        lora = self.reader(os.fspath(path), family, configs)
        self.reads += 1
        for old in [k for k in self._entries if k[0] == real and k[3:] == key[3:]]:
            del self._entries[old]   # an older version of the same file
        self._entries[key] = (lora, _lora_nbytes(lora))
        while sum(n for _, n in self._entries.values()) > self.max_bytes and len(self._entries) > 1:
            self._entries.popitem(last=False)
        return lora

    def clear(self) -> None:
        self._entries.clear()


DEFAULT_CACHE = LoraCache()


# ---------------------------------------------------------------------------------------------
# planning: which adapters at which strength on which module (shared by Mixer, mix and fuse)

Recipe = tuple  # ((adapter, strength), ...) in entry order


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


def is_plain_lora(ad) -> bool:
    """A LoRA/LoCon whose ΔW is exactly scale·up @ down (no A1111 weight-sized `bias` offset)."""
    return isinstance(ad, LoRA) and ad.algorithm in ("lora", "locon") and "bias" not in ad.tensors


def lora_factors(ad: LoRA, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in·kh·kw]) in fp32 of a plain LoRA/LoCon, scale not applied (Tucker
    `mid` folded into down), so ΔW = scale·up @ down."""
    r = ad.rank
    down, up = ad.factors((r, -1), device)
    return up, down


def fused_weight(w0: torch.Tensor, recipe: Recipe, out: torch.Tensor | None = None) -> torch.Tensor:
    """W0 + Σ s·ΔW (additive adapters), then the non-additive ones in order; fp32, W0's device.

    Plain LoRAs are summed in one matmul of their concatenated factors added to W0 in the same
    pass (no ΔW temporary per LoRA). `out` (fp32, W0's shape, not W0 itself) receives the
    additive result; the returned tensor is the final one.
    """
    ups, downs, others = [], [], []
    for ad, s in recipe:
        if ad.additive and is_plain_lora(ad):
            up, down = lora_factors(ad, w0.device)
            ups.append(up * (s * ad.scale))
            downs.append(down)
        elif ad.additive:
            others.append((ad, s))
    if out is None:
        out = torch.empty(w0.shape, dtype=torch.float32, device=w0.device)
    flat = out.view(out.shape[0], -1)
    if ups and w0.dtype == torch.float32:
        torch.addmm(w0.reshape(flat.shape), torch.cat(ups, dim=1), torch.cat(downs, dim=0), out=flat)
    else:
        out.copy_(w0)
        if ups:
            flat.addmm_(torch.cat(ups, dim=1), torch.cat(downs, dim=0))
    if others:
        base = w0.to(torch.float32)
        for ad, s in others:
            out.add_(ad.delta(base), alpha=s)
    for ad, s in recipe:
        if not ad.additive:
            out = ad.apply(out, s)
    return out


def bias_deltas(b0: torch.Tensor | None, recipe: Recipe) -> list[tuple[torch.Tensor, float]]:
    b = b0.to(torch.float32) if b0 is not None else None
    return [(d, s) for ad, s in recipe if (d := ad.bias_delta(b)) is not None]


def fused_bias(b0: torch.Tensor | None, deltas, like: torch.Tensor) -> torch.Tensor:
    acc = b0.to(torch.float32).clone() if b0 is not None else torch.zeros(like.shape[0], device=like.device)
    for d, s in deltas:
        acc.add_(d.to(acc.device), alpha=s)
    return acc


def _copy(t: torch.Tensor, device) -> torch.Tensor:
    """A copy of t on device (default: t's). empty+copy_: `Tensor.to(copy=True)` is several times slower on CPU."""
    return torch.empty_like(t, device=device or t.device).copy_(t.detach())


def _recipe_key(recipe: Recipe | None):
    return None if recipe is None else tuple((id(ad), s) for ad, s in recipe)


# ---------------------------------------------------------------------------------------------
# the live mixer

def component_configs(components: Mapping[str, torch.nn.Module]) -> dict[str, dict]:
    """component -> config dict (the form of sdlora/configs/<family>/<component>/config.json)."""
    out = {}
    for comp, model in components.items():
        if comp == "unet":
            out[comp] = dict(model.config)
        else:
            out[comp] = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    return out


def _components(obj) -> dict[str, torch.nn.Module]:
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


@dataclass(frozen=True)
class MixResult:
    updated: tuple[str, ...]    # modules whose weights were (re)computed
    restored: tuple[str, ...]   # modules given back their base weights


class Mixer:
    """Weighted LoRAs patched into a live pipeline (or a dict of its components)."""

    def __init__(self, pipe_or_components, *, family: str | None = None, cache: LoraCache | None = None,
                 backup_device: str | torch.device | None = "cpu"):
        self.components = _components(pipe_or_components)
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

    def _write(self, path: str, recipe: Recipe) -> None:
        mod = self._module(path)
        w = mod.weight
        fresh = path not in self._weights
        if fresh:
            if self.backup_device is None or torch.device(self.backup_device) == w.device:
                # the base tensor itself is the backup (as ComfyUI does): the patched weight goes
                # into new memory, and restore just puts the base tensor back. No copy either way.
                self._weights[path] = w.detach()
                target = torch.empty_like(w)
            else:
                self._weights[path] = _copy(w, self.backup_device)
                fresh, target = False, w
        else:
            target = w
        w0 = self._weights[path].to(w.device)
        if target.dtype == torch.float32:
            new = fused_weight(w0, recipe, out=target)
            if new is not target:
                target.copy_(new)
        else:
            target.copy_(fused_weight(w0, recipe))
        if fresh:
            w.data = target
        b0 = self._biases[path] if path in self._biases else mod.bias
        deltas = bias_deltas(None if b0 is None else b0.to(w.device), recipe)
        if deltas:
            if path not in self._biases:
                self._biases[path] = None if mod.bias is None else _copy(mod.bias, self.backup_device)
                if mod.bias is None:
                    mod.bias = torch.nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                                  requires_grad=False)
            mod.bias.copy_(fused_bias(None if b0 is None else b0.to(w.device), deltas, w))
        elif path in self._biases:
            self._restore_bias(path, mod)

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
    return _MIXERS.get(next(iter(_components(pipe_or_components).values())))


def mixer_for(pipe_or_components) -> Mixer:
    """The Mixer of a pipeline (or components dict), made on first use and kept with its UNet (or
    first component), so a mix stays patched between calls and a change rewrites only what changed."""
    comps = _components(pipe_or_components)
    key = next(iter(comps.values()))
    mixer = _MIXERS.get(key)
    if mixer is None or any(mixer.components.get(k) is not v for k, v in comps.items()):
        if mixer is not None:
            mixer.restore()
        mixer = _MIXERS[key] = Mixer(comps)
    return mixer
