"""Routed LoRA mixes: each sample of a batch with its own mix, the base weights never touched.

    from sdlora.mixing import MixEntry
    from sdlora.routing import Router, use_mixes

    mixes = [[MixEntry("a.safetensors", unet=0.8)], [MixEntry("b.safetensors")], []]
    with Router(pipe, mixes):                  # hooks on the adapted modules only
        images = pipe(["p0", "p1", "p2"], ...).images   # image i gets mixes[i]
    # on exit: no hooks left, forward is the class's, weights were never written

    with use_mixes(pipe, mixes) as how:         # "patched" when all mixes are equal, else "routed"
        ...

Each adapted module computes base(x) + Σ_k s_k·ΔW_k(x) for the rows of each sample group (a
forward hook adds the update to the module's own output). Strengths s_k (UNet/text-encoder
multiplier × block weight) and the order rules come from mixplan.plan, so routing gives what
patching gives:
  * plain LoRA/LoCon (Tucker `mid` folded): two small ops on the activations, op(x, down) then
    ·upᵀ, never ΔW. When most samples share the same LoRAs (an XY grid), all LoRAs of the module
    run on all rows at once with a per-row strength per rank column ("masked"); when samples have
    different LoRAs, each group runs only its own ("grouped");
  * every other additive algorithm (LoHa, LoKr, full/diff, norm, A1111 `bias` offsets): its ΔW,
    built once per group, applied with the module's own functional op (F.linear, its conv,
    group/layer norm, embedding), which is linear in the weight;
  * a group with a non-additive adapter (DoRA, OFT, IA3): its effective ΔW = fused_weight(W0,
    recipe) − W0 (the Mixer's math), since these act on W0 + the additive sum;
  * bias updates (PEFT lora_B.bias, diff_b, b_norm) are added per group.

Rows map to samples cyclically: with B mixes, row r of any module's batch belongs to sample r % B.
That is how diffusers lays out batches: CFG concatenates [uncond; cond], so both halves of image i
share mix i, and the text encoders see the B prompts (then the B negative prompts). A batch whose
size is no multiple of B is refused. With num_images_per_prompt > 1 the rows are grouped per
prompt instead, so pass one mix per row there (repeat the prompts) or use a single mix.

Quantized bases (sdlora.quant: `weight` stored packed, forward dequantizes) route the same way: W0
is the module's dequantized weight, the factors are kept in its component's compute dtype, and the
hooks add to the output of the module's own (dequantizing) forward. They are never patched.

The LoRA files are read through mixing's bounded CPU cache; the tensors a Router needs are moved
to the module's device and dtype when mixes are set, and kept until the Router is closed.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sdlora.errors import SdloraError
from sdlora.families import family_of_unet_config, get_family
from sdlora.fusion import bias_deltas, fused_weight
from sdlora.lora_cache import DEFAULT_CACHE, LoraCache
from sdlora.mixing import mixer_for
from sdlora.mixplan import MixEntry, Target, check_fit, component_configs, components_of, find_module, load_sources, plan

Mix = Sequence[MixEntry]


def mix_key(mix: Mix) -> tuple:
    """A hashable identity of a mix: equal keys give equal weights."""
    def src(s):
        return str(s) if isinstance(s, (str, bytes)) or hasattr(s, "__fspath__") else id(s)
    return tuple((src(e.source), float(e.unet), float(e.text_encoder), repr(e.blocks)) for e in mix)


def _channel_axis(mod) -> int:
    """Where the output channels sit: 1 for convs and group norm, last for the others."""
    return 1 if isinstance(mod, (torch.nn.Conv2d, torch.nn.GroupNorm)) else -1


def _weight_op(mod, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The module's op with weight w and no bias (linear in w, so op(x, ΔW) is the update)."""
    if isinstance(mod, torch.nn.Linear):
        return F.linear(x, w)
    if isinstance(mod, torch.nn.Conv2d):
        return mod._conv_forward(x, w, None)
    if isinstance(mod, torch.nn.GroupNorm):
        return F.group_norm(x, mod.num_groups, w, None, mod.eps)
    if isinstance(mod, torch.nn.LayerNorm):
        return F.layer_norm(x, mod.normalized_shape, w, None, mod.eps)
    if isinstance(mod, torch.nn.Embedding):
        return F.embedding(x, w, mod.padding_idx, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq, mod.sparse)
    raise SdloraError(f"cannot route a LoRA through a {type(mod).__name__}; use patching (mode='patch')")


def _low_rank_ok(mod) -> bool:
    return isinstance(mod, torch.nn.Linear) or (isinstance(mod, torch.nn.Conv2d) and mod.groups == 1)


@dataclass
class Group:
    """One sample group's update of one module (module dtype/device; any part may be None)."""
    down: torch.Tensor | None = None   # [R, *kernel] low-rank factors of the group's plain LoRAs
    up: torch.Tensor | None = None     # [out, R], strength·scale folded in
    dw: torch.Tensor | None = None     # dense ΔW of the rest (or of the whole recipe, if non-additive)
    db: torch.Tensor | None = None     # Δb [out]


@dataclass
class Route:
    """Everything one module adds to its output, per sample group."""
    module: torch.nn.Module
    groups: dict[int, Group] = field(default_factory=dict)
    # masked mode: all groups' LoRAs at once, with a per-group strength per rank column
    down: torch.Tensor | None = None   # [R_total, *kernel]
    up: torch.Tensor | None = None     # [out, R_total]
    table: torch.Tensor | None = None  # [n_groups, R_total]
    _row_scales: dict = field(default_factory=dict)   # (id of a row-group map, dims) -> table rows, shaped

    def _scales(self, gid: torch.Tensor, dims: int) -> torch.Tensor:
        """The per-row strengths of the masked LoRAs, shaped to multiply op(x, down); kept per batch
        layout (the Router keeps each layout's `gid`), so the hook indexes the table once, not per call."""
        key = (id(gid), dims)
        if key not in self._row_scales:
            s = self.table[gid]
            conv = isinstance(self.module, torch.nn.Conv2d)
            self._row_scales[key] = (gid, s[:, :, None, None] if conv else s.view(s.shape[0], *[1] * (dims - 2), -1))
        return self._row_scales[key][1]

    def low_rank(self, x, down, up, scale=None):
        """op(x, down) (× per-row scales, already shaped) · upᵀ: the LoRA update without ΔW."""
        if isinstance(self.module, torch.nn.Conv2d):
            h = self.module._conv_forward(x, down, None)
            return F.conv2d(h if scale is None else h * scale, up[:, :, None, None])
        h = F.linear(x, down)
        return F.linear(h if scale is None else h * scale, up)

    def apply(self, x: torch.Tensor, out: torch.Tensor, gid: torch.Tensor, index: dict) -> torch.Tensor:
        """out + each group's update on its rows (index: group -> its rows, None = all rows)."""
        if self.table is not None:
            d = self.low_rank(x, self.down, self.up, self._scales(gid, x.dim()))
            # in place when nothing is recorded for backward (inference): saves an output-sized copy
            out = out.add_(d) if not torch.is_grad_enabled() else out + d
        view = [1] * out.dim()
        view[_channel_axis(self.module)] = -1
        for g, part in self.groups.items():
            if g not in index:
                continue          # no row of this batch belongs to the group
            idx = index[g]
            xg = x if idx is None else x.index_select(0, idx)
            d = None
            if part.down is not None:
                d = self.low_rank(xg, part.down, part.up)
            if part.dw is not None:
                dd = _weight_op(self.module, xg, part.dw)
                d = dd if d is None else d + dd
            if part.db is not None:
                db = part.db.view(view)
                d = db if d is None else d + db
            if d is None:
                continue
            if idx is None:
                out = out + d
            else:
                out = out.index_add(0, idx, d.expand(len(idx), *out.shape[1:]))
        return out


class Router:
    """Per-sample LoRA mixes on a live pipeline (or a dict of its components), by forward hooks.

    `Router(pipe, mixes)` reads and checks the mixes; `install()` (or `with`) adds the hooks,
    `remove()` (or leaving the `with`) takes every one of them off again. `set_mixes` changes the
    mixes, installed or not. The base weights are never written; a Mixer's patched mix on the
    same model would be applied twice, so use_mixes restores it first.
    """

    def __init__(self, pipe_or_components, mixes: Sequence[Mix] = (), *, family: str | None = None,
                 cache: LoraCache | None = None):
        self.components = components_of(pipe_or_components)
        if family is None:
            if "unet" not in self.components:
                raise SdloraError("no unet to tell the model family from; pass family='sd1'|'sd2'|'sdxl'")
            family = family_of_unet_config(self.components["unet"].config)
        self.target = Target(get_family(family).name, component_configs(self.components))
        self.cache = cache if cache is not None else DEFAULT_CACHE
        self.routes: dict[str, Route] = {}
        self.sample_groups: list[int] = []   # sample -> group
        self._handles: list = []
        self._rows: dict = {}                # (rows, device) -> (group of each row, rows of each group)
        self._factors: dict = {}             # (id(adapter), device, dtype, shape) -> (adapter, down, up)
        self.set_mixes(mixes)

    # -- mixes -------------------------------------------------------------------------------

    def set_mixes(self, mixes: Sequence[Mix]) -> None:
        """Sample i of the following batches gets mixes[i]; equal mixes share one group."""
        mixes = [tuple(m) for m in mixes]
        keys, self.sample_groups, firsts = {}, [], []
        for m in mixes:
            k = mix_key(m)
            if k not in keys:
                keys[k] = len(firsts)
                firsts.append(m)
            self.sample_groups.append(keys[k])
        counts = [self.sample_groups.count(g) for g in range(len(firsts))]
        per_path: dict[str, dict[int, tuple]] = {}
        for g, entries in enumerate(firsts):
            loras = load_sources(entries, self.family, self.target.configs, self.cache)
            check_fit(entries, loras, self._shape, tuple(self.components), self.target.unet_config)
            for path, recipe in plan(entries, loras, self.target.unet_config).items():
                per_path.setdefault(path, {})[g] = recipe
        with torch.no_grad():
            routes = {path: self._route(path, recipes, counts) for path, recipes in per_path.items()}
        installed = bool(self._handles)
        self.remove()
        self.routes, self._rows = routes, {}
        if installed:
            self.install()

    @property
    def family(self) -> str:
        return self.target.family

    @property
    def n_groups(self) -> int:
        return max(self.sample_groups, default=-1) + 1

    def _shape(self, path):
        mod = find_module(self.components, path)
        if mod is None:
            return None
        return tuple(getattr(mod, "weight_shape", None) or mod.weight.shape)   # quantized: stored packed

    def _lora(self, ad, w):
        key = (id(ad), w.device, w.dtype, tuple(w.shape))
        if key not in self._factors:   # kept with the adapter so the id stays unique
            down, up = ad.factors(w.shape, w.device)
            self._factors[key] = (ad, down.to(w.dtype), up.to(w.dtype))
        return self._factors[key][1:]

    def _base_weight(self, path: str, mod) -> tuple[torch.Tensor, torch.Tensor]:
        """(W0 in fp32, a tensor with the shape, device and dtype the module computes in). A
        quantized module (sdlora.quant) stores `weight` packed: W0 is its dequantized weight, and it
        computes in its component's dtype (that of the norms and biases it keeps)."""
        if hasattr(mod, "dequantize") and hasattr(mod, "weight_shape"):
            w0 = mod.dequantize(torch.float32)
            comp = self.components[path.partition(".")[0]]
            dtype = next((p.dtype for p in comp.parameters() if p.is_floating_point()), torch.float32)
            return w0, torch.empty((), device=w0.device, dtype=dtype).expand(w0.shape)
        return mod.weight.detach().float(), mod.weight.detach()

    def _route(self, path: str, recipes: dict[int, tuple], counts: list[int]) -> Route:
        mod = find_module(self.components, path)
        w0, w = self._base_weight(path, mod)
        b0 = None if getattr(mod, "bias", None) is None else mod.bias.detach().float()
        route = Route(mod)
        lora_groups = {}   # g -> [(adapter, strength·scale)]
        for g, recipe in recipes.items():
            part = Group()
            low = _low_rank_ok(mod) and all(ad.additive for ad, _ in recipe)
            plain = [(ad, s) for ad, s in recipe if low and ad.plain]
            rest = [(ad, s) for ad, s in recipe if not (low and ad.plain)]
            if plain:
                lora_groups[g] = [(ad, s * ad.scale) for ad, s in plain]
                downs, ups = zip(*(self._lora(ad, w) for ad, _ in plain))
                part.down = torch.cat(downs)
                part.up = torch.cat([u * c for u, (_, c) in zip(ups, lora_groups[g])], dim=1)
            if rest and all(ad.additive for ad, _ in recipe):
                dw = sum(s * ad.delta(w0) for ad, s in rest)
                part.dw = dw.to(w.dtype)
            elif rest:   # non-additive on top of the additive sum: the Mixer's fused weight, as a delta
                part.dw = (fused_weight(w0, recipe) - w0).to(w.dtype)
            deltas = bias_deltas(b0, recipe)
            if deltas:
                part.db = sum(s * d.to(w.device) for d, s in deltas).to(w.dtype)
            route.groups[g] = part
        self._mask(route, lora_groups, counts, w)
        return route

    def _mask(self, route: Route, lora_groups: dict, counts: list[int], w) -> None:
        """Switch to masked mode when the groups mostly share their LoRAs (cheaper than per group)."""
        if len(lora_groups) < 2:
            return
        adapters = list({id(ad): ad for items in lora_groups.values() for ad, _ in items}.values())
        ranks = [ad.rank for ad in adapters]
        masked_cost = sum(counts) * sum(ranks)
        grouped_cost = sum(counts[g] * sum(ad.rank for ad, _ in items) for g, items in lora_groups.items())
        if masked_cost > 1.5 * grouped_cost:
            return
        col = {id(ad): sum(ranks[:i]) for i, ad in enumerate(adapters)}
        table = torch.zeros(len(counts), sum(ranks), dtype=torch.float32)
        for g, items in lora_groups.items():
            for ad, c in items:
                table[g, col[id(ad)]:col[id(ad)] + ad.rank] += c
        downs, ups = zip(*(self._lora(ad, w) for ad in adapters))
        route.down, route.up = torch.cat(downs), torch.cat(ups, dim=1)
        route.table = table.to(device=w.device, dtype=w.dtype)
        for g in lora_groups:
            part = route.groups[g]
            part.down = part.up = None
            if part.dw is None and part.db is None:
                del route.groups[g]          # all of it is in the masked op: nothing left per group

    # -- hooks -------------------------------------------------------------------------------

    def _row_groups(self, n: int, device):
        key = (n, device)
        if key not in self._rows:
            b = len(self.sample_groups)
            if self.n_groups == 1:
                gid, index = torch.zeros(n, dtype=torch.long), {0: None}
            else:
                if n % b:
                    raise SdloraError(f"a batch of {n} rows cannot be split over {b} per-sample mixes; "
                                      f"pass one mix per image (rows repeat the samples, as CFG does)")
                gid = torch.tensor(self.sample_groups * (n // b), dtype=torch.long)
                index = {g: (gid == g).nonzero().flatten().to(device) for g in set(self.sample_groups)}
            self._rows[key] = (gid.to(device), index)
        return self._rows[key]

    def _hook(self, route: Route):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            gid, index = self._row_groups(x.shape[0], x.device)
            return route.apply(x, out, gid, index)
        return hook

    def install(self) -> Router:
        if not self._handles:
            self._handles = [r.module.register_forward_hook(self._hook(r), with_kwargs=True)
                             for r in self.routes.values()]
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def close(self) -> None:
        """Remove the hooks and drop the device copies of the LoRA tensors."""
        self.remove()
        self.routes, self._factors, self._rows = {}, {}, {}

    def __enter__(self) -> Router:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.close()


def choose_mode(mixes: Sequence[Mix], mode: str = "auto") -> str:
    """"patched" or "routed" for these per-sample mixes: auto patches when all mixes are equal."""
    if mode not in ("auto", "patch", "route"):
        raise SdloraError(f"mode must be 'auto', 'patch' or 'route', not {mode!r}")
    same = len({mix_key(m) for m in mixes}) <= 1
    if mode == "patch" and not same:
        raise SdloraError("patching applies one mix to the whole batch, but the samples have different mixes; "
                          "use mode='route' or 'auto'")
    return "patched" if mode == "patch" or (mode == "auto" and same) else "routed"


@contextmanager
def use_mixes(pipe_or_components, mixes: Sequence[Mix], *, mode: str = "auto", cache: LoraCache | None = None):
    """Sample i of the batches run inside gets mixes[i]; yields "patched" or "routed".

    patched: the model's Mixer (mixing.mixer_for) patches the one mix into the weights and keeps it
    there after the block (the next call re-patches only what changed; an empty mix restores).
    routed: the patched mix is restored first, then a Router is installed for the block only.
    """
    if _quantized(pipe_or_components):
        if mode == "patch":
            raise SdloraError("this base is stored quantized (--base-precision): its weights cannot be patched; "
                              "use mode='route' or 'auto'")
        drop_router(pipe_or_components)            # a kept mix (set_active) would apply twice
        with Router(pipe_or_components, mixes, cache=cache):
            yield "routed"
        return
    how = choose_mode(mixes, mode)
    mixer = mixer_for(pipe_or_components)
    if how == "patched":
        mixer.apply(list(mixes[0]) if mixes else [])
        yield how
        return
    mixer.restore()
    with Router(pipe_or_components, mixes, family=mixer.family, cache=cache or mixer.cache):
        yield how


def _quantized(pipe_or_components) -> bool:
    from sdlora.quant import is_quantized
    return any(is_quantized(m) for m in components_of(pipe_or_components).values())


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # first component -> its kept Router


def set_active(pipe_or_components, mix: Mix) -> str:
    """Make `mix` the model's mix for every batch until changed (an empty mix: the base again);
    "patched" (mixing.mixer_for) or, on a quantized base, "routed" by a kept Router's hooks.
    Everything is read and checked before the previous mix is replaced."""
    if not _quantized(pipe_or_components):
        mixer_for(pipe_or_components).apply(list(mix))
        return "patched"
    if not mix:
        drop_router(pipe_or_components)
        return "routed"
    key = next(iter(components_of(pipe_or_components).values()))
    if key in _KEPT:
        _KEPT[key].set_mixes([tuple(mix)])          # an installed Router stays installed
    else:
        _KEPT[key] = Router(pipe_or_components, [tuple(mix)]).install()
    return "routed"


def kept_router(pipe_or_components) -> Router | None:
    """The Router set_active keeps on this model (None when it has no routed mix)."""
    return _KEPT.get(next(iter(components_of(pipe_or_components).values())))


def drop_router(pipe_or_components) -> None:
    router = _KEPT.pop(next(iter(components_of(pipe_or_components).values())), None)
    if router is not None:
        router.close()
