"""Procedural captioned scenes (the embedded base model's world) and broad images (for its VAE).

A scene is one flat-coloured shape on a plain background, with a caption that names the colour and
shape and, sometimes, the size, position and background ("a small red circle at the left on a blue
background"). Unnamed attributes are drawn at random, so short prompts work too. Some colour/shape
pairs are held out of training (HELD_OUT) so the quality check can test prompts never seen.

Broad images (random colours, gradients, stripes, checkers, halftone dots, outlines, glow, noise)
exist only to teach the VAE to represent what the scenes never show. Latent diffusion can only
produce what its VAE can decode, so a style LoRA cannot learn a look the VAE cannot represent. In an
early probe, a VAE trained on scenes alone reconstructed an unseen style (pink background, thick
black outlines) with about 11x its in-domain error, and a UNet LoRA trained on that style never
produced the pink background. The same VAE budget spent on half scenes and half broad images kept
scene quality and cut that error by about 2.6x. make_base_model trains the VAE on equal numbers of
both.

Everything is drawn with numpy/PIL from a `numpy.random.Generator`, so a seed fixes every image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64          # image side in pixels
SUPER = 4          # supersampling factor for anti-aliased shapes

# foreground colours (name -> RGB). Far apart, so a nearest-colour classifier is unambiguous.
COLOURS = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 30),
    "green": (40, 165, 60), "blue": (40, 80, 220), "purple": (135, 50, 180),
}
# backgrounds: neutrals plus every foreground colour (never the shape's own colour)
NEUTRALS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
BACKGROUNDS = {**NEUTRALS, **COLOURS}
SHAPES = ("circle", "square", "triangle")
# radius range in pixels; "small" stays >= 9 px (>= 2 latent pixels) so the VAE keeps the shape
SIZES = {"small": (9, 11), "": (13, 16), "large": (18, 22)}
POSITIONS = {"at the left": (0.3, 0.5), "at the right": (0.7, 0.5), "at the top": (0.5, 0.3),
             "at the bottom": (0.5, 0.7), "in the middle": (0.5, 0.5)}
# colour/shape pairs never shown in training (one per shape): the quality check prompts them
HELD_OUT = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square")})
JITTER = 12        # +- per channel colour jitter, so the model does not learn one exact RGB


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str                      # "small" | "" (medium) | "large"
    radius: float                  # pixels
    center: tuple[float, float]    # pixels
    background: str
    fg_rgb: tuple[int, int, int]
    bg_rgb: tuple[int, int, int]
    caption: str


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_of(colour, shape, size="", position="", background="") -> str:
    words = [size, colour, shape, position]
    text = " ".join(w for w in words if w)
    return f"{_a(text)} {text}" + (f" on {_a(background)} {background} background" if background else "")


def caption_words() -> set[str]:
    """Every word a scene caption can use."""
    phrases = [*COLOURS, *BACKGROUNDS, *SHAPES, *SIZES, *POSITIONS, "a an on background"]
    return {w for phrase in phrases for w in phrase.split()}


def _jitter(rng, rgb):
    return tuple(int(np.clip(c + rng.integers(-JITTER, JITTER + 1), 0, 255)) for c in rgb)


def sample_scene(rng: np.random.Generator, *, colour=None, shape=None, size=None, position=None,
                 background=None, held_out: bool = False, name_p: float = 0.65) -> Scene:
    """A random scene. Given attributes are used (and named in the caption); others are drawn,
    and each is named with probability `name_p`. `held_out` picks from HELD_OUT pairs only,
    otherwise held-out pairs are never drawn."""
    while colour is None or shape is None:
        c = colour or str(rng.choice(list(COLOURS)))
        s = shape or str(rng.choice(SHAPES))
        if ((c, s) in HELD_OUT) == held_out:
            colour, shape = c, s
    named = lambda given: given is not None or rng.random() < name_p  # noqa: E731
    size_named, pos_named, bg_named = named(size), named(position), named(background)
    if size is None:
        size = str(rng.choice(list(SIZES)))
    if background is None:
        background = str(rng.choice([b for b in BACKGROUNDS if b != colour]))
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi))
    margin = radius + 2
    if position is not None or pos_named:
        if position is None:
            position = str(rng.choice(list(POSITIONS)))
        fx, fy = POSITIONS[position]
        center = tuple(float(np.clip(f * SIZE + rng.uniform(-3, 3), margin, SIZE - margin)) for f in (fx, fy))
    else:
        center = tuple(float(rng.uniform(margin, SIZE - margin)) for _ in range(2))
    caption = caption_of(colour, shape, size if size_named else "", position if pos_named else "",
                         background if bg_named else "")
    return Scene(colour, shape, size, radius, center, background, _jitter(rng, COLOURS[colour]),
                 _jitter(rng, BACKGROUNDS[background]), caption)


def shape_polygon(shape: str, center, radius, scale: float = 1.0):
    """Outline points (in pixels * scale) of an upright shape (metrics.shape_of matches blobs against
    these same outlines)."""
    cx, cy, r = center[0] * scale, center[1] * scale, radius * scale
    if shape == "square":  # half-side = radius: the circle of the same size fits inside it
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        r *= 1.15
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    n = 64
    return [(cx + r * np.cos(2 * np.pi * k / n), cy + r * np.sin(2 * np.pi * k / n)) for k in range(n)]


def draw_shape(draw: ImageDraw.ImageDraw, shape, center, radius, scale, fill=None, outline=None, width=0):
    draw.polygon(shape_polygon(shape, center, radius, scale), fill=fill, outline=outline,
                 width=int(round(width * scale)))


def render_scene(scene: Scene) -> Image.Image:
    big = Image.new("RGB", (SIZE * SUPER, SIZE * SUPER), scene.bg_rgb)
    draw_shape(ImageDraw.Draw(big), scene.shape, scene.center, scene.radius, SUPER, fill=scene.fg_rgb)
    return big.resize((SIZE, SIZE), Image.BOX)


def scenes(rng: np.random.Generator, n: int, **kw) -> tuple[np.ndarray, list[Scene]]:
    """n random scenes: uint8 array (n, 64, 64, 3) and their Scene records."""
    specs = [sample_scene(rng, **kw) for _ in range(n)]
    return np.stack([np.asarray(render_scene(s)) for s in specs]), specs


# ---------------------------------------------------------------------------------------------
# broad images (VAE training only)

def _rand_rgb(rng):
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _grid(n):
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    return x, y


def _background(rng, n) -> np.ndarray:
    """(n, n, 3) float in [0, 255]: one of several fills."""
    a, b = np.array(_rand_rgb(rng), np.float32), np.array(_rand_rgb(rng), np.float32)
    x, y = _grid(n)
    kind = rng.integers(0, 7)
    if kind == 0:                                               # solid
        t = np.zeros_like(x)
    elif kind == 1:                                             # linear gradient
        ang = rng.uniform(0, 2 * np.pi)
        t = (np.cos(ang) * x + np.sin(ang) * y)
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
    elif kind == 2:                                             # radial gradient
        cx, cy = rng.uniform(0, 1, 2)
        t = np.clip(np.hypot(x - cx, y - cy) / rng.uniform(0.3, 1.0), 0, 1)
    elif kind == 3:                                             # stripes, any angle and period
        ang, period = rng.uniform(0, np.pi), rng.uniform(3, 16) / SIZE
        t = (np.sin(2 * np.pi * (np.cos(ang) * x + np.sin(ang) * y) / period) > 0).astype(np.float32)
    elif kind == 4:                                             # checkerboard
        p = rng.integers(3, 12) / SIZE
        t = ((np.floor(x / p) + np.floor(y / p)) % 2).astype(np.float32)
    elif kind == 5:                                             # halftone dots
        p = rng.uniform(3, 10) / SIZE
        rad = rng.uniform(0.2, 0.5) * p
        if rng.random() < 0.5:                                  # dot size varies like a halftone
            rad = rad * (0.4 + 0.8 * x)
        t = (np.hypot((x % p) - p / 2, (y % p) - p / 2) < rad).astype(np.float32)
    else:                                                       # smooth value noise
        k = int(rng.integers(2, 9))
        low = rng.random((k, k)).astype(np.float32)
        t = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((n, n), Image.BICUBIC),
                       np.float32) / 255
    return a + (b - a) * t[..., None]


def broad_image(rng: np.random.Generator) -> np.ndarray:
    """One random (64, 64, 3) uint8 image from a broad distribution of colours and textures."""
    n = SIZE * 2  # 2x supersampling is enough here
    img = Image.fromarray(np.clip(_background(rng, n), 0, 255).astype(np.uint8))
    for _ in range(rng.integers(0, 5)):
        layer = Image.new("L", (n, n), 0)
        d = ImageDraw.Draw(layer)
        shape = str(rng.choice(SHAPES + ("line", "ellipse")))
        center, radius = rng.uniform(0, SIZE, 2), rng.uniform(3, 26)
        mode = rng.integers(0, 3)                  # 0 filled, 1 outline only, 2 filled + outline
        width = float(rng.choice([1, 1.5, 2, 3, 4, 5]))
        if shape == "line":
            pts = [tuple(p) for p in rng.uniform(0, n, (int(rng.integers(2, 5)), 2))]
            d.line(pts, fill=255, width=int(width * 2))
            mask, outline = layer, None
        else:
            if shape == "ellipse":
                rx, ry = radius, radius * rng.uniform(0.3, 1.0)
                box = [(center[0] - rx) * 2, (center[1] - ry) * 2, (center[0] + rx) * 2, (center[1] + ry) * 2]
                d.ellipse(box, fill=255)
                ring = Image.new("L", (n, n), 0)
                ImageDraw.Draw(ring).ellipse(box, outline=255, width=int(width * 2))
            else:
                draw_shape(d, shape, center, radius, 2, fill=255)
                ring = Image.new("L", (n, n), 0)
                draw_shape(ImageDraw.Draw(ring), shape, center, radius, 2, outline=255, width=width)
            mask, outline = (layer if mode != 1 else None), (ring if mode != 0 else None)
        if mask is not None:
            fill = np.clip(_background(rng, n), 0, 255).astype(np.uint8)
            img.paste(Image.fromarray(fill), (0, 0), mask)
        if outline is not None:
            colour = (0, 0, 0) if rng.random() < 0.3 else _rand_rgb(rng)
            if rng.random() < 0.25:                 # glow, as neon signs have
                glow = outline.filter(ImageFilter.GaussianBlur(rng.uniform(2, 5)))
                img.paste(Image.new("RGB", (n, n), colour), (0, 0), glow)
            img.paste(Image.new("RGB", (n, n), colour), (0, 0), outline)
    img = img.resize((SIZE, SIZE), Image.BOX)
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    out = np.asarray(img, np.float32)
    if rng.random() < 0.2:
        out = out + rng.normal(0, rng.uniform(2, 20), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def broad_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.stack([broad_image(rng) for _ in range(n)])
