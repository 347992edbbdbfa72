"""The denoising loss: noise (with offset), timesteps, target (epsilon or v) and min-SNR weights.

All random draws come from a generator the caller seeds per micro-batch, so a resumed run draws
exactly what an uninterrupted one would. Draws happen on the CPU (the same numbers on any device).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_noise(shape, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise; with an offset, a per-channel constant is added (Guttenberg's noise offset,
    as kohya/diffusers do), which lets the model change an image's mean brightness."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def draw_timesteps(n: int, num_train_timesteps: int, generator: torch.Generator, low: int = 0,
                   high: int | None = None) -> torch.Tensor:
    """Uniform timesteps in [low, high) (default: all of the schedule's)."""
    high = num_train_timesteps if high is None else min(high, num_train_timesteps)
    return torch.randint(low, high, (n,), generator=generator)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod, timesteps, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma)/SNR for epsilon targets,
    min(SNR, gamma)/(SNR + 1) for v targets."""
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1.0) if prediction_type == "v_prediction" else clipped / s


def target(scheduler, prediction_type: str, latents, noise, timesteps) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r} (expected epsilon or v_prediction)")


def per_sample_loss(pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (fp32)."""
    return F.mse_loss(pred.float(), tgt.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))
