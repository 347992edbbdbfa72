"""A recipe's math on one module: the fused weight W0 + Σ s·ΔW (then the non-additive adapters),
and bias deltas (plain LoRAs, adapters.LoRA.plain, summed in one matmul of their factors).
"""
from __future__ import annotations

import torch

Recipe = tuple  # ((adapter, strength), ...) in entry order (sdlora.mixplan.plan)


def fused_weight(w0: torch.Tensor, recipe: Recipe, out: torch.Tensor | None = None) -> torch.Tensor:
    """W0 + Σ s·ΔW (additive adapters), then the non-additive ones in order; fp32, W0's device.

    Plain LoRAs are summed in one matmul of their concatenated factors added to W0 in the same
    pass (no ΔW temporary per LoRA). `out` (fp32, W0's shape, not W0 itself) receives the
    additive result; the returned tensor is the final one.
    """
    ups, downs, others = [], [], []
    for ad, s in recipe:
        if ad.additive and ad.plain:
            up, down = ad.flat_factors(w0.device)
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
