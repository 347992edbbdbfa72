"""Does the embedded base model follow its prompts? (a measurement, not a test)

    python -m tools.eval_base_model [--model DIR] [--seeds 6] [--styles sample_data/styles]

For every colour/shape pair held out of training (scenes.HELD_OUT), prompts with and without a
named background are generated with the `generate` defaults (DPM++ 2M Karras, 20 steps, CFG 7) on
fixed seeds; the deterministic classifiers of tools.metrics say which colour and shape each image
shows, which named colour its background is, and how flat that background is. The bar, on held-out
pairs: colour right in >= 95% of images, shape in >= 85%, a named background followed in >= 80%, and
>= 90% of backgrounds flat (noise <= FLAT_NOISE, the level of the VAE's own reconstructions of flat
scenes: the model cannot be flatter than its decoder). Seen pairs are reported too,
and, with --styles, the style metric of the base model's images for each style folder (should be
near 0: the base model does not produce those styles).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tools.metrics import background_noise, classify_background, classify_colour, classify_shape
from tools import scenes as S

STEPS, CFG = 20, 7.0
BAR = {"colour": 0.95, "shape": 0.85, "background": 0.80, "flat": 0.90}
FLAT_NOISE = 12.0   # background RGB std (0-255); the VAE's reconstructions of flat scenes: median ~9


def prompts_for(pairs) -> list[tuple[str, str, str, str]]:
    """(prompt, colour, shape, background or ""): each pair bare, on white, on black, and on another colour."""
    out = []
    others = list(S.COLOURS)
    for k, (colour, shape) in enumerate(sorted(pairs)):
        other = next(c for c in others[k % len(others):] + others if c != colour)
        for bg in ("", "white", "black", other):
            out.append((S.caption_of(colour, shape, background=bg), colour, shape, bg))
    return out


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], *, steps=STEPS, cfg=CFG, batch=48,
                    s_min_uncond: float = 0.0):
    from sdlora.guidance import guidance_kwargs
    from sdlora.samplers import DEFAULT_SAMPLER, make_scheduler
    pipe.scheduler = make_scheduler(DEFAULT_SAMPLER, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    guidance = guidance_kwargs(pipe, cfg, steps, s_min_uncond)
    jobs = [(p, s) for p in prompts for s in seeds]
    images = []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        out = pipe([p for p, _ in chunk], num_inference_steps=steps, generator=gens, output_type="np",
                   **guidance).images
        images.extend((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    return images


def evaluate(pipe, *, seeds: int = 6, pairs=S.HELD_OUT, log=print, return_images: bool = False,
             prefix: str = "", s_min_uncond: float = 0.0) -> dict:
    """Scores of the images for `pairs` (see prompts_for); `prefix` goes before every prompt (e.g. a
    trigger word the model has never seen, as a style LoRA's prompts start)."""
    prompts = prompts_for(pairs)
    images = generate_images(pipe, [prefix + p[0] for p in prompts], list(range(seeds)), s_min_uncond=s_min_uncond)
    truth = [p[1:] for p in prompts for _ in range(seeds)]
    named = [(im, bg) for im, (_, _, bg) in zip(images, truth) if bg]
    shapes = [classify_shape(im) for im in images]
    prompted = [s for _, s, _ in truth]
    drawn = Counter(zip(prompted, shapes))
    result = {"images": len(images),
              "colour": float(np.mean([classify_colour(im) == c for im, (c, _, _) in zip(images, truth)])),
              "shape": float(np.mean([got == s for got, s in zip(shapes, prompted)])),
              # which shape each prompted shape came out as (a model that draws one blob for two words shows here)
              "shape_drawn": {s: {str(g): drawn[s, g] for g in sorted(set(prompted) | set(shapes), key=str)}
                              for s in sorted(set(prompted))},
              "background": float(np.mean([classify_background(im) == bg for im, bg in named])),
              "flat": float(np.mean([background_noise(im) <= FLAT_NOISE for im in images]))}
    if log:
        log(json.dumps(result))
    if return_images:
        result["_images"] = images
    return result


def vae_report(vae, styles_dir=None) -> dict[str, float]:
    """VAE reconstruction MSE (pixels in [0, 1]) on fresh scenes, fresh broad images and each style folder."""
    from tools.metrics import load_images
    from tools.make_base_model import vae_mse
    rng = np.random.default_rng(12345)
    out = {"scenes": vae_mse(vae, S.scenes(rng, 256)[0]), "broad": vae_mse(vae, S.broad_images(rng, 256))}
    for folder in sorted(d for d in Path(styles_dir).iterdir() if d.is_dir()) if styles_dir else []:
        images = np.stack([np.asarray(im.resize((S.SIZE, S.SIZE))) for im in load_images(folder)])
        out[folder.name] = vae_mse(vae, images)
    return {k: round(v, 5) for k, v in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model spec (default: the embedded tiny model)")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--styles", type=Path, default=Path("sample_data/styles"),
                   help="folder of style folders: report VAE error and style scores on them")
    p.add_argument("--prefix", default="zqx, ", help="also score held-out prompts that start with this "
                   "unknown word, as a style LoRA's prompts start with its trigger word")
    p.add_argument("--device", default="cpu", help="torch device to generate on (cpu, cuda, ...)")
    p.add_argument("--s-min-uncond", type=float, default=0.0, metavar="SIGMA",
                   help="generate's --s-min-uncond (A1111's NGMS): no CFG below this sigma (default 0: off)")
    p.add_argument("--grid", type=Path, default=None, help="save a PNG grid of the held-out images")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from sdlora.pipelines import load_base
    pipe = load_base(a.model, device=a.device).pipe
    ngms = {"s_min_uncond": a.s_min_uncond}
    held = evaluate(pipe, seeds=a.seeds, log=None, return_images=True, **ngms)
    seen_pairs = [(c, s) for c in S.COLOURS for s in S.SHAPES if (c, s) not in S.HELD_OUT]
    seen = evaluate(pipe, seeds=max(1, a.seeds // 2), pairs=seen_pairs, log=None, **ngms)
    images = held.pop("_images")
    after_prefix = evaluate(pipe, seeds=a.seeds, log=None, prefix=a.prefix, **ngms)
    report = {"held_out_pairs": held, "seen_pairs": seen, f"held_out_pairs after {a.prefix!r}": after_prefix,
              "sampler": "DPM++ 2M Karras", "steps": STEPS, "cfg": CFG, "s_min_uncond": a.s_min_uncond}
    report["vae_mse"] = vae_report(pipe.vae, a.styles)
    if a.styles:
        from tools.metrics import StyleMetric
        for folder in sorted(d for d in a.styles.iterdir() if d.is_dir()):
            metric = StyleMetric.for_folder(folder)
            scores = metric.scores(images)
            report[f"style[{folder.name}]"] = {"score_mean": round(float(scores.mean()), 3),
                                               "score_max": round(float(scores.max()), 3),
                                               "distance_mean": round(float(metric.distances(images).mean()), 3)}
    if a.grid:
        from PIL import Image
        cols = a.seeds
        rows = [np.concatenate(images[r * cols:(r + 1) * cols], 1) for r in range(len(images) // cols)]
        Image.fromarray(np.concatenate(rows, 0)).save(a.grid)
    print(json.dumps(report, indent=1))
    ok = all(held[k] >= v for k, v in BAR.items())
    bar = ", ".join(f"{k} >= {v:.2f}" for k, v in BAR.items())
    print(f"quality bar ({bar} on held-out pairs):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
