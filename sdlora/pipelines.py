"""Load a base model: the embedded tiny model, a diffusers folder, a single-file SD1.x/SD2.x/SDXL
checkpoint (`.safetensors` as downloaded from Civitai, or `.ckpt`), or a hub id.

    base = load_base()                                   # sample_data/models/tiny-sd
    base = load_base("models/dreamshaper_8.safetensors")  # no network: shipped configs
    base.pipe, base.family, base.name, base.hash

Single files never touch the network: the family is read from the checkpoint's keys, and diffusers'
single-file converters get the configs shipped in sdlora/configs/<family>/ (plus the tokenizer
in sdlora/configs/tokenizer) with local_files_only=True. `.ckpt` files are read with
torch.load(weights_only=True) only, so a pickle that would run code is refused. Only a hub id
("owner/name" that is not a local path) may download.

Model hash (A1111's `Model hash` in infotexts): for a file, its AutoV2 short hash (the first 10 hex
digits of the SHA-256 of the whole file, as A1111 and Civitai show it); for a folder, the first 10
hex digits of a SHA-256 over its sorted relative paths and the SHA-256 of each weight/config file,
so the same weights give the same hash wherever the folder lies.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.errors import FamilyMismatchError, SdloraError
from sdlora.families import CONFIG_DIR, family_of_unet_config, get_family
from sdlora.hashes import file_sha256
from sdlora.sample_data import EMBEDDED_MODEL   # package data: found from any folder

CHECKPOINT_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
# which text-encoder key marks which family (LDM / SGM checkpoint layouts)
_TE_MARKERS = {
    "sdxl": "conditioner.embedders.1.model.positional_embedding",           # CLIP-L + OpenCLIP bigG
    "sd2": "cond_stage_model.model.token_embedding.weight",                 # OpenCLIP ViT-H
    "sd1": "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",  # CLIP-L
}
_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


class CheckpointError(SdloraError):
    """A file or folder that is not a base model this toolkit can load."""


@dataclass
class BaseModel:
    pipe: object                    # a diffusers StableDiffusion(XL)Pipeline
    family: str                     # "sd1" | "sd2" | "sdxl"
    name: str                       # A1111's `Model:` (file stem, folder name or hub id)
    source: str                     # what was loaded: a path or a hub id
    prediction_type: str = "epsilon"
    _hash: str | None = field(default=None, repr=False)

    @property
    def text_encoders(self) -> dict:
        """component name -> text encoder model (one for SD1/SD2, two for SDXL)."""
        return {c: getattr(self.pipe, c) for c in get_family(self.family).text_encoders}

    @property
    def tokenizers(self) -> list:
        return [self.pipe.tokenizer] + ([self.pipe.tokenizer_2] if self.family == "sdxl" else [])

    @property
    def hash(self) -> str | None:
        """A1111 short model hash (10 hex digits), computed on first use (files are hashed whole)."""
        if self._hash is None:
            path = Path(self.source)
            if path.is_file():
                self._hash = file_sha256(path)[:10]
            elif path.is_dir():
                self._hash = folder_hash(path)
        return self._hash


def load_base(spec=None, *, device="cpu", dtype=torch.float32, config_root=CONFIG_DIR,
              base_precision: str | None = None, family: str = "auto") -> BaseModel:
    """The base model named by `spec` (None or "": the embedded tiny model) on `device` in `dtype`.
    `family` other than "auto": a base of another family is an error (FamilyMismatchError).

    `config_root` holds one config folder per family (default: the shipped real-size configs).
    `base_precision` (sdlora.quant: fp8, int8, nf4, ...) stores the UNet/text-encoder weights that
    way, quantized where loaded, before the move to `device`; None/"auto": as `dtype`.
    """
    if not spec:
        spec = EMBEDDED_MODEL
        if not (spec / "model_index.json").is_file():
            raise CheckpointError(f"the embedded model is missing at {spec}; reinstall sdlora or build it with "
                                  "python -m tools.make_base_model from a checkout (see tools/README.md)")
    path = Path(spec).expanduser()
    if path.is_symlink() and not path.exists():     # a broken link or a link loop: say which
        from sdlora.paths import check_input_file
        check_input_file(path, "base model")
    if path.is_dir():
        base = load_folder(path, dtype=dtype)
    elif path.is_file():
        base = load_single_file(path, dtype=dtype, config_root=config_root)
    elif _looks_like_hub_id(str(spec)):
        base = load_hub(str(spec), dtype=dtype)
    else:
        raise FileNotFoundError(f"base model {str(spec)!r} not found: expected a diffusers folder, a "
                                f"{'/'.join(CHECKPOINT_EXTS)} checkpoint file or a hub id like 'owner/name'")
    if base_precision not in (None, "", "auto"):
        from sdlora.quant import quantize_pipeline
        quantize_pipeline(base.pipe, base_precision, dtype)
    check_family(base, family)
    base.pipe.to(device)
    return base


def check_family(base: BaseModel, expected_family: str = "auto") -> BaseModel:
    """`base` itself, or a clear error when it is not the family the caller expects."""
    if expected_family not in ("auto", "", None) and expected_family != base.family:
        raise FamilyMismatchError(
            f"base model {base.name} is {get_family(base.family).label} ({base.family}) but this training "
            f"expects {get_family(expected_family).label} ({expected_family}); pick a matching --base or set "
            "--family auto")
    return base


def as_base(obj, expected_family: str = "auto") -> BaseModel:
    """A BaseModel from a BaseModel or a bare diffusers pipeline (tests, the UI), family-checked."""
    if not isinstance(obj, BaseModel):
        if not hasattr(obj, "unet") or not hasattr(obj, "vae"):
            raise SdloraError(f"base model {type(obj).__name__} is not a Stable Diffusion pipeline (no UNet/VAE)")
        obj = wrap_pipeline(obj, name=type(obj).__name__)
    return check_family(obj, expected_family)


# ---------------------------------------------------------------------------------------------
# folders and hub ids

def _looks_like_hub_id(spec: str) -> bool:
    """"owner/name" that is no local path: not a checkpoint file name, no existing local folder."""
    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", spec) or spec.lower().endswith(CHECKPOINT_EXTS):
        return False
    return not Path(spec.split("/")[0]).exists()


def _folder_kwargs(index: dict) -> dict:
    # SD1/SD2 pipelines: no safety checker (A1111 has none; it would black out images)
    return {"safety_checker": None, "requires_safety_checker": False} \
        if index.get("_class_name") == "StableDiffusionPipeline" else {}


def load_folder(path: Path, *, dtype=torch.float32) -> BaseModel:
    from diffusers import DiffusionPipeline
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{path} is not a diffusers pipeline folder (no model_index.json); expected a "
                              "folder saved by diffusers' save_pretrained or a single checkpoint file")
    index = json.loads(index_file.read_text())
    from sdlora.paths import scan_tree
    scan_tree(path, "the base model folder")      # link loops and broken links: one message, not a traceback
    pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **_folder_kwargs(index))
    return wrap_pipeline(pipe, name=path.name, source=str(path))


def load_hub(repo_id: str, *, dtype=torch.float32) -> BaseModel:
    """A hub id: the only case that may download."""
    from diffusers import DiffusionPipeline
    index = DiffusionPipeline.load_config(repo_id)
    pipe = DiffusionPipeline.from_pretrained(repo_id, dtype=dtype, **_folder_kwargs(index))
    return wrap_pipeline(pipe, name=repo_id, source=repo_id)


def wrap_pipeline(pipe, *, name: str, source: str = "") -> BaseModel:
    """A loaded diffusers pipeline as a BaseModel (family and prediction type read off its configs)."""
    if not hasattr(pipe, "unet"):
        raise CheckpointError(f"{source} holds a {type(pipe).__name__}, not a Stable Diffusion (XL) pipeline with a UNet")
    return BaseModel(pipe, family_of_unet_config(pipe.unet.config), name, source,
                     pipe.scheduler.config.get("prediction_type", "epsilon"))


def folder_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and
                    p.suffix in (".safetensors", ".bin", ".json", ".txt") and p.name != "README.md"):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# single files

def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of a checkpoint file; pickles only with weights_only=True."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from sdlora.formats.container import load_safetensors
        try:
            return load_safetensors(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path.name} is not a readable .safetensors file ({e}); the download may be "
                                  "incomplete: compare its size or hash with the source") from None
    try:
        zipped = zipfile.is_zipfile(path)
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # pickle.UnpicklingError for code-running pickles, others for junk
        from sdlora.formats.container import pickle_refusal
        raise CheckpointError(
            f"{path.name} could not be read as a weights-only PyTorch checkpoint: {pickle_refusal(e)}. sdlora "
            "never runs code stored in a pickle; if you trust the file, convert it to .safetensors, or download "
            "the .safetensors version") from None
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path.name} holds a {type(sd).__name__}, not a state dict")
    return sd, {}


def detect_family(sd: dict) -> str:
    """sd1 / sd2 / sdxl from an LDM/SGM checkpoint's keys, or a CheckpointError saying what it is."""
    keys = sd.keys()
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if not has_unet:
        raise CheckpointError(_not_a_checkpoint(keys))
    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise CheckpointError(f"this checkpoint's UNet takes {conv_in.shape[1]} input channels (an inpainting or "
                              "instruct-pix2pix model); only 4-channel text-to-image checkpoints are supported")
    for family, marker in _TE_MARKERS.items():
        if marker in keys:
            if family == "sdxl" and not any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
                break
            return family
    if "conditioner.embedders.0.model.text_projection" in keys:
        raise CheckpointError("this is an SDXL refiner checkpoint (one OpenCLIP text encoder); only base "
                              "SD1.x/SD2.x/SDXL text-to-image checkpoints are supported")
    raise CheckpointError("this checkpoint has a UNet but no text encoder this toolkit knows (expected "
                          "cond_stage_model.transformer.* for SD1.x, cond_stage_model.model.* for SD2.x, "
                          "conditioner.embedders.0/1.* for SDXL); UNet-only files cannot be loaded as a base model")


def _not_a_checkpoint(keys) -> str:
    sample = [k for _, k in zip(range(3), keys)]
    if any(k.startswith(("lora_", "lycoris_")) or ".lora_" in k or "lora_A" in k or ".hada_" in k for k in keys):
        return "this file is a LoRA/LyCORIS network, not a base model: pass it with --lora (or <lora:NAME:W>)"
    if any(k.startswith(("down_blocks.", "unet.", "text_encoder.")) for k in keys):
        return ("this file has diffusers-style keys (down_blocks.*); single files must use the original LDM layout "
                "(model.diffusion_model.*); pass a diffusers pipeline folder instead")
    return (f"not a Stable Diffusion checkpoint: expected keys starting with {UNET_PREFIX!r}, found e.g. "
            f"{sample or 'no keys at all'}")


def sd2_is_v_prediction(unet, meta: dict, path: Path) -> bool:
    """SD2.x 768-v vs 512-base: safetensors modelspec metadata, then an A1111-style `<name>.yaml`
    next to the file, then A1111's test (`is_using_v_parameterization_for_sd2`): at t=999 on a
    constant input, a v-model's output sits far below its input (mean difference < -1)."""
    pred = (meta.get("modelspec.prediction_type") or "").lower()
    if pred:
        return pred.startswith("v")
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        m = re.search(r"parameterization:\s*[\"']?(\w+)", yaml.read_text(errors="replace"))
        if m:
            return m[1].lower().startswith("v")
    p = next(unet.parameters())
    with torch.no_grad():
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
        ctx = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=p.dtype, device=p.device)
        out = unet(x, torch.tensor([999], device=p.device), ctx).sample
    return float((out - x).float().mean()) < -1


def _fix_clip_prefix(sd: dict) -> dict:
    """Old SD1 checkpoints name CLIP `cond_stage_model.transformer.embeddings...` (no text_model)."""
    old = "cond_stage_model.transformer."
    if old + "embeddings.position_embedding.weight" in sd:
        return {(old + "text_model." + k[len(old):] if k.startswith(old) and not k.startswith(old + "text_model.")
                 else k): v for k, v in sd.items()}
    return sd


def load_single_file(path: Path, *, dtype=torch.float32, config_root=CONFIG_DIR) -> BaseModel:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if path.suffix.lower() not in CHECKPOINT_EXTS:
        raise CheckpointError(f"{path.name}: expected a checkpoint file ({', '.join(CHECKPOINT_EXTS)}) or a folder")
    sd, meta = read_checkpoint(path)
    family = detect_family(sd)
    sd = _fix_clip_prefix(sd)
    cfg = str(Path(config_root) / family)
    common = dict(config=cfg, local_files_only=True)
    # diffusers models take `dtype` (`torch_dtype` is deprecated); its CLIP converter still takes torch_dtype
    try:
        unet = UNet2DConditionModel.from_single_file(sd, subfolder="unet", dtype=dtype, **common)
        vae = AutoencoderKL.from_single_file(sd, subfolder="vae", dtype=dtype, **common)
        te_cls = CLIPTextModel
        parts = {"text_encoder": create_diffusers_clip_model_from_ldm(te_cls, sd, subfolder="text_encoder",
                                                                      torch_dtype=dtype, **common)}
        if family == "sdxl":
            parts["text_encoder_2"] = create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection, sd, subfolder="text_encoder_2", torch_dtype=dtype, **common)
    except (ValueError, RuntimeError, KeyError) as e:  # shape/key mismatches inside the converters
        raise CheckpointError(f"{path.name} looks like an {family} checkpoint but does not match its architecture "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); it may be a merge of another "
                              "architecture or a broken file") from None
    del sd
    scheduler_cfg = json.loads((Path(cfg) / "scheduler" / "scheduler_config.json").read_text())
    prediction = "epsilon"
    if family == "sd2" and sd2_is_v_prediction(unet, meta, path):
        prediction = "v_prediction"
    elif (meta.get("modelspec.prediction_type") or "").lower().startswith("v"):
        prediction = "v_prediction"
    scheduler = getattr(diffusers, scheduler_cfg["_class_name"]).from_config(scheduler_cfg, prediction_type=prediction)
    tok_dir = str(Path(config_root) / "tokenizer") if (Path(config_root) / "tokenizer").is_dir() else str(CONFIG_DIR / "tokenizer")
    # OpenCLIP tokenizers (SD2's, SDXL's second) pad with "!" (id 0), not with <|endoftext|>
    tok_clip = CLIPTokenizer.from_pretrained(tok_dir)
    tok_open = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
    cls = getattr(diffusers, _PIPELINES[family])
    if family == "sdxl":
        pipe = cls(vae=vae, unet=unet, scheduler=scheduler, tokenizer=tok_clip, tokenizer_2=tok_open, **parts)
    else:
        pipe = cls(vae=vae, unet=unet, scheduler=scheduler, tokenizer=tok_open if family == "sd2" else tok_clip,
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)
    return BaseModel(pipe, family, path.stem, str(path), prediction)
