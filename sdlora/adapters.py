"""One small class per LoRA algorithm: holds its tensors, knows its rank/alpha, computes its ΔW.

Every adapter works in float32 whatever the file's dtype, and returns tensors on the device of
the weight it is given. `delta(W)` is the full update at strength 1, already scaled (alpha/rank).
Applying at strength s is `apply(W, s)`; for additive algorithms that is W + s·ΔW, while DoRA
(which rescales the patched weight) overrides it. `bias_delta(b)` is the bias update at strength 1
(None when the module has none); callers add s·Δb.

Modifiers every adapter honours (A1111 network.py `NetworkModule`): a stored `scale` tensor
overrides alpha/rank, and an A1111 `bias` tensor (weight-sized, despite the name) is added to the
unscaled update before scaling (`finalize_updown`). That offset may be a sparse COO tensor
(LyCORIS extraction's `bias_indices/values/size`); it is densified per module only when used.
A `diff_b` tensor beside any algorithm's parts (ComfyUI LoraSave with bias_diff) is Δb as is.

A new algorithm is one class here: its `parts` (the normalized tensor names it owns, which is all
the key parsers need to recognize them), `claims(parts)`, `build(module, parts, ...)` and its math,
registered with `@register` in detection order. Algorithms recognized and refused are rows of
`refuse(...)` in the same order. sdlora.formats.modules builds every module through this list.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from sdlora.errors import LoraFormatError

# detection order, ComfyUI's load_lora: LoRA, LoHa, LoKr, GLoRA, OFT/BOFT, IA3, full, norm
ALGORITHMS: list = []


def register(cls):
    """Add an algorithm class (or a refused one) to the end of the detection order."""
    ALGORITHMS.append(cls)
    return cls


def known_parts() -> set[str]:
    """Every tensor name some registered (or refused) algorithm owns."""
    return {p for a in ALGORITHMS for p in a.parts}


def scalar(t: torch.Tensor, module: str = "", part: str = "value") -> float:
    """A 0-dim (or 1-element) tensor as a float; BF16 works (`.float()` first). Anything else (empty,
    several values, NaN) is a damaged file: guessing which value was meant would patch wrongly."""
    if t.numel() != 1:
        raise LoraFormatError(f"{module}: {part} must be a single number, found a tensor of shape {list(t.shape)} "
                              f"({t.numel()} values); the file is damaged or was written by a broken tool")
    value = float(t.detach().float().reshape(-1)[0])
    if value != value or value in (float("inf"), float("-inf")):
        raise LoraFormatError(f"{module}: {part} is {value}, not a finite number; the file is damaged")
    return value


def need(module: str, parts: Mapping, names, algorithm: str) -> None:
    missing = [n for n in names if n not in parts]
    if missing:
        raise LoraFormatError(f"{module}: incomplete {algorithm} module: has {sorted(parts)} but lacks {missing}")


class Adapter:
    algorithm = "?"       # "lora", "locon", "loha", "lokr", "full", "norm", "ia3", "oft", "dora"
    additive = True       # W' = W + s·ΔW with ΔW independent of W (order-independent)
    plain = False         # ΔW = scale·up @ down exactly (plain LoRA/LoCon): fused by matmul, routed as two ops
    parts: tuple[str, ...] = ()       # the normalized tensor names this algorithm owns
    modifiers: tuple[str, ...] = ()   # which generic modifiers it honours: "scale", "bias" (A1111's offset)

    @classmethod
    def claims(cls, parts: Mapping) -> bool:
        """Whether a module with these parts is of this algorithm (asked in detection order)."""
        return any(p in parts for p in cls.parts)

    @classmethod
    def build(cls, module: str, parts: Mapping, *, alpha=None, scale=None, offset=None) -> "Adapter":
        """The adapter from a module's parts; alpha/scale/offset are the module's generic modifiers."""
        raise NotImplementedError

    def __init__(self, tensors: dict[str, torch.Tensor], alpha: float | None = None,
                 scale_override: float | None = None):
        self.tensors = tensors   # the file's tensors for this module, by normalized suffix (as stored)
        self.alpha = alpha
        self.scale_override = scale_override

    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        """alpha / rank; missing alpha means alpha = rank (kohya, A1111, ComfyUI)."""
        if self.scale_override is not None:
            return float(self.scale_override)
        r = self.rank
        return 1.0 if (self.alpha is None or not r) else float(self.alpha) / r

    def _t(self, suffix: str, like: torch.Tensor | None = None) -> torch.Tensor:
        t = self.tensors[suffix]
        return t.to(device=like.device if like is not None else t.device, dtype=torch.float32)

    def _raw(self, weight: torch.Tensor) -> torch.Tensor:
        """The unscaled update, any shape with weight's element count."""
        raise NotImplementedError

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW (float32, weight's shape and device) at strength 1."""
        d = self._raw(weight).reshape(weight.shape)
        if "bias" in self.tensors:  # A1111: a weight-sized offset added before the scale
            off = self._t("bias", weight)
            d = d + (off.to_dense() if off.is_sparse else off).reshape(weight.shape)
        return d * self.scale

    def bias_delta(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """Δb (float32) at strength 1, or None when the adapter has no bias part."""
        # ComfyUI applies `diff_b` as a plain "diff" patch on the bias: strength only, no alpha
        return self._t("diff_b", bias) if "diff_b" in self.tensors else None

    def apply(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """The patched weight in float32 given the current one (in float32)."""
        return weight + strength * self.delta(weight)

    def _out_numel(self) -> tuple[int, int]:
        """(output rows, element count) of the update, from the tensor shapes alone."""
        raise NotImplementedError

    def target_shape_ok(self, weight_shape: tuple[int, ...]) -> bool:
        """Whether this adapter can patch a weight of that shape (checked before any change)."""
        out, numel = self._out_numel()
        ok = _fits(weight_shape, out, numel)
        if ok and "bias" in self.tensors:
            ok = self.tensors["bias"].numel() == numel
        return ok

    def shape_problem(self) -> str | None:
        """What is inconsistent in the tensors themselves (ranks that disagree, an empty tensor), or
        None. Checked when a file is read and again before a model is patched, so a broken file
        fails with this sentence instead of a matmul error halfway through patching."""
        empty = [k for k, t in self.tensors.items() if t.numel() == 0]
        return f"empty tensor {empty[0]} {list(self.tensors[empty[0]].shape)}" if empty else None

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.tensors.items())
        return f"{type(self).__name__}({shapes}, alpha={self.alpha})"


def _fits(weight_shape, out_features: int, numel: int) -> bool:
    return len(weight_shape) > 0 and weight_shape[0] == out_features and torch.Size(weight_shape).numel() == numel


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """CP/Tucker rebuild used by LoHa and LoKr: M[p,q,...] = Σ_ij t[i,j,...]·wa[i,p]·wb[j,q]."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb).contiguous()


class LoRA(Adapter):
    """LoRA / LoCon: ΔW = up @ down (conv kernels folded), with an optional Tucker `mid`.

    Shapes: down [r, in] or [r, in, kh, kw]; up [out, r] or [out, r, 1, 1]; mid [r, r, kh, kw].
    A conv-shaped file for a Linear target (SD1 proj_in LoRA on an SD2-style Linear) works by
    reshaping, as A1111 and ComfyUI do. `bias` is PEFT's `lora_B.bias`: Δb = scale·bias
    (peft tuners/lora/layer.py `merge`). `offset` is A1111's weight-sized `bias` modifier.
    """
    algorithm = "lora"
    parts = ("up", "down", "mid", "up_bias")
    modifiers = ("scale", "bias")

    @classmethod
    def claims(cls, parts):
        return "up" in parts or "down" in parts

    @classmethod
    def build(cls, module, parts, *, alpha=None, scale=None, offset=None):
        need(module, parts, ("up", "down"), "LoRA")
        return cls(parts["up"], parts["down"], parts.get("mid"), alpha=alpha, bias=parts.get("up_bias"),
                   scale_override=scale, offset=offset)

    def __init__(self, up, down, mid=None, alpha=None, bias=None, scale_override=None, offset=None):
        tensors = {"up": up, "down": down}
        if mid is not None:
            tensors["mid"] = mid
        if bias is not None:
            tensors["up_bias"] = bias
        if offset is not None:
            tensors["bias"] = offset
        super().__init__(tensors, alpha, scale_override)
        if down.dim() == 4 and (mid is not None or down.shape[2:] != (1, 1)):
            self.algorithm = "locon"

    @property
    def rank(self) -> int:
        return self.tensors["down"].shape[0]

    @property
    def plain(self) -> bool:
        """No A1111 weight-sized `bias` offset: ΔW is exactly scale·up @ down."""
        return "bias" not in self.tensors

    def flat_factors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, r], down [r, in·kh·kw]) in fp32, scale not applied (Tucker `mid` folded into
        down), so ΔW = scale·up @ down."""
        down, up = self.factors((self.rank, -1), device)
        return up, down

    def _out_numel(self):
        up, down, mid = self.tensors["up"], self.tensors["down"], self.tensors.get("mid")
        kernel = mid.shape[2:].numel() if mid is not None else down.shape[2:].numel()
        return up.shape[0], up.shape[0] * down.shape[1] * kernel

    def shape_problem(self):
        up, down, mid = self.tensors["up"], self.tensors["down"], self.tensors.get("mid")
        if down.dim() not in (2, 4) or up.dim() not in (2, 4):
            return f"lora_up {list(up.shape)} and lora_down {list(down.shape)} must be 2-D (linear) or 4-D (conv)"
        if down.shape[0] == 0 or up.shape[1] == 0:
            return f"rank 0 (lora_up {list(up.shape)}, lora_down {list(down.shape)}): the module has no update"
        if up.shape[1] != down.shape[0]:
            return (f"lora_up {list(up.shape)} has rank {up.shape[1]} but lora_down {list(down.shape)} has rank "
                    f"{down.shape[0]}; they must agree")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            return f"lora_up {list(up.shape)} must be [out, rank, 1, 1]"
        if mid is not None and (mid.dim() != 4 or tuple(mid.shape[:2]) != (down.shape[0], up.shape[1])):
            return f"lora_mid {list(mid.shape)} must be [rank, rank, kh, kw] with rank {down.shape[0]}"
        if "up_bias" in self.tensors and self.tensors["up_bias"].numel() != up.shape[0]:
            return f"lora bias {list(self.tensors['up_bias'].shape)} must have {up.shape[0]} values (lora_up's rows)"
        return super().shape_problem()

    def _raw(self, weight):
        up, down = self._t("up", weight), self._t("down", weight)
        r = down.shape[0]
        up2 = up.reshape(up.shape[0], r)
        if "mid" in self.tensors:
            return torch.einsum("mnhw,im,nj->ijhw", self._t("mid", weight), up2, down.reshape(r, -1))
        return up2 @ down.reshape(r, -1)

    def factors(self, weight_shape, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) in fp32, scale not applied, with ΔW = scale·up @ down.flatten(1).

        down has the target weight's kernel shape [r, *weight_shape[1:]] (a Tucker `mid` folded in:
        mid·down is again a conv kernel), up is [out, r]; so the update on activations is two small
        ops, x → op(x, down) → (·)·upᵀ, which routing uses instead of building ΔW.
        """
        up, down = self._t("up").to(device), self._t("down").to(device)
        r = down.shape[0]
        if "mid" in self.tensors:
            down = torch.einsum("mnhw,nj->mjhw", self._t("mid").to(device), down.reshape(r, -1))
        return down.reshape(r, *weight_shape[1:]), up.reshape(up.shape[0], r)

    def bias_delta(self, bias):
        diff_b = super().bias_delta(bias)
        if "up_bias" not in self.tensors:
            return diff_b
        lora_b = self._t("up_bias", bias) * self.scale
        return lora_b if diff_b is None else lora_b + diff_b


class LoHa(Adapter):
    """LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · scale; with `t1`/`t2` the CP (Tucker) form for convs.

    Plain: w1a [out, r], w1b [r, in·kh·kw]. CP: t [r, r, kh, kw], wa [r, out], wb [r, in]
    (LyCORIS functional/loha.py, ComfyUI weight_adapter/loha.py). Rank = w1b.shape[0].
    """
    algorithm = "loha"
    parts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    modifiers = ("scale", "bias")

    @classmethod
    def build(cls, module, parts, *, alpha=None, scale=None, offset=None):
        need(module, parts, cls.parts[:4], "LoHa")
        if ("hada_t1" in parts) != ("hada_t2" in parts):
            raise LoraFormatError(f"{module}: LoHa has only one of hada_t1/hada_t2")
        return cls(*(parts.get(n) for n in cls.parts), alpha=alpha, scale_override=scale, offset=offset)

    def __init__(self, w1a, w1b, w2a, w2b, t1=None, t2=None, alpha=None, scale_override=None, offset=None):
        tensors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
        if (t1 is None) != (t2 is None):
            raise ValueError("LoHa needs both hada_t1 and hada_t2 or neither")
        if t1 is not None:
            tensors.update(hada_t1=t1, hada_t2=t2)
        if offset is not None:
            tensors["bias"] = offset
        super().__init__(tensors, alpha, scale_override)

    @property
    def rank(self) -> int:
        return self.tensors["hada_w1_b"].shape[0]

    def _out_numel(self):
        a, b = self.tensors["hada_w1_a"], self.tensors["hada_w1_b"]
        if "hada_t1" in self.tensors:
            out = a.shape[1]
            return out, out * b.shape[1] * self.tensors["hada_t1"].shape[2:].numel()
        return a.shape[0], a.shape[0] * b[0].numel()

    def shape_problem(self):
        t = self.tensors
        shapes = {k: list(v.shape) for k, v in t.items()}
        if any(t[f"hada_w{i}_{x}"].dim() < 2 for i in (1, 2) for x in "ab"):
            return f"LoHa factors must be at least 2-D, got {shapes}"
        for i in (1, 2):
            a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
            if f"hada_t{i}" in t:
                if t[f"hada_t{i}"].dim() != 4 or tuple(t[f"hada_t{i}"].shape[:2]) != (a.shape[0], b.shape[0]):
                    return f"LoHa Tucker core hada_t{i} does not match its factors: {shapes}"
            elif a.shape[1] != b.shape[0]:
                return f"LoHa hada_w{i}_a and hada_w{i}_b ranks disagree: {shapes}"
        if t["hada_w1_b"].shape[0] == 0 or t["hada_w2_b"].shape[0] == 0:
            return f"LoHa rank 0: {shapes}"
        if self._half_shape(1) != self._half_shape(2):
            return f"the two LoHa halves have different shapes: {shapes}"
        return super().shape_problem()

    def _half_shape(self, i):
        a, b = self.tensors[f"hada_w{i}_a"], self.tensors[f"hada_w{i}_b"]
        if "hada_t1" in self.tensors:
            return (a.shape[1], b.shape[1]) + tuple(self.tensors[f"hada_t{i}"].shape[2:])
        return (a.shape[0], b[0].numel())

    def _half(self, i, weight):
        a, b = self._t(f"hada_w{i}_a", weight), self._t(f"hada_w{i}_b", weight)
        if "hada_t1" in self.tensors:
            return _tucker(self._t(f"hada_t{i}", weight), a, b.reshape(b.shape[0], -1))
        return a @ b.reshape(b.shape[0], -1)

    def _raw(self, weight):
        return self._half(1, weight) * self._half(2, weight)


class LoKr(Adapter):
    """LoKr: ΔW = w1 ⊗ w2 · scale (LyCORIS modules/lokr.py, ComfyUI weight_adapter/lokr.py).

    w1 = lokr_w1 [a, c] or lokr_w1_a [a, r] @ lokr_w1_b [r, c]; w2 = lokr_w2 [b, d(, kh, kw)] or
    lokr_w2_a [b, r] @ lokr_w2_b [r, d·kh·kw], or Tucker t2 [r, r, kh, kw] with w2_a [r, b], w2_b [r, d].
    Scale: alpha / r only when a factor is decomposed (r = its inner dim, w2's when both are);
    with both factors full, alpha is ignored and scale = 1 (docs/formats.md "Alpha and scale").
    """
    algorithm = "lokr"
    parts = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    modifiers = ("scale", "bias")

    @classmethod
    def build(cls, module, parts, *, alpha=None, scale=None, offset=None):
        try:
            return cls(parts, alpha=alpha, scale_override=scale, offset=offset)
        except ValueError as e:
            raise LoraFormatError(f"{module}: incomplete LoKr module ({e}); has {sorted(parts)}") from None

    def __init__(self, tensors: dict[str, torch.Tensor], alpha=None, scale_override=None, offset=None):
        tensors = {k: v for k, v in tensors.items() if k in self.parts}
        if not ("lokr_w1" in tensors or {"lokr_w1_a", "lokr_w1_b"} <= tensors.keys()):
            raise ValueError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if not ("lokr_w2" in tensors or {"lokr_w2_a", "lokr_w2_b"} <= tensors.keys()):
            raise ValueError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        if offset is not None:
            tensors["bias"] = offset
        super().__init__(tensors, alpha, scale_override)

    @property
    def rank(self) -> int | None:
        if "lokr_w2" not in self.tensors:
            return self.tensors["lokr_w2_b"].shape[0]
        if "lokr_w1" not in self.tensors:
            return self.tensors["lokr_w1_b"].shape[0]
        return None  # full x full: scale 1, alpha ignored

    def _factor_shapes(self):
        t = self.tensors
        w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        if "lokr_w2" in t:
            w2 = tuple(t["lokr_w2"].shape)
        elif "lokr_t2" in t:
            w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1]) + tuple(t["lokr_t2"].shape[2:])
        else:
            w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"][0].numel())
        return tuple(w1), w2

    def _out_numel(self):
        w1, w2 = self._factor_shapes()
        out = w1[0] * w2[0]
        return out, out * w1[1] * torch.Size(w2[1:]).numel()

    def shape_problem(self):
        t = self.tensors
        shapes = {k: list(v.shape) for k, v in t.items()}
        if any(v.dim() < 2 for k, v in t.items() if k != "bias"):
            return f"LoKr factors must be at least 2-D, got {shapes}"
        if "lokr_w1" not in t and t["lokr_w1_a"].shape[1] != t["lokr_w1_b"].shape[0]:
            return f"LoKr lokr_w1_a and lokr_w1_b ranks disagree: {shapes}"
        if "lokr_w2" not in t:
            if "lokr_t2" in t:
                core = t["lokr_t2"]
                if core.dim() != 4 or tuple(core.shape[:2]) != (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[0]):
                    return f"LoKr Tucker core lokr_t2 does not match lokr_w2_a/lokr_w2_b: {shapes}"
            elif t["lokr_w2_a"].shape[1] != t["lokr_w2_b"].shape[0]:
                return f"LoKr lokr_w2_a and lokr_w2_b ranks disagree: {shapes}"
        return super().shape_problem()

    def _raw(self, weight):
        t = self.tensors
        w1 = self._t("lokr_w1", weight) if "lokr_w1" in t else self._t("lokr_w1_a", weight) @ self._t("lokr_w1_b", weight)
        if "lokr_w2" in t:
            w2 = self._t("lokr_w2", weight)
        elif "lokr_t2" in t:
            w2 = _tucker(self._t("lokr_t2", weight), self._t("lokr_w2_a", weight), self._t("lokr_w2_b", weight))
        else:
            b = self._t("lokr_w2_b", weight)
            w2 = self._t("lokr_w2_a", weight) @ b.reshape(b.shape[0], -1)
        if w2.dim() > 2:
            w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
        return torch.kron(w1.contiguous(), w2.contiguous())


class Full(Adapter):
    """Full / native fine-tune (`diff`, `diff_b`) and norm-layer deltas (`w_norm`, `b_norm`).

    ΔW = diff, Δb = diff_b: no alpha, only the strength applies (LyCORIS modules/full.py,
    modules/norms.py; ComfyUI treats both as `diff` patches). Either part may be absent.
    """
    algorithm = "full"
    parts = ("diff", "diff_b")

    @classmethod
    def build(cls, module, parts, *, alpha=None, scale=None, offset=None):
        return cls(*(parts.get(n) for n in cls.parts), algorithm=cls.algorithm)

    def __init__(self, diff=None, diff_b=None, algorithm: str = "full"):
        if diff is None and diff_b is None:
            raise ValueError("a full/norm module needs a weight or a bias difference")
        tensors = {}
        if diff is not None:
            tensors["diff"] = diff
        if diff_b is not None:
            tensors["diff_b"] = diff_b
        super().__init__(tensors)
        self.algorithm = algorithm

    def _out_numel(self):
        d = self.tensors.get("diff")
        return (d.shape[0], d.numel()) if d is not None else (None, None)

    def target_shape_ok(self, weight_shape) -> bool:
        d = self.tensors.get("diff")
        return d is None or tuple(d.shape) == tuple(weight_shape)

    def _raw(self, weight):
        return self._t("diff", weight) if "diff" in self.tensors else torch.zeros_like(weight, dtype=torch.float32)

    def bias_delta(self, bias):
        return self._t("diff_b", bias) if "diff_b" in self.tensors else None


class Norm(Full):
    """Norm-layer deltas (LyCORIS modules/norms.py): ΔW = w_norm, Δb = b_norm, strength only."""
    algorithm = "norm"
    parts = ("w_norm", "b_norm")


class IA3(Adapter):
    """(IA)³: W' = W ⊙ (1 + s·w), w scaling output rows (`on_input`=0) or input columns (=1).

    ΔW = W ⊙ w depends on W, so it is not order-independent (A1111 network_ia3.py; LyCORIS ia3.py).
    """
    algorithm = "ia3"
    additive = False
    parts = ("weight", "on_input")
    modifiers = ("scale",)

    @classmethod
    def claims(cls, parts):
        return "weight" in parts and "on_input" in parts

    @classmethod
    def build(cls, module, parts, *, alpha=None, scale=None, offset=None):
        return cls(parts["weight"], bool(scalar(parts["on_input"], module, "on_input")), scale_override=scale)

    def __init__(self, weight, on_input: bool, scale_override=None):
        super().__init__({"weight": weight}, None, scale_override)
        self.on_input = bool(on_input)

    def target_shape_ok(self, weight_shape) -> bool:
        n = self.tensors["weight"].numel()
        return len(weight_shape) >= 2 and weight_shape[1 if self.on_input else 0] == n

    def _raw(self, weight):
        w = self._t("weight", weight).flatten()
        view = [1] * weight.dim()
        view[1 if self.on_input else 0] = w.numel()
        return weight.float() * w.reshape(view)


class OFT(Adapter):
    """(Diag-)OFT: each block of output rows is rotated by a Cayley transform of `oft_blocks`.

    Q = B − Bᵀ (clamped to ‖Q‖ ≤ alpha·out when alpha > 0, kohya networks/oft.py and LyCORIS
    modules/diag_oft.py), R = (I + Q)(I − Q)⁻¹ in float32, W'[k,m] = Σ_n R[k,n,m]·W[k,n],
    optionally times `rescale`; ΔW = W' − W. At strength s: W + s·ΔW, i.e. sR + (1−s)I (kohya).
    """
    algorithm = "oft"
    additive = False
    parts = ("oft_blocks", "rescale")

    @classmethod
    def claims(cls, parts):
        return "oft_blocks" in parts

    @classmethod
    def build(cls, module, parts, *, alpha=None, scale=None, offset=None):
        if parts["oft_blocks"].dim() != 3:
            raise LoraFormatError(f"{module}: oft_blocks must be [blocks, size, size], "
                                  f"got {tuple(parts['oft_blocks'].shape)}")
        return cls(parts["oft_blocks"], alpha=alpha, rescale=parts.get("rescale"))

    def __init__(self, oft_blocks, alpha=None, rescale=None):
        tensors = {"oft_blocks": oft_blocks}
        if rescale is not None:
            tensors["rescale"] = rescale
        super().__init__(tensors, alpha)

    @property
    def rank(self) -> int:
        return self.tensors["oft_blocks"].shape[0]  # the block count (kohya's "dim")

    @property
    def scale(self) -> float:
        return 1.0

    def target_shape_ok(self, weight_shape) -> bool:
        n, bs, _ = self.tensors["oft_blocks"].shape
        return len(weight_shape) >= 2 and weight_shape[0] == n * bs

    def shape_problem(self):
        b = self.tensors["oft_blocks"]
        if b.dim() != 3 or b.shape[1] != b.shape[2]:
            return f"oft_blocks {list(b.shape)} must be [blocks, size, size]"
        return super().shape_problem()

    def rotation(self, device=None) -> torch.Tensor:
        blocks = self.tensors["oft_blocks"].to(device=device, dtype=torch.float32)
        n, bs, _ = blocks.shape
        q = blocks - blocks.transpose(1, 2)
        if self.alpha is not None and self.alpha > 0:
            limit = float(self.alpha) * n * bs
            norm = torch.linalg.vector_norm(q)
            if norm > limit:
                q = q * (limit / (norm + 1e-8))
        eye = torch.eye(bs, device=q.device).expand(n, bs, bs)
        return (eye + q) @ torch.linalg.inv(eye - q)

    def _raw(self, weight):
        r = self.rotation(weight.device)
        n = r.shape[0]
        w = weight.float().reshape(n, r.shape[1], *weight.shape[1:])
        rotated = torch.einsum("knm,kn...->km...", r, w).reshape(weight.shape)
        if "rescale" in self.tensors:
            rotated = rotated * self._t("rescale", weight).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
        return rotated - weight.float()


class DoRA(Adapter):
    """DoRA: a magnitude vector m rescales the patched weight W_c = W + ΔW_inner.

    W_dora = m ⊙ W_c / (‖W_c‖ + eps), with norms per output row (LyCORIS `wd_on_out`, PEFT
    `lora_magnitude_vector`) or per input column (kohya/LyCORIS/A1111 `dora_scale` [1, in, ...]).
    `axis="auto"` picks it from the shape as ComfyUI does (m.shape[0] == out → output rows).
    Strength interpolates: W' = W + s·(W_dora − W) (ComfyUI weight_decompose, A1111).
    """
    algorithm = "dora"
    additive = False

    def __init__(self, inner: Adapter, magnitude: torch.Tensor, axis: str = "auto"):
        super().__init__(dict(inner.tensors, dora_scale=magnitude), inner.alpha, inner.scale_override)
        self.inner = inner
        if axis not in ("auto", "out", "in"):
            raise ValueError(f"DoRA axis must be 'auto', 'out' or 'in', not {axis!r}")
        self.axis = axis

    base_algorithm = property(lambda self: self.inner.algorithm)

    def shape_problem(self):
        return self.inner.shape_problem() or super().shape_problem()
    rank = property(lambda self: self.inner.rank)
    scale = property(lambda self: self.inner.scale)

    def _axis(self, weight_shape) -> str:
        if self.axis != "auto":
            return self.axis
        m = self.tensors["dora_scale"]
        return "out" if m.shape[0] == weight_shape[0] and m.numel() == weight_shape[0] else "in"

    def target_shape_ok(self, weight_shape) -> bool:
        if not self.inner.target_shape_ok(weight_shape):
            return False
        n = self.tensors["dora_scale"].numel()
        return n == weight_shape[0 if self._axis(weight_shape) == "out" else 1]

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """W_dora at strength 1 (float32)."""
        wc = weight.float() + self.inner.delta(weight)
        m = self._t("dora_scale", weight).flatten()
        view = [1] * wc.dim()
        if self._axis(weight.shape) == "out":
            norm = torch.linalg.vector_norm(wc.reshape(wc.shape[0], -1), dim=1)
            view[0] = -1
        else:
            norm = torch.linalg.vector_norm(wc.transpose(0, 1).reshape(wc.shape[1], -1), dim=1)
            view[1] = -1
        return wc * (m / (norm + torch.finfo(torch.float32).eps)).reshape(view)

    def delta(self, weight):
        return self.merged(weight) - weight.float()

    def apply(self, weight, strength):
        return weight + strength * (self.merged(weight) - weight)

    def bias_delta(self, bias):
        return self.inner.bias_delta(bias)


@dataclass(frozen=True)
class Refused:
    """An algorithm recognized by its parts and refused with a message that names it."""
    name: str
    parts: tuple[str, ...]
    message: str
    when: Callable[[Mapping], bool] | None = None     # a further condition on the parts

    def claims(self, parts: Mapping) -> bool:
        return any(p in parts for p in self.parts) and (self.when is None or self.when(parts))

    def build(self, module: str, parts: Mapping, **_) -> Adapter:
        raise LoraFormatError(f"{module}: {self.message}")


for _algorithm in (
        LoRA, LoHa, LoKr,
        Refused("GLoRA", ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"),
                "GLoRA modules (a1/a2/b1/b2) are not supported; it is rare in SD files and its two tensor layouts "
                "cannot be told apart reliably. Convert it to LoRA with LyCORIS."),
        Refused("BOFT", ("oft_blocks",), "BOFT (butterfly OFT, 4-D oft_blocks) is not supported; merge it into the "
                "model with LyCORIS instead", when=lambda p: p["oft_blocks"].dim() == 4),
        Refused("old OFT", ("oft_diag",), "old LyCORIS OFT (oft_diag) is not supported; re-save it with a current "
                "LyCORIS (oft_blocks) or merge it with LyCORIS"),
        OFT, IA3, Full, Norm):
    register(_algorithm)
