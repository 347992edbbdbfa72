"""How much does the base UNet use the shape word, and how loud is the shape in its latents?
(a measurement behind the README's base-model section, not a test)

    python -m tools.shape_signal [--model DIR] [--scenes 96]

1. Latent contrast: for 40 fresh scenes drawn as a circle, a square and a triangle (same colour, centre,
   size), ||z_a - z_b||^2 / ||z_circle - z_background||^2 in the VAE's latents, in pixels, and in the
   VAE's decodings of those latents: the share of a shape's own signal that tells two shapes apart.
2. Caption use: the UNet's denoising loss on those scenes with their own caption and with the shape
   word swapped (square -> circle, circle -> square, triangle -> circle), at several timesteps. A
   UNet that draws what it is told loses clearly more with the wrong word.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict

import numpy as np
import torch

from tools import scenes as S
from tools.make_base_model import encode, token_ids

SWAP = {"square": "circle", "circle": "square", "triangle": "circle"}
# of --scenes for the contrast (each is drawn three ways, encoded and decoded): enough for a stable mean
CONTRAST_SCENES = 40


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="base model spec (default: the embedded tiny model)")
    p.add_argument("--scenes", type=int, default=96)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import DDPMScheduler
    from sdlora.pipelines import load_base
    pipe = load_base(a.model).pipe
    unet, vae, te, tok = pipe.unet.float(), pipe.vae.float(), pipe.text_encoder.float(), pipe.tokenizer
    rng = np.random.default_rng(5)
    specs = [S.sample_scene(rng, shape=S.SHAPES[k % 3]) for k in range(a.scenes)]

    spaces = ("pixels", "latents", "VAE round trip")
    ratios = defaultdict(list)                  # (pair, space) -> one ratio per scene
    for s in specs[:CONTRAST_SCENES]:
        drawn = [np.asarray(S.render_scene(dataclasses.replace(s, shape=sh)))
                 for sh in ("circle", "square", "triangle")]
        images = np.stack(drawn + [np.full_like(drawn[0], s.bg_rgb)])
        z = encode(vae, images)
        with torch.no_grad():
            decoded = vae.decode(z).sample.clamp(-1, 1).numpy()
        for space, x in zip(spaces, (images.astype(np.float32) / 255, z.numpy(), decoded)):
            d = lambda i, j: float(((x[i] - x[j]) ** 2).sum())  # noqa: E731
            ratios["circle/square", space].append(d(0, 1) / d(0, 3))
            ratios["circle/triangle", space].append(d(0, 2) / d(0, 3))
    for pair in ("circle/square", "circle/triangle"):
        print(f"{pair} difference / shape signal: " +
              ", ".join(f"{space} {np.mean(ratios[pair, space]):.3f}" for space in spaces))

    images = np.stack([np.asarray(S.render_scene(s)) for s in specs])
    z0 = encode(vae, images) * vae.config.scaling_factor
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        right = te(token_ids(tok, [s.caption for s in specs]).to(te.device))[0]
        wrong = te(token_ids(tok, [s.caption.replace(s.shape, SWAP[s.shape]) for s in specs]).to(te.device))[0]
        for t in (900, 700, 500, 300, 150, 50):
            noise = torch.randn(z0.shape, generator=gen)
            tt = torch.full((len(specs),), t)
            xt = sched.add_noise(z0, noise, tt)
            loss = [(unet(xt, tt, c).sample - noise).pow(2).mean((1, 2, 3)) for c in (right, wrong)]
            cells = []
            for shape in S.SHAPES:
                m = torch.tensor([s.shape == shape for s in specs])
                l1, l2 = float(loss[0][m].mean()), float(loss[1][m].mean())
                cells.append(f"{shape} as {SWAP[shape]} {100 * (l2 / l1 - 1):+.1f}%")
            print(f"t={t:3d} loss with the shape word swapped: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
