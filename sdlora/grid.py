"""XY grids (A1111's "X/Y plot"): one image per pair of values, labelled along the top and the left.

    values = parse_values("0, 0.5, 1")            # also "0:1:5" = 5 values from 0 to 1
    grid = xy_grid(rows, x_title="neon", x_values=[0, 0.5, 1], y_title="toon", y_values=[0, 1])

`rows[j][i]` is the image for (x_values[i], y_values[j]); `labelled_grid` takes text labels
instead (wrapped to the cell width: the "compare LoRA mixes" row). Small images (the tiny model's 64 px)
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
    """One PIL image: the cells in a grid with a header row and a label column (numbers as labels)."""
    return labelled_grid(rows, x_title=x_title, x_labels=[f"{v:g}" for v in x_values], y_title=y_title,
                         y_labels=[f"{v:g}" for v in y_values], min_cell=min_cell)


def _wrap(text: str, font, width: float) -> list[str]:
    """`text` in lines of at most `width` pixels, broken at spaces (a longer word keeps its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def labelled_grid(rows, *, x_title: str, x_labels, y_title: str = "", y_labels=("",), min_cell: int = 128):
    """One PIL image: `rows[j][i]` under column label x_labels[i] (wrapped to the cell width) and
    beside row label `y_title: y_labels[j]` (just the label when y_title is empty)."""
    from PIL import Image, ImageDraw, ImageFont
    x_labels, y_labels = [str(t) for t in x_labels], [str(t) for t in y_labels]
    if len(rows) != len(y_labels) or any(len(r) != len(x_labels) for r in rows):
        raise SdloraError(f"grid: expected {len(y_labels)} rows of {len(x_labels)} images")
    w, h = rows[0][0].size
    scale = max(1, math.ceil(min_cell / max(w, h)))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(size=max(12, min(cw, ch) // 10))
    pad = 6
    line = font.getbbox("Ag")[3] + pad
    wrapped = [_wrap(t, font, cw - pad) for t in x_labels]
    top = (1 + max(len(t) for t in wrapped)) * line + pad
    shown = [f"{y_title}: {t}" if y_title else t for t in y_labels]
    left = int(max([font.getlength(t) for t in shown] + [font.getlength(y_title)]) + 2 * pad)
    grid = Image.new("RGB", (left + cw * len(x_labels), top + ch * len(y_labels)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((left + cw * len(x_labels) / 2, pad), x_title, fill="black", font=font, anchor="ma")
    for i, lines in enumerate(wrapped):
        for k, t in enumerate(lines):
            draw.text((left + cw * i + cw / 2, pad + line * (k + 1)), t, fill="black", font=font, anchor="ma")
    for j, (t, row) in enumerate(zip(shown, rows)):
        draw.text((pad, top + ch * j + ch / 2), t, fill="black", font=font, anchor="lm")
        for i, im in enumerate(row):
            cell = im.convert("RGB")
            if cell.size != (w, h):
                raise SdloraError("grid: all images must have the same size")
            grid.paste(cell.resize((cw, ch), Image.NEAREST) if scale > 1 else cell, (left + cw * i, top + ch * j))
    return grid
