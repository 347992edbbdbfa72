"""The SAI ModelSpec keys of a LoRA file (`modelspec.*`, spec 1.0.1) and kohya's base-model
version, written the same way by the trainer and by `sdlora mix`."""
from __future__ import annotations

import datetime

from sdlora.families import get_family

SPEC_VERSION = "1.0.1"


def base_model_version(family: str, v_prediction: bool = False) -> str:
    """kohya's ss_base_model_version: sd_v1, sd_v2, sd_v2_v (v-prediction), sdxl_base_v1-0."""
    if family == "sdxl":
        return get_family(family).ss_base_model_version
    return ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if v_prediction else "")


def architecture(family: str, v_prediction: bool = False) -> str:
    if family == "sd2":
        return "stable-diffusion-v2-768-v/lora" if v_prediction else "stable-diffusion-v2-512/lora"
    return get_family(family).modelspec_architecture


def modelspec(family: str, *, title: str, when: float | None = None, v_prediction: bool = False) -> dict[str, str]:
    """The keys every LoRA file of ours carries; `when` (a timestamp, default now) is its date."""
    date = datetime.datetime.fromtimestamp(when) if when is not None else datetime.datetime.now()
    return {"modelspec.sai_model_spec": SPEC_VERSION,
            "modelspec.architecture": architecture(family, v_prediction),
            "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if family == "sdxl"
                                         else "diffusers"),
            "modelspec.title": title,
            "modelspec.date": date.replace(microsecond=0).isoformat()}
