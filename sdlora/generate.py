"""`sdlora generate`: text to image with a base model and any LoRAs, PNGs with A1111 infotext.

    sdlora generate "a red circle on a blue background <lora:neon:0.8>" --seed 1 --batch 4 --out outputs

Seeds are A1111's: image i of a batch uses seed + i, its initial noise drawn by a CPU generator, so
a seed gives the same picture on every run on the same device (and the noise itself is the same on
any device). Seed -1 picks a random one, which the infotext records.

torch and diffusers are imported inside the functions, so `sdlora generate --help` is instant.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Callable

from sdlora import __version__
from sdlora.atomic import atomic_write
from sdlora.errors import SdloraError
from sdlora.infotext import PNG_KEY, build, lora_hashes_value
from sdlora.samplers import DEFAULT_SAMPLER, SAMPLERS, make_scheduler, sampler_name

if TYPE_CHECKING:
    from sdlora.extra_networks import LoraRef

DEFAULT_STEPS, DEFAULT_CFG = 20, 7.0   # A1111's defaults
DEFAULT_LORA_DIR = "loras"


@dataclass
class Generated:
    image: object        # PIL.Image
    seed: int
    infotext: str
    mode: str = "patched"   # how the LoRA mix was applied: "patched" (weights) or "routed" (per image)


def apply_loras(pipe, loras: list[LoraRef]) -> None:
    """Make `loras` the active LoRA mix of `pipe` (an empty list restores the base weights): patched
    into the weights, or routed by hooks on a quantized base (routing.set_active)."""
    from sdlora.mixing import MixEntry
    from sdlora.routing import set_active
    set_active(pipe, [MixEntry.of(r) for r in loras])


def lora_hash(path: Path) -> str:
    """A1111's `Lora hashes` value: the first 12 hex digits of the addnet hash (safetensors) or of
    the file's SHA-256 (other files)."""
    from sdlora.hashes import addnet_hash, file_sha256
    return (addnet_hash(path) if path.suffix.lower() == ".safetensors" else file_sha256(path))[:12]


def native_size(pipe) -> int:
    """The image side the model was trained at (64 for the tiny model, 512/768/1024 for SD1/SD2/SDXL)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def generate(base, prompt: str, **kwargs) -> list[Generated]:
    """Images for `prompt` on `base` (a pipelines.BaseModel); see generate_prompts for the options."""
    return generate_prompts(base, [prompt], **kwargs)


def generate_prompts(base, prompts: list[str], *, negative: str = "", loras: list[LoraRef] = (), seed: int = -1,
                     steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, sampler: str = DEFAULT_SAMPLER,
                     width: int | None = None, height: int | None = None, batch: int = 1,
                     lora_dir=DEFAULT_LORA_DIR, progress: bool = True, mode: str = "auto",
                     prompt_loras: Sequence[Sequence[LoraRef]] | None = None, seeds: Sequence[int] | None = None,
                     on_step: Callable[[int, int], None] | None = None, s_min_uncond: float = 0.0) -> list[Generated]:
    """`batch` images per prompt, all in one pipeline run. `<lora:...>` tags in each prompt are looked
    up in `lora_dir` and apply to that prompt's images only, with `loras` (explicit LoraRefs with
    paths) on every image and `prompt_loras[i]` (LoraRefs with paths, one list per prompt) on prompt
    i's images only; the infotext shows both as tags after the prompt. One mix for all images is
    patched into the weights; different mixes are routed per image (sdlora.routing); `mode` ("auto",
    "patch", "route") forces one, and each result's `mode` says which was used. Image i
    (prompt-major) uses seed + i, or seeds[i] when `seeds` (one per image) is given.
    `on_step(done, total)` is called after each denoising step (the UI's progress bar).
    `s_min_uncond` > 0: no CFG for the steps whose sigma is below it (A1111's NGMS; sdlora.guidance)."""
    import torch
    from sdlora.extra_networks import parse_prompt, resolve
    from sdlora.guidance import check_s_min_uncond, guidance_kwargs
    from sdlora.mixing import MixEntry
    from sdlora.routing import use_mixes
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be at least 1 (got steps={steps}, batch={batch})")
    check_s_min_uncond(s_min_uncond)
    if not prompts:
        raise ValueError("no prompt given")
    own = [list(refs) for refs in prompt_loras] if prompt_loras is not None else [[] for _ in prompts]
    if len(own) != len(prompts) or any(r.path is None for refs in own for r in refs):
        raise ValueError("prompt_loras: one list of LoraRefs with paths per prompt")
    if seeds is not None and len(seeds) != len(prompts) * batch:
        raise ValueError(f"seeds: one per image ({len(prompts) * batch}), got {len(seeds)}")
    sampler = sampler_name(sampler)
    parsed = [parse_prompt(p) for p in prompts]
    per_prompt = [resolve(tags, lora_dir) + list(loras) + mine for (_, tags), mine in zip(parsed, own)]
    texts = [text for text, _ in parsed for _ in range(batch)]
    image_loras = [refs for refs in per_prompt for _ in range(batch)]
    shown = [" ".join([p] + [r.tag for r in list(loras) + mine]).strip() for p, mine in zip(prompts, own)
             for _ in range(batch)]
    mixes = [[MixEntry.of(r) for r in refs] for refs in image_loras]
    pipe = base.pipe
    side = native_size(pipe)
    width, height = width or side, height or side
    if seeds is not None:
        seeds = [int(s) for s in seeds]
    else:
        seed = random_seed() if seed is None or seed < 0 else seed
        seeds = [seed + i for i in range(len(texts))]
    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=not progress, desc=f"{sampler}, {steps} steps")
    step_kw = guidance_kwargs(pipe, cfg, steps, s_min_uncond, chain=_step_callback(on_step, steps) if on_step else None)
    with torch.no_grad(), use_mixes(pipe, mixes, mode=mode) as how:
        images = pipe(texts, negative_prompt=[negative] * len(texts) if negative else None,
                      num_inference_steps=steps, width=width, height=height,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], **step_kw).images
    return _results(base, images, seeds, shown, image_loras, how, negative=negative, steps=steps, cfg=cfg,
                    sampler=sampler, size=f"{width}x{height}", s_min_uncond=s_min_uncond)


def _results(base, images, seeds, shown, image_loras, how: str, *, negative: str, steps: int, cfg: float,
             sampler: str, size: str, s_min_uncond: float = 0.0) -> list[Generated]:
    """Each image with its A1111 infotext. The infotext keeps the prompt as written (with its tags)
    plus tags for --lora LoRAs, as A1111 does, so "reuse parameters" brings the LoRAs back; hashes
    name that image's own LoRAs (each file hashed once)."""
    hashes = {}
    out = []
    for image, s, text, refs in zip(images, seeds, shown, image_loras):
        for r in refs:
            if r.path not in hashes:
                hashes[r.path] = lora_hash(r.path)
        value = lora_hashes_value({r.name: hashes[r.path] for r in refs}) if refs else None
        params = {"Steps": steps, "Sampler": sampler, "CFG scale": f"{cfg:g}", "Seed": s, "Size": size,
                  "Model hash": base.hash, "Model": base.name, "Lora hashes": value,
                  # A1111's names; "all steps": sdlora skips every step below the sigma, A1111 by default every other
                  "NGMS": f"{s_min_uncond:g}" if s_min_uncond else None,
                  "NGMS all steps": "True" if s_min_uncond else None, "Version": f"sdlora {__version__}"}
        out.append(Generated(image, s, build(text, negative, params), how))
    return out


def _step_callback(on_step: Callable[[int, int], None], steps: int):
    def step_end(p, i, t, tensors):
        # Heun/DPM2 evaluate twice per step: the pipeline's own count is the total
        on_step(i + 1, getattr(p, "num_timesteps", None) or steps)
        return tensors
    return step_end


def random_seed() -> int:
    """What seed -1 becomes (A1111's range)."""
    return random.randrange(2**32 - 1)


def generate_batches(base, prompt: str, *, count: int = 1, batch: int = 1, seed: int = -1,
                     on_step: Callable[[int, int, int], None] | None = None, **kwargs) -> Iterator[list[Generated]]:
    """A1111's "batch count": `count` runs of `batch` images of `prompt`, seeds running on across them
    (seed, seed+1, ...; seed -1 picks one random start). Yields each run's results as it finishes (so
    the caller can save them before the next); `on_step(n, done, total)` after each step of run n.
    The other options are generate_prompts'."""
    if count < 1:
        raise ValueError(f"count must be at least 1 (got {count})")
    seed = random_seed() if seed is None or seed < 0 else int(seed)
    for n in range(count):
        step = None if on_step is None else (lambda done, total, n=n: on_step(n, done, total))
        yield generate_prompts(base, [prompt], seed=seed + n * batch, batch=batch, on_step=step, **kwargs)


def save_png(result: Generated, out_dir) -> Path:
    """Write `NNNNN-SEED.png` atomically, never over an existing file.

    As A1111: the number continues the folder's highest (any digit count), and a name already taken
    (a file or folder of that name) moves on to the next free number.
    """
    from PIL.PngImagePlugin import PngInfo
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(PNG_KEY, result.infotext)
    numbers = [int(m[1]) for p in out_dir.iterdir() if (m := re.match(r"(\d+)-", p.name))]
    n = max(numbers, default=-1) + 1
    while True:
        path = out_dir / f"{n:05d}-{result.seed}.png"
        try:
            return atomic_write(path, lambda tmp: result.image.save(tmp, format="PNG", pnginfo=info), overwrite=False)
        except (FileExistsError, SdloraError):
            if not (path.exists() or path.is_symlink()):
                raise
            n += 1       # taken meanwhile (another run writing here): the next number


# ---------------------------------------------------------------------------------------------
# command line

def add_arguments(parser, name: str = "generate") -> None:
    parser.add_argument("prompt", nargs="?", default=None,
                        help="the prompt; <lora:NAME:W> / <lora:NAME:TE:UNET> tags apply LoRAs")
    parser.add_argument("--prompt", dest="more_prompts", action="append", default=[], metavar="TEXT",
                        help="another prompt (repeatable); each prompt's <lora:...> tags apply to its own images, "
                             "all generated in one batch")
    parser.add_argument("--prompts", default=None, metavar="FILE", help="a file of prompts, one per line")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--base", default=None, metavar="SPEC",
                        help="base model: a diffusers folder, a .safetensors/.ckpt checkpoint or a hub id "
                             "(default: the embedded tiny model)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:W]",
                        help="apply a LoRA file with weight W (or TE:UNET weights); repeatable")
    parser.add_argument("--loras", default=DEFAULT_LORA_DIR, metavar="DIR",
                        help=f"folder where <lora:NAME> tags are looked up (default: ./{DEFAULT_LORA_DIR})")
    parser.add_argument("--seed", type=int, default=-1, help="seed (-1: random); image i of a batch uses seed+i")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"denoising steps (default {DEFAULT_STEPS}); more steps take longer")
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG, help="classifier-free guidance scale")
    parser.add_argument("--s-min-uncond", type=float, default=0.0, metavar="SIGMA",
                        help="no CFG once the noise level sigma is below SIGMA (A1111's 'Negative Guidance minimum "
                             "sigma', NGMS; SD's sigmas run from 14.6 to 0.03); 0 (default, as A1111): CFG every step")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, metavar="NAME",
                        help=f"A1111 sampler name (default {DEFAULT_SAMPLER!r}); one of: {', '.join(SAMPLERS)}")
    parser.add_argument("--width", type=int, default=None, help="default: the model's native size (512 for SD1.x, 1024 for SDXL)")
    parser.add_argument("--height", type=int, default=None,
                        help="default: the model's native size (512 for SD1.x, 1024 for SDXL)")
    parser.add_argument("--batch", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    parser.add_argument("--mix-mode", default="auto", choices=["auto", "patch", "route"],
                        help="auto: patch the weights when all images share one LoRA mix, route per image otherwise "
                             "(a quantized base always routes)")
    parser.add_argument("--out", default="outputs", metavar="DIR", help="output folder (default: ./outputs)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float16 on CUDA, float32 on CPU")
    add_base_precision_argument(parser)


def add_base_precision_argument(parser) -> None:
    """--base-precision, with the choices and help text of the training option of the same name."""
    from sdlora import precisions
    parser.add_argument("--base-precision", default=precisions.DEFAULT, choices=precisions.CHOICES,
                        help=precisions.HELP.replace("the mixed-precision dtype", "--dtype")
                        .replace("LoRA weights stay fp32", "LoRAs are routed, never patched in")
                        + f" [default: {precisions.DEFAULT}]")


def prompts_of(args) -> list[str]:
    """The positional prompt, then --prompt ones, then the --prompts file's non-empty lines."""
    prompts = ([args.prompt] if args.prompt is not None else []) + list(args.more_prompts)
    if args.prompts:
        try:
            lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise SdloraError(f"--prompts {args.prompts}: cannot read it ({e.strerror})") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SdloraError("no prompt: give one, --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def run(args) -> int:
    import torch
    from sdlora.extra_networks import parse_lora_arg, parse_prompt, resolve
    from sdlora.guidance import check_s_min_uncond
    from sdlora.paths import check_output_dir
    from sdlora.pipelines import load_base
    sampler = sampler_name(args.sampler)          # validate everything before loading anything
    check_s_min_uncond(args.s_min_uncond)
    loras = [parse_lora_arg(s) for s in args.lora]
    prompts = prompts_of(args)
    from sdlora.formats import read_header
    for p in prompts:
        for ref in resolve(parse_prompt(p)[1], args.loras) + loras:
            read_header(ref.path)                 # a damaged LoRA fails now, not after the model loads
    check_output_dir(args.out)                    # a bad --out fails now, not after generating
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    base = load_base(args.base, device=device, dtype=dtype, base_precision=args.base_precision)
    results = generate_prompts(base, prompts, negative=args.negative, loras=loras, seed=args.seed, steps=args.steps,
                               cfg=args.cfg, sampler=sampler, width=args.width, height=args.height,
                               batch=args.batch, lora_dir=args.loras, mode=args.mix_mode,
                               s_min_uncond=args.s_min_uncond)
    mixes = len({tuple(parse_prompt(p)[1]) for p in prompts})
    how, n = results[0].mode, len(results)
    if loras or any(parse_prompt(p)[1] for p in prompts):     # nothing to say without LoRAs
        print(f"LoRA mix: {how} ({'one mix for' if how == 'patched' else f'{mixes} mixes routed per image over'} "
              f"{n} image{'s' if n != 1 else ''} in one batch)")
    for r in results:
        print(save_png(r, args.out))
    return 0
