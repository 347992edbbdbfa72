"""Deterministic image metrics for the embedded model's world: what colour and shape a picture
shows (prompt following), and how much it looks like a style (did a style LoRA learn its style?).

No learned weights: a picture's background is the median colour of its border, its foreground the
pixels far from that colour; colour = the named colour most foreground pixels are nearest to;
shape = the ideal upright circle, square or triangle (as the scenes draw them) that overlaps the
largest foreground blob best. Styled pictures (dots, outlines, pastel fills) get their own checks,
classify_drawn_colour (by hue) and classify_drawn_shape (the same match on the filled drawn area).
The style score projects a few colour/edge/frequency statistics onto the direction from the base
scenes' mean to the style's mean: 0 = looks like the base scenes, 1 = looks like the style folder.
"""
from __future__ import annotations

import colorsys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tools.scenes import COLOURS, NEUTRALS, SHAPES, SIZE, SUPER, draw_shape, shape_polygon

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_NAMES = list(COLOURS) + list(NEUTRALS)
_RGB = np.array([COLOURS.get(n) or NEUTRALS[n] for n in _NAMES], np.float32)
FG_DISTANCE = 60.0     # RGB distance from the background colour that makes a pixel foreground
MIN_BLOB = 12          # pixels; a smaller foreground is "nothing drawn"


def to_array(image, size: int = SIZE) -> np.ndarray:
    """(size, size, 3) float32 RGB in [0, 255] from a PIL image, an array or a path."""
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image).astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BOX if image.size[0] > size else Image.BICUBIC)
    return np.asarray(image, np.float32)


def load_images(folder) -> list[Image.Image]:
    """The images of a folder (sorted by name)."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTS)
    return [Image.open(p).convert("RGB") for p in paths]


# ---------------------------------------------------------------------------------------------
# prompt following: background, foreground, colour, shape

def background_rgb(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    seen = np.zeros_like(mask)
    best: list = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        blob, todo = [], deque([(y0, x0)])
        while todo:
            y, x = todo.popleft()
            blob.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    todo.append((yy, xx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def foreground(image) -> np.ndarray:
    """Boolean mask of the largest blob that differs from the border colour."""
    img = to_array(image)
    mask = np.linalg.norm(img - background_rgb(img), axis=-1) > FG_DISTANCE
    return _largest_blob(mask)


def classify_colour(image) -> str | None:
    """The named colour (COLOURS or NEUTRALS) of most foreground pixels, None if nothing drawn."""
    img = to_array(image)
    mask = foreground(img)
    if mask.sum() < MIN_BLOB:
        return None
    px = img[mask]
    nearest = np.argmin(((px[:, None, :] - _RGB[None]) ** 2).sum(-1), axis=1)
    return _NAMES[int(np.bincount(nearest, minlength=len(_NAMES)).argmax())]


def _unit_shape(shape: str) -> tuple[float, np.ndarray]:
    """Area and area centroid (relative to the centre) of scenes.shape_polygon at radius 1."""
    p = np.array(shape_polygon(shape, (0.0, 0.0), 1.0))
    x, y, xn, yn = p[:, 0], p[:, 1], np.roll(p[:, 0], -1), np.roll(p[:, 1], -1)
    cross = x * yn - xn * y
    area = cross.sum() / 2
    return abs(area), np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * area)


def _template(shape: str, mask: np.ndarray) -> np.ndarray:
    """The ideal upright `shape` (as scenes draws it) with the blob's area and centroid."""
    unit_area, unit_centroid = _unit_shape(shape)
    ys, xs = np.nonzero(mask)
    radius = float(np.sqrt(mask.sum() / unit_area))
    centre = np.array([xs.mean(), ys.mean()]) + 0.5 - radius * unit_centroid   # pixel i spans [i, i + 1)
    h, w = mask.shape
    big = Image.new("L", (w * SUPER, h * SUPER), 0)
    draw_shape(ImageDraw.Draw(big), shape, tuple(centre), radius, SUPER, fill=255)
    return np.asarray(big.resize((w, h), Image.BOX)) > 127


def shape_of(mask: np.ndarray) -> str | None:
    """The shape whose ideal outline, given the blob's area and centroid, overlaps the blob best
    (intersection over union); None if the blob is too small. Compared with one number such as the
    bounding-box fill ratio (square 1, circle pi/4, triangle 1/2), a whole-outline match is not
    thrown by a square whose edges wave or tilt a little, or by a bump that stretches the bounding box:
    every such flaw lowers the fill ratio, so with one cut it pushed imperfect squares, and only
    squares, to "circle"."""
    if mask.sum() < MIN_BLOB:
        return None
    iou = {}
    for shape in SHAPES:
        t = _template(shape, mask)
        iou[shape] = (mask & t).sum() / (mask | t).sum()
    return max(iou, key=iou.get)


def classify_shape(image) -> str | None:
    """"circle", "square" or "triangle" of the foreground blob (shape_of); None if nothing drawn."""
    return shape_of(foreground(image))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every region not connected to the image border added (an outline -> its area)."""
    outside = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), bool)
    free = np.pad(~mask, 1, constant_values=True)
    outside[0, 0] = True
    todo = deque([(0, 0)])
    h, w = free.shape
    while todo:
        y, x = todo.popleft()
        for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= yy < h and 0 <= xx < w and free[yy, xx] and not outside[yy, xx]:
                outside[yy, xx] = True
                todo.append((yy, xx))
    return ~outside[1:-1, 1:-1]


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    h, w = mask.shape
    padded, out = np.pad(mask, r), np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def drawn_mask(image, blur: float = 1.5, close: int = 2) -> np.ndarray:
    """Where a styled picture's shape is: the foreground after a blur (which merges halftone dots and
    screens into their mean colour) and a morphological closing of `close` px (which joins what the
    blur left apart), its largest blob with the holes filled (an outline-only neon shape counts as
    the area it encloses)."""
    from PIL import ImageFilter
    img = np.asarray(Image.fromarray(to_array(image).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur)),
                     np.float32)
    mask = np.linalg.norm(img - background_rgb(img), axis=-1) > FG_DISTANCE
    mask = ~_dilate(~_fill_holes(_dilate(mask, close)), close)
    return _fill_holes(_largest_blob(mask))


def classify_drawn_shape(image, blur: float = 1.5, close: int = 2) -> str | None:
    """The shape of a styled picture: shape_of its drawn_mask, which, unlike the foreground, does not
    care how a style fills a shape (dots, an outline, a shadow). On 150 fresh renders of each sample
    style it is right on 100 % (neon), 99 % (halftone) and 100 % (toon)."""
    return shape_of(drawn_mask(image, blur, close))


_HUES = {n: colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))[0] * 360 for n, rgb in COLOURS.items()}
CHROMA_SAT, CHROMA_VALUE = 0.3, 0.2   # HSV: paper, black ink and grey are not the shape's colour


def classify_drawn_colour(image) -> str | None:
    """The colour of a styled picture's shape: the named colour (COLOURS) whose hue most of the
    saturated pixels inside drawn_mask are nearest to. Styles keep a colour's hue but not its RGB
    (neon draws it as a glowing line on black, halftone as dots on paper, toon as a pastel fill), so
    classify_colour, which compares RGB, calls the folders' own images wrong (neon 6%, halftone 75%,
    toon 25%); this is right on all of them. A shape with no saturated pixels (white, black, grey)
    falls back to classify_colour."""
    img = to_array(image)
    mask = drawn_mask(img)
    px = img[mask] / 255.0
    if len(px):
        mx, mn = px.max(-1), px.min(-1)
        px = px[((mx - mn) / np.maximum(mx, 1e-6) >= CHROMA_SAT) & (mx >= CHROMA_VALUE)]
    if len(px) < MIN_BLOB:
        return classify_colour(img)
    hue = np.array([colorsys.rgb_to_hsv(*p)[0] * 360 for p in px])
    names = list(_HUES)
    gap = np.abs(hue[:, None] - np.array([_HUES[n] for n in names])[None])
    nearest = np.minimum(gap, 360 - gap).argmin(1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def follows_shape(image, shape: str) -> bool:
    """Is `shape` the shape drawn (classify_drawn_shape, so styled pictures count)?"""
    return classify_drawn_shape(image) == shape


def classify_background(image) -> str:
    """The named colour (COLOURS or NEUTRALS) nearest to the picture's border colour."""
    bg = background_rgb(to_array(image))
    return _NAMES[int(np.argmin(((_RGB - bg) ** 2).sum(-1)))]


def background_noise(image) -> float:
    """RGB standard deviation (0-255 units, mean over channels) of the pixels away from the shape:
    0 for a flat background, high for texture or noise. The shape's blob is grown by 2 px first,
    so its anti-aliased rim does not count as background."""
    img = to_array(image)
    h, w = img.shape[:2]
    padded = np.pad(foreground(img), 2)
    grown = np.zeros((h, w), bool)
    for dy in range(5):                    # a 5x5 square dilation
        for dx in range(5):
            grown |= padded[dy:dy + h, dx:dx + w]
    return float(img[~grown].std(axis=0).mean())


# ---------------------------------------------------------------------------------------------
# style

FEATURES = ("luma_mean", "luma_std", "sat_mean", "sat_std", "dark_frac", "bright_frac", "grad_mean",
            "edge_frac", "high_freq", "local_contrast", "n_colours", "colourfulness", "pastel_frac",
            "dark_edge_frac", "spectral_peak", "border_luma")


def style_features(image) -> np.ndarray:
    """Colour, edge and frequency statistics of an image (see FEATURES), each roughly in [0, 1]."""
    img = to_array(image) / 255.0
    luma = img @ np.array([0.299, 0.587, 0.114], np.float32)
    mx, mn = img.max(-1), img.min(-1)
    sat = (mx - mn) / (mx + 1e-6)
    gy, gx = np.abs(np.diff(luma, axis=0))[:, :-1], np.abs(np.diff(luma, axis=1))[:-1]
    grad = np.hypot(gx, gy)
    chans = img - img.mean(axis=(0, 1))                                   # colour contrast counts too
    spec = (np.abs(np.fft.fftshift(np.fft.fft2(chans, axes=(0, 1)), axes=(0, 1))) ** 2).sum(-1)
    floor = SIZE ** 4 * 0.003       # Parseval: the energy of a faint (std 0.03) image; keeps ratios stable
    yy, xx = np.mgrid[-SIZE // 2:SIZE // 2, -SIZE // 2:SIZE // 2]
    high = spec[np.hypot(yy, xx) > SIZE / 8].sum() / (spec.sum() + floor)
    blocks = luma.reshape(SIZE // 4, 4, SIZE // 4, 4).std(axis=(1, 3))
    q = (img * 3.999).astype(int)                                   # 4 levels per channel: 64 bins
    hist = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64) / luma.size
    rg, yb = img[..., 0] - img[..., 1], 0.5 * (img[..., 0] + img[..., 1]) - img[..., 2]
    colourful = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    pastel = ((luma > 0.7) & (sat > 0.12) & (sat < 0.55)).mean()
    dark_edge = ((luma[:-1, :-1] < 0.2) & (grad > 0.1)).mean()         # dark pixels on edges: outlines
    ring = spec[(np.hypot(yy, xx) > 4)]
    peak = np.sort(ring)[-8:].sum() / (ring.sum() + floor)              # a few strong frequencies: screens
    border = np.median(np.concatenate([luma[0], luma[-1], luma[:, 0], luma[:, -1]]))
    return np.array([luma.mean(), luma.std(), sat.mean(), sat.std(), (luma < 0.15).mean(),
                     (luma > 0.85).mean(), grad.mean(), (grad > 0.1).mean(), high, blocks.mean(),
                     (hist > 0.01).sum() / 64, colourful, pastel, dark_edge, peak, border], np.float32)


@dataclass
class StyleMetric:
    """How much an image looks like a style folder, against the base scenes.

    `score`: projection of the image's features onto the Fisher discriminant direction between
    reference (base scene) images and style images, scaled so the reference mean scores 0 and the
    style mean 1 (the within-class covariance is shrunk towards its diagonal: few style images).
    A linear score also grows for images unlike both sets, so `distance` says how typical an image
    is of the style: the RMS of its features' z-scores under the style images' own spread (style
    images score about 1; base scenes and other styles several times more).
    """
    reference_mean: np.ndarray
    style_mean: np.ndarray
    direction: np.ndarray
    style_std: np.ndarray

    @classmethod
    def fit(cls, style_images, reference_images, *, shrink: float = 0.5) -> "StyleMetric":
        s = np.stack([style_features(i) for i in style_images]).astype(np.float64)
        r = np.stack([style_features(i) for i in reference_images]).astype(np.float64)
        cov = (np.cov(s, rowvar=False) + np.cov(r, rowvar=False)) / 2
        cov = (1 - shrink) * cov + shrink * np.diag(np.diag(cov)) + np.eye(len(cov)) * 1e-4
        diff = s.mean(0) - r.mean(0)
        w = np.linalg.solve(cov, diff)
        # floor the spread: a feature constant within the style must not make tiny deviations huge
        style_std = np.maximum(s.std(0), 0.25 * r.std(0) + 0.01)
        return cls(r.mean(0), s.mean(0), w / (w @ diff), style_std)

    @classmethod
    def for_folder(cls, folder, *, n_reference: int = 200, seed: int = 0) -> "StyleMetric":
        """The metric of a style folder against procedural base scenes (seeded, so deterministic)."""
        from tools.scenes import scenes
        images = load_images(folder)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in style folder {folder}")
        reference, _ = scenes(np.random.default_rng(seed), n_reference)
        return cls.fit(images, list(reference))

    def score(self, image) -> float:
        return float((style_features(image).astype(np.float64) - self.reference_mean) @ self.direction)

    def distance(self, image) -> float:
        z = (style_features(image).astype(np.float64) - self.style_mean) / self.style_std
        return float(np.sqrt(np.mean(z ** 2)))

    def scores(self, images) -> np.ndarray:
        return np.array([self.score(i) for i in images])

    def distances(self, images) -> np.ndarray:
        return np.array([self.distance(i) for i in images])


# ---------------------------------------------------------------------------------------------
# plain functions, the signatures tools.eval_style plugs in

_METRICS: dict[str, StyleMetric] = {}


def _metric(style_dir) -> StyleMetric:
    """StyleMetric.for_folder(style_dir), fitted once per folder."""
    key = str(Path(style_dir).resolve())
    if key not in _METRICS:
        _METRICS[key] = StyleMetric.for_folder(style_dir)
    return _METRICS[key]


def style_score(image, style_dir) -> float:
    """StyleMetric.for_folder(style_dir).score(image), the fitted metric cached per folder."""
    return _metric(style_dir).score(image)


def style_distance(image, style_dir) -> float:
    """StyleMetric.for_folder(style_dir).distance(image): how typical of the style folder the image
    is (its images about 1; lower is nearer the style)."""
    return _metric(style_dir).distance(image)


def follows_colour(image, colour: str) -> bool:
    """Is `colour` the colour of the shape drawn (classify_drawn_colour, so styled pictures count)?"""
    return classify_drawn_colour(image) == colour
