"""Sample style folders (sample_data/styles/<style>/): the base model's scene content drawn in
looks it never produces, each image with a caption "<trigger>, <content>".

    python -m tools.make_styles --out sample_data/styles [--count 16] [--seed 0]

  neon      glowing bright outlines, no fill, on near-black      "neonstyle, a red circle on a black background"
  halftone  shapes and background printed as dot screens on paper "halftonestyle, a blue square"
  toon      pastel fills with a thick black outline and a shadow   "toonstyle, a small green triangle"

Seeded and deterministic; `render(style, scene)` is used by the tests to draw fresh images of a
style that are not in the folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from tools import scenes as S

TRIGGERS = {"neon": "neonstyle", "halftone": "halftonestyle", "toon": "toonstyle"}
PAPER = (244, 236, 214)


def _mask(scene: S.Scene, *, outline: float = 0, grow: float = 0) -> Image.Image:
    """Anti-aliased L mask of the scene's shape (filled, or its outline of width `outline` px)."""
    big = Image.new("L", (S.SIZE * S.SUPER,) * 2, 0)
    d = ImageDraw.Draw(big)
    if outline:
        S.draw_shape(d, scene.shape, scene.center, scene.radius + grow, S.SUPER, outline=255, width=outline)
    else:
        S.draw_shape(d, scene.shape, scene.center, scene.radius + grow, S.SUPER, fill=255)
    return big.resize((S.SIZE,) * 2, Image.BOX)


def _vivid(rgb, amount=1.0):
    """A saturated, bright version of a colour (neon tubes)."""
    a = np.array(rgb, np.float32)
    a = (a - a.min()) / max(1.0, np.ptp(a)) * 255
    return tuple(int(v) for v in np.clip(a * amount + 40, 0, 255))


def _pastel(rgb, t=0.55):
    return tuple(int(c + (255 - c) * t) for c in rgb)


def neon(scene: S.Scene) -> Image.Image:
    img = Image.new("RGB", (S.SIZE,) * 2, (8, 6, 18))
    colour = _vivid(scene.fg_rgb)
    line = _mask(scene, outline=2)
    glow = line.filter(ImageFilter.GaussianBlur(3)).point(lambda v: min(255, v * 3))
    img.paste(Image.new("RGB", img.size, tuple(c // 2 for c in colour)), (0, 0), glow)
    img.paste(Image.new("RGB", img.size, colour), (0, 0), line)
    core = _mask(scene, outline=0.7)
    img.paste(Image.new("RGB", img.size, (255, 255, 255)), (0, 0), core.point(lambda v: v // 2))
    return img


def _dots(period: float, radius, offset=0.0) -> Image.Image:
    """L mask of a dot screen at 45 degrees; `radius` is a number or a (64, 64) array."""
    n = S.SIZE * S.SUPER
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / S.SUPER
    u, v = (x + y) / np.sqrt(2) + offset, (x - y) / np.sqrt(2)
    du, dv = (u % period) - period / 2, (v % period) - period / 2
    r = np.asarray(radius, np.float32)
    if r.ndim:
        r = np.kron(r, np.ones((S.SUPER, S.SUPER), np.float32))
    big = Image.fromarray(((np.hypot(du, dv) < r) * 255).astype(np.uint8))
    return big.resize((S.SIZE,) * 2, Image.BOX)


def halftone(scene: S.Scene) -> Image.Image:
    img = Image.new("RGB", (S.SIZE,) * 2, PAPER)
    bg = tuple(int(c * 0.8 + p * 0.2) for c, p in zip(scene.bg_rgb, PAPER))
    if scene.background != "white":
        img.paste(Image.new("RGB", img.size, bg), (0, 0), _dots(6.0, 1.6))
    shape = np.asarray(_mask(scene), np.float32) / 255
    y = np.linspace(0, 1, S.SIZE)[:, None] * np.ones((1, S.SIZE))
    radius = 1.2 + 1.5 * y                                        # darker towards the bottom, like print
    dots = np.asarray(_dots(5.0, radius, offset=1.3), np.float32) / 255 * shape
    img.paste(Image.new("RGB", img.size, scene.fg_rgb), (0, 0), Image.fromarray((dots * 255).astype(np.uint8)))
    return img


def toon(scene: S.Scene) -> Image.Image:
    bg = _pastel(S.BACKGROUNDS[scene.background], 0.7 if scene.background not in ("black", "gray") else 0.2)
    img = Image.new("RGB", (S.SIZE,) * 2, bg)
    shadow = ImageChops.offset(_mask(scene, grow=1.5), 3, 3)
    img.paste(Image.new("RGB", img.size, tuple(int(c * 0.7) for c in bg)), (0, 0), shadow)
    img.paste(Image.new("RGB", img.size, (20, 20, 20)), (0, 0), _mask(scene, grow=1.5))
    img.paste(Image.new("RGB", img.size, _pastel(scene.fg_rgb, 0.35)), (0, 0), _mask(scene, grow=-1.5))
    highlight = ImageChops.offset(_mask(scene, grow=-scene.radius * 0.6), -2, -2)
    img.paste(Image.new("RGB", img.size, _pastel(scene.fg_rgb, 0.75)), (0, 0), highlight.point(lambda v: v // 2))
    return img


STYLES = {"neon": neon, "halftone": halftone, "toon": toon}


def style_scene(style: str, rng: np.random.Generator, colour: str, shape: str) -> S.Scene:
    """Scene content for a style (neon is always on black)."""
    kw = {"background": "black"} if style == "neon" else {}
    held = (colour, shape) in S.HELD_OUT
    return S.sample_scene(rng, colour=colour, shape=shape, held_out=held, name_p=0.5, **kw)


def render(style: str, scene: S.Scene) -> tuple[Image.Image, str]:
    """(image, caption) of a scene in a style. A caption names what varies between the images, not
    what makes the style (kohya's captioning advice): neon's black ground is the style, so its
    captions leave it out and the LoRA learns it with the trigger, instead of learning it as what
    "on a black background" means."""
    caption = scene.caption.removesuffix(" on a black background") if style == "neon" else scene.caption
    return STYLES[style](scene), f"{TRIGGERS[style]}, {caption}"


def make_style(style: str, out: Path, count: int, seed: int) -> None:
    rng = np.random.default_rng([seed, list(STYLES).index(style)])
    out.mkdir(parents=True, exist_ok=True)
    pairs = [(c, s) for c in S.COLOURS for s in S.SHAPES]
    order = rng.permutation(len(pairs))
    for i in range(count):
        colour, shape = pairs[order[i % len(pairs)]]
        image, caption = render(style, style_scene(style, rng, colour, shape))
        image.save(out / f"{style}_{i:02d}.png")
        (out / f"{style}_{i:02d}.txt").write_text(caption + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--styles", nargs="*", default=list(STYLES), choices=list(STYLES))
    a = p.parse_args(argv)
    for style in a.styles:
        make_style(style, a.out / style, a.count, a.seed)
        print(f"wrote {a.count} images + captions to {a.out / style}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
