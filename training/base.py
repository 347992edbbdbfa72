"""Where the trainer gets its base model: ONE function, `load_base_pipeline(spec)`.

An empty spec means the embedded tiny model, which `sdlora.pipelines.load_base` provides; a path
is a diffusers pipeline folder (what `save_pretrained` writes). When `sdlora.pipelines` is there it
handles every spec (it also reads single-file checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import FamilyMismatchError, SdloraError
from sdlora.families import family_of_unet_config, get_family


@dataclass
class BaseModel:
    pipe: object              # a diffusers StableDiffusion(XL)Pipeline
    family: str               # "sd1" | "sd2" | "sdxl"
    name: str                 # what ss_sd_model_name records
    prediction_type: str      # "epsilon" | "v_prediction"

    @property
    def text_encoders(self) -> dict:
        return {c: getattr(self.pipe, c) for c in get_family(self.family).text_encoders}

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer] + ([self.pipe.tokenizer_2] if self.family == "sdxl" else [])


def _pipelines_load_base():
    try:
        from sdlora.pipelines import load_base
    except ImportError:
        return None
    return load_base


def load_base_pipeline(spec: str | None):
    """The diffusers pipeline named by `spec` (empty: the embedded default model)."""
    load_base = _pipelines_load_base()
    if load_base is not None:
        return load_base(spec or None)
    if not spec:
        raise SdloraError("no --base given and the embedded base model is not available in this install "
                          "(sdlora.pipelines is missing); pass --base PATH to a diffusers model folder")
    path = Path(spec)
    if not (path / "model_index.json").is_file():
        raise SdloraError(f"--base {spec}: expected a diffusers model folder (with model_index.json); "
                          f"{'it has none' if path.is_dir() else 'no such folder'}")
    from diffusers import DiffusionPipeline
    return DiffusionPipeline.from_pretrained(str(path))


def describe_base(pipe, name: str, expected_family: str = "auto") -> BaseModel:
    """Family and prediction type of a loaded pipeline; a clear error when it is not the family
    the config expects."""
    if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
        raise SdloraError(f"base model {name} is not a Stable Diffusion pipeline (no UNet/VAE)")
    family = family_of_unet_config(pipe.unet.config)
    if expected_family not in ("auto", "", None) and expected_family != family:
        raise FamilyMismatchError(f"base model {name} is {get_family(family).label} ({family}) but this "
                                  f"training expects {get_family(expected_family).label} ({expected_family}); "
                                  "pick a matching --base or set --family auto")
    pred = pipe.scheduler.config.get("prediction_type", "epsilon")
    return BaseModel(pipe, family, name, pred)


def load_base(spec: str | None, expected_family: str = "auto") -> BaseModel:
    pipe = load_base_pipeline(spec)
    return describe_base(pipe, Path(spec).name if spec else "tiny-sd (embedded)", expected_family)
