"""One small class per LoRA algorithm: holds its tensors, knows its rank/alpha, computes its ΔW.

Every adapter works in float32 whatever the file's dtype, and returns tensors on the device of
the weight it is given. `delta(W)` is the full update at strength 1, already scaled (alpha/rank).
Applying at strength s is `apply(W, s)`; for additive algorithms that is W + s·ΔW, while DoRA
(which rescales the patched weight) overrides it.
"""
from __future__ import annotations

import torch


class Adapter:
    algorithm = "?"       # "lora", "locon", "loha", "lokr", "full", "dora", ...
    additive = True       # W' = W + s·ΔW (order-independent)

    def __init__(self, tensors: dict[str, torch.Tensor], alpha: float | None = None):
        self.tensors = tensors   # the file's tensors for this module, by suffix (as stored)
        self.alpha = alpha

    @property
    def rank(self) -> int | None:
        return None

    @property
    def scale(self) -> float:
        """alpha / rank; missing alpha means alpha = rank (kohya, A1111, ComfyUI)."""
        r = self.rank
        return 1.0 if (self.alpha is None or not r) else float(self.alpha) / r

    def _t(self, suffix: str, like: torch.Tensor | None = None) -> torch.Tensor:
        t = self.tensors[suffix]
        return t.to(device=like.device if like is not None else t.device, dtype=torch.float32)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW (float32, weight's shape and device) at strength 1."""
        raise NotImplementedError

    def bias_delta(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """Δb (float32) at strength 1, or None when the adapter has no bias part."""
        return None

    def apply(self, weight: torch.Tensor, strength: float) -> torch.Tensor:
        """The patched weight in float32 given the current one (in float32)."""
        return weight + strength * self.delta(weight)

    def target_shape_ok(self, weight_shape: tuple[int, ...]) -> bool:
        """Whether this adapter can patch a weight of that shape (checked before any change)."""
        raise NotImplementedError


def _fits(weight_shape, out_features: int, numel: int) -> bool:
    return weight_shape[0] == out_features and torch.Size(weight_shape).numel() == numel


class LoRA(Adapter):
    """LoRA / LoCon: ΔW = up @ down (conv kernels folded), with an optional Tucker `mid`.

    Shapes: down [r, in] or [r, in, kh, kw]; up [out, r] or [out, r, 1, 1]; mid [r, r, kh, kw].
    A conv-shaped file for a Linear target (SD1 proj_in LoRA on an SD2-style Linear) works by
    reshaping, as A1111 and ComfyUI do.
    """
    algorithm = "lora"

    def __init__(self, up, down, mid=None, alpha=None, bias=None):
        tensors = {"up": up, "down": down}
        if mid is not None:
            tensors["mid"] = mid
        if bias is not None:
            tensors["bias"] = bias
        super().__init__(tensors, alpha)
        if down.dim() == 4 and (mid is not None or down.shape[2:] != (1, 1)):
            self.algorithm = "locon"

    @property
    def rank(self) -> int:
        return self.tensors["down"].shape[0]

    def _numel(self) -> int:
        up, down, mid = self.tensors["up"], self.tensors["down"], self.tensors.get("mid")
        kernel = mid.shape[2:].numel() if mid is not None else down.shape[2:].numel()
        return up.shape[0] * down.shape[1] * kernel

    def target_shape_ok(self, weight_shape) -> bool:
        return _fits(weight_shape, self.tensors["up"].shape[0], self._numel())

    def delta(self, weight):
        up, down = self._t("up", weight), self._t("down", weight)
        r = down.shape[0]
        up2 = up.reshape(up.shape[0], r)
        if "mid" in self.tensors:
            mid = self._t("mid", weight)
            d = torch.einsum("mnhw,im,nj->ijhw", mid, up2, down.reshape(r, -1))
        else:
            d = up2 @ down.reshape(r, -1)
        return (d * self.scale).reshape(weight.shape)

    def bias_delta(self, bias):
        return self._t("bias", bias) if "bias" in self.tensors else None
