"""The trainer's base model: `sdlora.pipelines.load_base`, checked against the family a config expects."""
from __future__ import annotations

from sdlora.errors import FamilyMismatchError, SdloraError
from sdlora.families import get_family
from sdlora.pipelines import BaseModel, load_base as _load_base, wrap_pipeline


def check_family(base: BaseModel, expected_family: str = "auto") -> BaseModel:
    """`base` itself, or a clear error when it is not the family the training expects."""
    if expected_family not in ("auto", "", None) and expected_family != base.family:
        raise FamilyMismatchError(
            f"base model {base.name} is {get_family(base.family).label} ({base.family}) but this training "
            f"expects {get_family(expected_family).label} ({expected_family}); pick a matching --base or set "
            "--family auto")
    return base


def as_base(obj, expected_family: str = "auto") -> BaseModel:
    """A BaseModel from a BaseModel or a bare diffusers pipeline (tests, the UI)."""
    if not isinstance(obj, BaseModel):
        if not hasattr(obj, "unet") or not hasattr(obj, "vae"):
            raise SdloraError(f"base model {type(obj).__name__} is not a Stable Diffusion pipeline (no UNet/VAE)")
        obj = wrap_pipeline(obj, name=type(obj).__name__)
    return check_family(obj, expected_family)


def load_base(spec: str | None, expected_family: str = "auto") -> BaseModel:
    """The base model named by `spec` (empty: the embedded tiny model), family-checked."""
    return check_family(_load_base(spec or None), expected_family)
