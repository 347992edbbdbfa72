"""A1111 sampler names -> diffusers schedulers.

A1111 (and Civitai's infotexts) name a sampler and its sigma schedule together ("DPM++ 2M Karras");
A1111 >= 1.9 writes them apart ("Sampler: DPM++ 2M, Schedule type: Karras"), which `sampler_name`
folds back into the combined label. Only schedulers that need nothing beyond diffusers are listed
(LMS needs scipy, DPM++ SDE needs torchsde).
"""
from __future__ import annotations

DEFAULT_SAMPLER = "DPM++ 2M Karras"   # A1111's default since 1.6

# label -> (diffusers scheduler class name, extra config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 2S a": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
}
# what a model's scheduler config says about its training noise schedule (the rest is the sampler's)
NOISE_SCHEDULE_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
                       "clip_sample", "clip_sample_range", "set_alpha_to_one", "thresholding",
                       "dynamic_thresholding_ratio", "sample_max_value"}
_SCHEDULE_SUFFIX = {"karras": " Karras", "automatic": "", "uniform": "", "": ""}


def sampler_name(label: str, schedule_type: str | None = None) -> str:
    """The canonical label for a user's or an infotext's sampler (case-insensitive), with an
    A1111 >= 1.9 `Schedule type` folded in. Raises ValueError listing the known labels."""
    wanted = label.strip()
    if schedule_type and schedule_type.strip().lower() in _SCHEDULE_SUFFIX:
        wanted += _SCHEDULE_SUFFIX[schedule_type.strip().lower()]
    for name in SAMPLERS:
        if name.lower() == wanted.lower():
            return name
    if schedule_type:  # a schedule this table does not model: keep the sampler itself
        return sampler_name(label)
    raise ValueError(f"unknown sampler {label!r}; expected one of: {', '.join(SAMPLERS)}")


def make_scheduler(label: str, base_config):
    """A diffusers scheduler for an A1111 sampler label, keeping the model's noise schedule
    (betas, prediction type, timestep spacing, x0 clipping: NOISE_SCHEDULE_KEYS) from `base_config`."""
    import diffusers
    cls_name, extra = SAMPLERS[sampler_name(label)]
    # only the model's noise schedule: a pipeline's scheduler config may be the previous sampler's,
    # whose own settings must not carry over ("DPM++ 2M" after "DPM++ 2M Karras" kept Karras sigmas)
    cfg = {k: v for k, v in dict(base_config).items() if k in NOISE_SCHEDULE_KEYS}
    return getattr(diffusers, cls_name).from_config(cfg, **extra)
