"""Optimizers (AdamW, AdamW8bit, Prodigy) and learning-rate schedules with warmup."""
from __future__ import annotations

import math
import warnings

import torch

from sdlora.errors import SdloraError


def build_optimizer(name: str, groups: list[dict], cfg, warn=warnings.warn):
    """The optimizer `name` over the param groups; returns (optimizer, description for ss_optimizer)."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
            opt = bnb.optim.AdamW8bit(groups, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
            return opt, f"bitsandbytes.optim.AdamW8bit(weight_decay={cfg.weight_decay},betas={betas})"
        except Exception as e:  # not installed, or no usable CUDA/CPU backend
            warn(f"AdamW8bit is not available ({type(e).__name__}: {e}); training with torch AdamW instead")
    elif name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise SdloraError("the prodigy optimizer needs the prodigyopt package (pip install prodigyopt), "
                              "or pick --optimizer adamw") from None
        opt = Prodigy(groups, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
        return opt, f"prodigyopt.Prodigy(weight_decay={cfg.weight_decay},betas={betas})"
    # fused (one kernel for all LoRA tensors; CPU and CUDA in torch>=2.4), else foreach: a LoRA has
    # hundreds of small tensors, and the per-tensor loop (torch's CPU default) costs ~10% of a step
    kw = dict(betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    try:
        opt = torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(groups, foreach=True, **kw)
    return opt, f"torch.optim.adamw.AdamW(weight_decay={cfg.weight_decay},betas={betas})"


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base LR after `step` optimizer steps: linear warmup, then constant, cosine
    decay to 0 or linear decay to 0 (diffusers' get_scheduler shapes)."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        raise SdloraError(f"unknown lr scheduler {kind!r}; expected constant, cosine or linear")
    return f


def build_scheduler(optimizer, kind: str, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup, total))
