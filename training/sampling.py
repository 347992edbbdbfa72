"""Images from the live model: sample images during training, class images for prior preservation.

Sampling uses DPM++ 2M (diffusers' DPMSolverMultistepScheduler, the field's common default) built
from the base model's scheduler config, with one fixed CPU generator per prompt so samples from
different steps are comparable.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from sdlora.atomic import atomic_write
from sdlora.training.dataset import IMAGE_EXTENSIONS


def sampling_pipeline(pipe):
    from diffusers import DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    comps = {k: v for k, v in pipe.components.items() if k != "scheduler"}
    extra = {"requires_safety_checker": False} if "safety_checker" in comps else {}
    p = type(pipe)(scheduler=sched, **comps, **extra)
    p.set_progress_bar_config(disable=True)
    return p


@torch.no_grad()
def generate(pipe, prompts: list[str], *, seed: int, steps: int, cfg: float, size: int, autocast=None,
             negative: str = "", s_min_uncond: float = 0.0) -> list:
    """One PIL image per prompt; prompt i uses generator seed `seed + i`. `autocast`: a context
    manager factory (e.g. `accelerator.autocast`). `s_min_uncond`: no CFG below this sigma
    (sdlora.guidance; 0: CFG every step)."""
    from sdlora.guidance import guidance_kwargs
    p = sampling_pipeline(pipe)
    guidance = guidance_kwargs(p, cfg, steps, s_min_uncond)
    images = []
    with (autocast() if autocast else nullcontext()):
        for i, prompt in enumerate(prompts):
            g = torch.Generator("cpu").manual_seed(seed + i)
            images += p(prompt, negative_prompt=negative or None, num_inference_steps=steps, height=size, width=size,
                        generator=g, **guidance).images
    return images


def write_png(image, path: Path) -> None:
    """`image` as a PNG at `path`, atomically, with the normal file mode (sdlora.atomic)."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def count_images(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def ensure_class_images(pipe, folder: Path, prompt: str, wanted: int, *, seed: int, steps: int, cfg: float,
                        size: int, autocast=None, progress=None) -> int:
    """Generate class images until `folder` holds `wanted`; returns how many were made."""
    folder.mkdir(parents=True, exist_ok=True)
    have = count_images(folder)
    made = 0
    for k in range(have, wanted):
        img = generate(pipe, [prompt], seed=seed + 100_000 + k, steps=steps, cfg=cfg, size=size, autocast=autocast)[0]
        write_png(img, folder / f"class-{k:05d}.png")
        made += 1
        if progress:
            progress(made, wanted - have)
    return made
