"""XY grids (A1111's "X/Y plot"): one image per pair of values, labelled along the top and the left.

    values = parse_values("0, 0.5, 1")            # also "0:1:5" = 5 values from 0 to 1
    grid = xy_grid(rows, x_title="neon", x_values=[0, 0.5, 1], y_title="toon", y_values=[0, 1])

`rows[j][i]` is the image for (x_values[i], y_values[j]). Small images (the tiny model's 64 px)
are scaled up with nearest-neighbour so the labels stay readable.
"""
from __future__ import annotations

import math

from sdlora.errors import SdloraError

MAX_VALUES = 16


def parse_values(text: str, what: str = "values") -> list[float]:
    """`a, b, c` or `start:stop:count` (count evenly spaced values, both ends included)."""
    text = (text or "").strip()
    if not text:
        raise SdloraError(f"{what}: empty; expected numbers like `0, 0.5, 1` or `0:1:5`")
    try:
        if ":" in text:
            start, stop, count = (p.strip() for p in text.split(":"))
            n = int(count)
            if n < 1:
                raise ValueError
            a, b = float(start), float(stop)
            values = [a + (b - a) * i / (n - 1) for i in range(n)] if n > 1 else [a]
        else:
            values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise SdloraError(f"{what}: {text!r} is not a list of numbers; expected `0, 0.5, 1` or `0:1:5`") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise SdloraError(f"{what}: {text!r} must hold finite numbers")
    if len(values) > MAX_VALUES:
        raise SdloraError(f"{what}: {len(values)} values; at most {MAX_VALUES} per axis")
    return [round(v, 6) for v in values]


def xy_grid(rows, *, x_title: str, x_values, y_title: str, y_values, min_cell: int = 128):
    """One PIL image: the cells in a grid with a header row and a label column."""
    from PIL import Image, ImageDraw, ImageFont
    if len(rows) != len(y_values) or any(len(r) != len(x_values) for r in rows):
        raise SdloraError(f"xy_grid: expected {len(y_values)} rows of {len(x_values)} images")
    w, h = rows[0][0].size
    scale = max(1, math.ceil(min_cell / max(w, h)))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(size=max(12, min(cw, ch) // 10))
    pad = 6
    line = font.getbbox("Ag")[3] + pad
    top = 2 * line + pad
    x_labels = [f"{v:g}" for v in x_values]
    y_labels = [f"{v:g}" for v in y_values]
    left = max(font.getlength(f"{y_title}: {t}") for t in y_labels) + 2 * pad
    left = int(max(left, font.getlength(y_title) + 2 * pad))
    grid = Image.new("RGB", (left + cw * len(x_values), top + ch * len(y_values)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((left + cw * len(x_values) / 2, pad), x_title, fill="black", font=font, anchor="ma")
    for i, t in enumerate(x_labels):
        draw.text((left + cw * i + cw / 2, pad + line), t, fill="black", font=font, anchor="ma")
    for j, (t, row) in enumerate(zip(y_labels, rows)):
        draw.text((pad, top + ch * j + ch / 2), f"{y_title}: {t}", fill="black", font=font, anchor="lm")
        for i, im in enumerate(row):
            cell = im.convert("RGB")
            if cell.size != (w, h):
                raise SdloraError("xy_grid: all images must have the same size")
            grid.paste(cell.resize((cw, ch), Image.NEAREST) if scale > 1 else cell, (left + cw * i, top + ch * j))
    return grid
