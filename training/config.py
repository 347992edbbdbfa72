"""Every training option, declared once: type, default, help, group (and choices/limits).

The CLI flags (`add_arguments`), the TOML keys (`load_toml`, `TrainConfig.to_toml`), the presets in
`training/presets/` and the UI form (`form_fields`) are all derived from the `TrainConfig`
dataclass below, so they cannot drift apart. Layering, lowest first:
    defaults  <  the base's defaults (no preset)  <  --preset NAME  <  --config FILE.toml  <  flags.

Defaults follow the field's usual style-LoRA settings; each help text names where a default comes
from when it is not obvious (kohya = kohya-ss/sd-scripts train_network.py, diffusers =
diffusers/examples/dreambooth/train_dreambooth_lora.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from sdlora import precisions
from sdlora.errors import SdloraError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"
GROUPS = ("data", "network", "optimization", "loss", "prior", "speed", "output", "samples")


def opt(default, help: str, group: str, *, choices=None, low=None, high=None, cli: bool = True, aliases=(),
        repeat: bool = False, resume: str | None = None, ui: str | None = None, path: bool = False):
    """A config field: its default and the metadata every front end derives from. `repeat`: a list
    flag that may be given several times, each adding values. `resume`: a resumed run must keep
    this value, because it shapes the network ("network") or the data/optimizer stream ("stream").
    `ui`: "main" (shown first in the UI's form) or "managed" (set by the UI from its own folders,
    never typed in). `path`: a filesystem path, which a front end confines to its allowed roots."""
    assert resume in (None, "network", "stream") and ui in (None, "main", "managed")
    meta = {"help": help, "group": group, "choices": choices, "low": low, "high": high, "cli": cli,
            "aliases": tuple(aliases), "repeat": repeat, "resume": resume, "ui": ui, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- data ---
    data_dir: str = opt("", "folder of training images; subfolders named `N_name` (kohya) repeat their images N "
                            "times per epoch (the CLI's FOLDER argument)", "data", cli=False, ui="managed", path=True)
    trigger: str = opt("", "trigger word put first in every caption (and the caption of images without one)", "data", ui="main")
    class_word: str = opt("", "class word after the trigger for images without a caption file, e.g. `style` "
                              "(DreamBooth's `sks dog` pattern)", "data", ui="main")
    caption_extensions: list = opt([".txt", ".caption"], "sidecar caption file extensions, first found wins "
                                   "(kohya reads .caption by default, most taggers write .txt: both)", "data")
    repeats: int = opt(1, "repeats for images in folders without an `N_` prefix (kohya num_repeats)", "data", low=1, resume="stream")
    resolution: int = opt(0, "training resolution: buckets keep about resolution² pixels (0: the base "
                             "model's native size, its UNet sample size x VAE scale: 64 for the embedded "
                             "model, 512 SD1.x, 768 SD2 v-models, 1024 SDXL)", "data", low=0, resume="stream", ui="main")
    buckets: bool = opt(True, "aspect-ratio buckets (kohya --enable_bucket); off: every image is cropped "
                              "square", "data", resume="stream")
    bucket_step: int = opt(64, "bucket sides are multiples of this (kohya bucket_reso_steps=64); raised to "
                               "the model's latent granularity when smaller", "data", low=8, resume="stream")
    min_bucket_reso: int = opt(0, "smallest bucket side in px (0: resolution/2; kohya's fixed default is 256 at "
                                  "512)", "data", low=0, resume="stream")
    max_bucket_reso: int = opt(0, "largest bucket side in px (0: resolution*2; kohya: 1024 at 512)", "data", low=0, resume="stream")
    min_image_size: int = opt(0, "skip images whose shorter side is below this many px (0: resolution/4; "
                                 "upscaling more than 4x only teaches blur)", "data", low=0)
    crop: str = opt("center", "crop to the bucket: center, or random (random crops cannot be cached)", "data",
                    choices=["center", "random"], resume="stream")
    random_flip: bool = opt(False, "flip images horizontally at random (kohya flip_aug, off by default; bad for "
                                   "asymmetric subjects or text)", "data", resume="stream")
    shuffle_caption: bool = opt(False, "shuffle comma-separated caption tags each step (kohya "
                                       "--shuffle_caption)", "data", resume="stream")
    keep_tokens: int = opt(0, "leading caption tags kept in place when shuffling (kohya --keep_tokens; the "
                              "trigger counts as one)", "data", low=0, resume="stream")
    caption_dropout: float = opt(0.0, "probability of training a sample with an empty caption (kohya "
                                      "caption_dropout_rate)", "data", low=0.0, high=1.0, resume="stream")
    # --- network ---
    rank: int = opt(16, "LoRA rank (kohya network_dim); 16-32 is usual for styles", "network", low=1, resume="network", ui="main")
    alpha: float = opt(8.0, "LoRA alpha: updates are scaled by alpha/rank (kohya network_alpha; half the rank "
                            "is the common style setting)", "network", low=0.0, resume="network", ui="main")
    dropout: float = opt(0.0, "dropout on the LoRA input (kohya network_dropout)", "network", low=0.0, high=0.99, resume="stream")
    unet_targets: list = opt(["attn"], "UNet modules: attn (to_q/k/v/out, diffusers' default), proj "
                                       "(proj_in/out), ff (feed-forward), conv (LoCon: resnets and samplers)",
                             "network", choices=["attn", "proj", "ff", "conv"], resume="network")
    conv_rank: int = opt(0, "rank of 3x3 conv layers for the conv target (kohya conv_dim; 0: off)", "network",
                         low=0, resume="network")
    conv_alpha: float = opt(1.0, "alpha of 3x3 conv layers (kohya conv_alpha default 1)", "network", low=0.0, resume="network")
    train_text_encoder: bool = opt(False, "also train LoRA layers in the text encoder(s) (off: their "
                                          "embeddings are cached)", "network", resume="network", ui="main")
    base_lora: list = opt([], "LoRA files applied to the base before training, PATH or PATH:WEIGHT (weight "
                              "default 1.0; repeat the flag for a stack): the new LoRA trains on top of that mix "
                              "(kohya --base_weights / --base_weights_multiplier)", "network", repeat=True, resume="stream")
    text_targets: list = opt(["attn"], "text-encoder modules: attn (q/k/v/out_proj), mlp (fc1/fc2)",
                             "network", choices=["attn", "mlp"], resume="network")
    # --- optimization ---
    steps: int = opt(1600, "total optimizer steps (kohya max_train_steps default 1600); epochs are derived",
                     "optimization", low=1, ui="main")
    epochs: int = opt(0, "train this many epochs instead of --steps (0: use --steps)", "optimization", low=0)
    batch_size: int = opt(1, "images per step and process (kohya train_batch_size)", "optimization", low=1, resume="stream")
    grad_accum: int = opt(1, "gradient accumulation micro-batches per optimizer step", "optimization", low=1, resume="stream")
    unet_lr: float = opt(1e-4, "UNet LoRA learning rate (kohya learning_rate default 1e-4)", "optimization",
                         low=0.0, resume="stream", ui="main")
    text_encoder_lr: float = opt(5e-5, "text-encoder LoRA learning rate (half the UNet's, the usual "
                                       "kohya setting)", "optimization", low=0.0, resume="stream", ui="main")
    optimizer: str = opt("adamw", "adamw (torch), adamw8bit (bitsandbytes; falls back to adamw with a warning "
                                  "when it cannot load), prodigy (prodigyopt; use lr 1.0)", "optimization",
                         choices=["adamw", "adamw8bit", "prodigy"], resume="stream")
    weight_decay: float = opt(1e-2, "AdamW weight decay (torch/diffusers default 1e-2)", "optimization", low=0.0)
    adam_beta1: float = opt(0.9, "Adam beta1", "optimization", low=0.0, high=1.0)
    adam_beta2: float = opt(0.999, "Adam beta2", "optimization", low=0.0, high=1.0)
    adam_epsilon: float = opt(1e-8, "Adam epsilon", "optimization", low=0.0)
    max_grad_norm: float = opt(1.0, "clip the gradient norm (kohya/diffusers default 1.0; 0: off)",
                               "optimization", low=0.0)
    lr_scheduler: str = opt("constant", "learning-rate schedule after warmup (kohya/diffusers default "
                                        "constant)", "optimization", choices=["constant", "cosine", "linear"], resume="stream")
    lr_warmup_steps: int = opt(0, "linear warmup steps", "optimization", low=0, resume="stream")
    seed: int = opt(42, "seed for LoRA init, data order, noise and timesteps (fixed so runs reproduce)",
                    "optimization", low=0, resume="stream")
    # --- loss ---
    min_snr_gamma: float = opt(0.0, "min-SNR-gamma loss weighting (Hang et al. 2023 recommend 5; 0: off)",
                               "loss", low=0.0, resume="stream")
    noise_offset: float = opt(0.0, "noise offset (0.05-0.1 lets the model learn very dark/bright images; "
                                   "0: off)", "loss", low=0.0, resume="stream")
    min_timestep: int = opt(0, "train on timesteps >= this only (kohya min_timestep)", "loss", low=0, high=999,
                            resume="stream")
    max_timestep: int = opt(1000, "train on timesteps < this only (kohya max_timestep). Low timesteps (little "
                                  "noise) hold texture and line, high ones composition and colour: a lower "
                                  "max_timestep leaves more of the base's content alone", "loss", low=1, high=1000,
                            resume="stream")
    uncond_preservation: float = opt(0.0, "weight of a loss that keeps the LoRA's prediction for the empty "
                                    "prompt equal to the base model's (0: off). Images are made with classifier-free "
                                    "guidance, which scales up what the prompt changes but not what a LoRA changes for "
                                    "every prompt; with this term the style becomes part of what the trigger and "
                                    "captions change, so guidance keeps it. Costs one more forward and backward pass "
                                    "per step", "loss", low=0.0, resume="stream")
    prediction_type: str = opt("auto", "training target: auto (from the scheduler config), epsilon or "
                                       "v_prediction", "loss", choices=["auto", "epsilon", "v_prediction"], resume="stream")
    clip_skip: int = opt(1, "use the text encoder's n-th last layer (SD1 only; 2 for anime-style bases)",
                         "loss", low=1)
    # --- prior preservation (DreamBooth) ---
    prior_preservation: bool = opt(False, "DreamBooth prior preservation with class images", "prior", ui="main")
    class_data_dir: str = opt("", "folder of class images (missing ones are generated with the base model; "
                                  "default: <output>-class-images)", "prior", path=True)
    class_prompt: str = opt("", "prompt of the class images (default: the class word)", "prior")
    num_class_images: int = opt(100, "class images wanted (diffusers default 100)", "prior", low=1)
    prior_loss_weight: float = opt(1.0, "weight of the class-image loss (kohya/diffusers default 1.0)",
                                   "prior", low=0.0, resume="stream")
    # --- speed / precision ---
    mixed_precision: str = opt("no", "no (fp32), fp16 or bf16: base weights are stored in that dtype, LoRA "
                                     "weights stay fp32", "speed", choices=["no", "fp16", "bf16"])
    base_precision: str = opt(precisions.DEFAULT, precisions.HELP, "speed", choices=list(precisions.CHOICES), resume="stream")
    gradient_checkpointing: bool = opt(False, "trade compute for memory in the UNet", "speed")
    cache_latents: str = opt("memory", "encode every image once with the VAE and keep the latents in memory "
                                       "or on disk (none: encode each step)", "speed",
                             choices=["none", "memory", "disk"])
    cache_text: bool = opt(True, "keep the frozen text encoders' outputs per caption in memory (ignored when "
                                 "they are trained or captions are shuffled)", "speed")
    cache_dir: str = opt("", "where disk caches go (default: <output>-cache)", "speed", ui="managed", path=True)
    vae_batch_size: int = opt(4, "images per VAE encode while caching", "speed", low=1)
    device: str = opt("auto", "auto (accelerate's choice: GPU when present), cpu or cuda", "speed",
                      choices=["auto", "cpu", "cuda"])
    # --- output ---
    output: str = opt("", "the LoRA file to write (.safetensors)", "output", aliases=("--out", "-o"), ui="managed", path=True)
    base: str = opt("", ("base model: a diffusers folder, a single-file .safetensors/.ckpt checkpoint (SD1.x/SD2.x/SDXL) "
                           "or a hub id owner/name (default: the embedded tiny model)"), "output", ui="managed")
    family: str = opt("auto", "expected base family (sd1, sd2, sdxl): a different base is an error", "output",
                      choices=["auto", "sd1", "sd2", "sdxl"])
    save_format: str = opt("kohya", "kohya (A1111/ComfyUI/Civitai) or diffusers key names", "output",
                           choices=["kohya", "diffusers"])
    save_precision: str = opt("fp16", "dtype of the saved LoRA (fp16 is what kohya files usually hold)",
                              "output", choices=["fp32", "fp16", "bf16"])
    save_every: int = opt(0, "write a checkpoint every N steps (0: only at the end)", "output", low=0)
    keep_checkpoints: int = opt(0, "keep only the newest N step checkpoints (0: keep all)", "output", low=0)
    checkpoint_dir: str = opt("", "where checkpoints and sample images go (default: checkpoints/<name>/ in "
                                  "the current folder, never the LoRA folder)", "output", ui="managed", path=True)
    resume: str = opt("", "continue from a checkpoint folder with the options stored in it (`sdlora train "
                          "--resume DIR` alone; the result equals an uninterrupted run)", "output", ui="managed", path=True)
    preview: bool = opt(True, "write <name>.preview.png beside the LoRA (A1111's card image): the last sample, "
                              "or one image rendered at the end", "output")
    comment: str = opt("", "free text stored as ss_training_comment", "output")
    # --- samples ---
    sample_every: int = opt(0, "generate sample images every N steps (0: off)", "samples", low=0)
    sample_prompts: list = opt([], "prompts of the sample images (default: the trigger + class word)", "samples")
    sample_seed: int = opt(1234, "seed of every sample image (fixed so samples are comparable)", "samples",
                           low=0)
    sample_steps: int = opt(20, "denoising steps per sample image", "samples", low=1)
    sample_cfg: float = opt(7.0, "classifier-free guidance scale of samples (A1111 default 7)", "samples",
                            low=0.0)
    sample_size: int = opt(0, "sample image side in px (0: the training resolution)", "samples", low=0)

    # ----------------------------------------------------------------------------------------
    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "TrainConfig":
        """Check types, choices and ranges of every field, and the combinations that cannot work."""
        hints = _hints()
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f, hints[f.name], getattr(self, f.name)))
        if self.crop == "random" and self.cache_latents != "none":
            raise SdloraError("random crops cannot be cached: use --crop center, or --cache-latents none")
        if "conv" in self.unet_targets and not self.conv_rank:
            raise SdloraError("the conv (LoCon) target needs --conv-rank N (e.g. 8)")
        if self.prior_preservation and not (self.class_prompt or self.class_word):
            raise SdloraError("prior preservation needs --class-prompt (or --class-word), e.g. 'a painting'")
        if self.base_lora:
            for spec in self.base_lora:
                base_lora_spec(spec)         # PATH[:WEIGHT] (the files are checked when training starts)
        if self.min_timestep >= self.max_timestep:
            raise SdloraError(f"min_timestep {self.min_timestep} must be below max_timestep {self.max_timestep}")
        if self.min_bucket_reso and self.max_bucket_reso and self.min_bucket_reso > self.max_bucket_reso:
            raise SdloraError(f"min_bucket_reso {self.min_bucket_reso} > max_bucket_reso {self.max_bucket_reso}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self, only_changed: bool = False) -> str:
        """TOML text of this config (flat keys, one per field, grouped by comments)."""
        default = TrainConfig()
        lines = []
        for group in GROUPS:
            body = [f"{f.name} = {_toml_value(getattr(self, f.name))}" for f in dataclasses.fields(self)
                    if f.metadata["group"] == group
                    and not (only_changed and getattr(self, f.name) == getattr(default, f.name))]
            if body:
                lines += [f"# {group}"] + body + [""]
        return "\n".join(lines)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))   # a JSON string is a valid TOML basic string


def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def _coerce(f: dataclasses.Field, typ, value):
    """The value converted to the field's type, or a clear error naming the field."""
    name, meta = f.name, f.metadata
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            elif not isinstance(value, bool):
                raise ValueError(value)
        elif typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            value = int(value)
        elif typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            value = float(value)
        elif typ is list:
            if isinstance(value, str):
                value = [value]
            value = [str(x) for x in value]
        else:
            value = "" if value is None else str(value)
    except (TypeError, ValueError):
        raise SdloraError(f"option {name}: expected {typ.__name__}, got {value!r}") from None
    choices = meta.get("choices")
    if choices:
        for v in (value if isinstance(value, list) else [value]):
            if v not in choices:
                raise SdloraError(f"option {name}: {v!r} is not one of {', '.join(choices)}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and value < low or high is not None and value > high:
        raise SdloraError(f"option {name}: {value} is outside [{low}, {high if high is not None else '∞'}]")
    return value


def fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def form_fields() -> list[dict]:
    """Everything a UI needs to build a form: name, type, default, help, group, choices, limits,
    placement (`ui`) and path-ness."""
    hints = _hints()
    default = TrainConfig()
    return [{"name": f.name, "type": hints[f.name].__name__, "default": getattr(default, f.name),
             **{k: f.metadata[k] for k in ("help", "group", "choices", "low", "high", "ui", "path")}}
            for f in fields()]


def option_names(**facts) -> tuple[str, ...]:
    """Names of the options whose declaration has all these facts, in declaration order, e.g.
    option_names(resume="network")."""
    return tuple(f.name for f in fields() if all(f.metadata[k] == v for k, v in facts.items()))


# ---------------------------------------------------------------------------------------------
# TOML files and presets

def _check_keys(data: dict, where: str) -> dict:
    names = [f.name for f in fields()]
    flat = {}
    for k, v in data.items():
        if isinstance(v, dict) and k in GROUPS:      # [group] tables are accepted too
            flat.update(v)
        else:
            flat[k] = v
    for k in flat:
        if k not in names:
            hint = difflib.get_close_matches(k, names, n=1)
            raise SdloraError(f"{where}: unknown option {k!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    return flat


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SdloraError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SdloraError(f"config file {path} is not valid TOML: {e}") from None


def load_toml(path) -> dict:
    """The options set in a TOML file (keys are the field names; [group] tables allowed)."""
    path = Path(path)
    data = _read_toml(path)
    if "job" in data:
        raise SdloraError(f"config file {path} has [[job]] tables (several LoRAs in one run): use it as "
                          "`sdlora train --config FILE --out-dir DIR`, not as a preset or a single run's config")
    return _check_keys(data, str(path))


def has_jobs(path) -> bool:
    """Whether a TOML file describes several jobs (a [[job]] array)."""
    return "job" in _read_toml(Path(path))


def load_jobs(path) -> tuple[dict, list[dict], str]:
    """(shared options, one dict of options per [[job]] table, out_dir) of a several-LoRA TOML file:
    top-level keys are shared by every job, each [[job]] sets its own (data_dir, trigger, rank, ...)."""
    path = Path(path)
    data = _read_toml(path)
    jobs = data.pop("job", [])
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise SdloraError(f"config file {path}: `job` must be an array of tables ([[job]] sections), one per LoRA")
    out_dir = data.pop("out_dir", "")
    if not isinstance(out_dir, str):
        raise SdloraError(f"config file {path}: out_dir must be a folder path string, got {out_dir!r}")
    shared = _check_keys(data, str(path))
    tables = [_check_keys(j, f"{path} [[job]] {i}") for i, j in enumerate(jobs, 1)]
    for i, t in enumerate(tables, 1):
        if not t.get("data_dir"):
            raise SdloraError(f"config file {path} [[job]] {i}: no data_dir; give each job its folder of images")
    return shared, tables, out_dir


def presets() -> dict[str, Path]:
    """Preset name -> file. Names are the file stems (`style-sd15`) and the titles in their first line."""
    out = {}
    for p in sorted(PRESET_DIR.glob("*.toml")):
        out[p.stem] = p
        first = p.read_text(encoding="utf-8").splitlines()[0]
        if first.startswith("# preset:"):
            out[first.split(":", 1)[1].strip()] = p
    return out


def load_preset(name: str) -> dict:
    table = presets()
    key = next((k for k in table if k.lower() == name.lower()), None)
    if key is None:
        raise SdloraError(f"unknown preset {name!r}; presets: {', '.join(sorted({p.stem for p in table.values()}))}")
    return load_toml(table[key])


def given_values(*, preset: str | None = None, config_file=None, overrides: dict | None = None) -> dict:
    """The options set by a preset < config file < overrides (no defaults)."""
    values = {}
    if preset:
        values.update(load_preset(preset))
    if config_file:
        values.update(load_toml(config_file))
    values.update(_check_keys(overrides or {}, "options"))
    return values


# Base models whose good training settings are far from the SD1.5-sized defaults bring their own: the
# embedded 64 px model learns a style in a few CPU minutes with tiny-cpu-demo, while the defaults
# (rank 16, lr 1e-4, 1600 steps) take most of an hour there and barely move it. The device stays
# the user's choice (auto), so the layer never pins a CUDA user to the CPU.
BASE_PRESETS = {"embedded": "tiny-cpu-demo"}


def base_defaults(base) -> tuple[str, dict]:
    """(preset name, its values) that a base model brings as defaults, or ("", {})."""
    from sdlora.pipelines import EMBEDDED_MODEL
    embedded = not base or Path(base).expanduser().resolve() == EMBEDDED_MODEL.resolve()
    name = BASE_PRESETS["embedded"] if embedded else ""
    values = {k: v for k, v in load_preset(name).items() if k != "device"} if name else {}
    return name, values


def build_config(*, preset: str | None = None, config_file=None, overrides: dict | None = None) -> TrainConfig:
    """defaults < the base model's defaults (when no preset is chosen) < preset < config file <
    overrides (e.g. the flags given on the command line)."""
    values = given_values(preset=preset, config_file=config_file, overrides=overrides)
    if not preset:
        values = {**base_defaults(values.get("base"))[1], **values}
    return TrainConfig(**values).validate()


# ---------------------------------------------------------------------------------------------
# resuming: the checkpoint's config is the run's config

PATH_KEYS = ("data_dir", "output", "base", "checkpoint_dir", "class_data_dir", "cache_dir")


def base_lora_spec(spec: str) -> tuple[str, float]:
    """(path, weight) of a --base-lora argument: the --lora grammar with one weight."""
    from sdlora.extra_networks import split_lora_arg
    path, te, unet = split_lora_arg(spec, "--base-lora")
    if te != unet:
        raise SdloraError(f"--base-lora {spec!r}: a base LoRA takes one weight (PATH:WEIGHT), not TE:UNET")
    return path, te


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The config with its paths absolute, so a checkpoint's copy works from any folder (a base
    that is no existing path, e.g. a hub id, stays as it is)."""
    changes = {k: str(Path(getattr(cfg, k)).expanduser().resolve()) for k in PATH_KEYS
               if getattr(cfg, k) and (k != "base" or Path(getattr(cfg, k)).expanduser().exists())}
    if cfg.base_lora:
        specs = [base_lora_spec(spec) for spec in cfg.base_lora]
        changes["base_lora"] = [f"{Path(p).expanduser().resolve()}:{w!r}" for p, w in specs]
    return cfg.replace(**changes)


def resume_config(stored: dict, given: dict, resume: str) -> TrainConfig:
    """The run stored in a checkpoint, continued from `resume`. Options in `given` (preset, config
    file, flags) may repeat the stored ones; any that differ are an error listing them all."""
    names = {f.name for f in fields()}
    old = absolute_paths(TrainConfig(**{k: v for k, v in stored.items() if k in names}).validate())
    new = absolute_paths(old.replace(**given).validate())
    diffs = [f"  {flag(k) if k != 'data_dir' else 'FOLDER'}: checkpoint {getattr(old, k)!r}, given {getattr(new, k)!r}"
             for k in given if k != "resume" and getattr(old, k) != getattr(new, k)]
    if diffs:
        raise SdloraError(f"--resume {resume}: options differ from the run stored in the checkpoint "
                          "(leave them out to continue that run, or start a new one):\n" + "\n".join(diffs))
    return old.replace(resume=str(resume))


# ---------------------------------------------------------------------------------------------
# argparse

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, skip=()) -> None:
    """One flag per field (`--unet-lr`), grouped as in the config. Flags default to SUPPRESS so
    `overrides_from_args` sees only what the user typed."""
    hints = _hints()
    default = TrainConfig()
    groups = {g: parser.add_argument_group(f"{g} options") for g in GROUPS}
    for f in fields():
        if f.name in skip or not f.metadata["cli"]:
            continue
        typ, meta = hints[f.name], f.metadata
        dflt = getattr(default, f.name)
        help_ = meta["help"] + (f" [default: {dflt!r}]" if dflt not in ("", []) else "")
        kw = dict(default=argparse.SUPPRESS, help=help_.replace("%", "%%"), dest=f.name)
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typ is list and meta.get("repeat"):
            kw.update(action="extend", nargs="+", metavar="VALUE")
        elif typ is list:
            kw.update(nargs="*", metavar=meta["choices"] and "{" + ",".join(meta["choices"]) + "}" or "VALUE")
        else:
            kw.update(type=typ, choices=meta["choices"])
        groups[meta["group"]].add_argument(*meta["aliases"], flag(f.name), **kw)


def overrides_from_args(args: argparse.Namespace) -> dict:
    names = {f.name for f in fields()}
    return {k: v for k, v in vars(args).items() if k in names}
