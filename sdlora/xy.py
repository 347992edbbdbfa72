"""XY grids and mix comparisons as routed batches: one prompt, one seed, one LoRA mix per image.

    from sdlora.xy import compare_grid, parse_mixes, weight_grid

    g = weight_grid(base, "a red circle", refs, x=0, xs=[0, 0.5, 1], y=1, ys=[-1, 0, 1], seed=3, steps=20)
    g.image.save("grid.png")          # labelled (sdlora.grid); g.cells[j * len(xs) + i] is (xs[i], ys[j])
    labels, mixes = parse_mixes("<lora:a:0.8> <lora:b:-0.5>\\n\\n<lora:a:1>", "loras")
    c = compare_grid(base, "a red circle", mixes, labels, seed=3)      # N mixes side by side

Every cell uses the same seed (A1111's XY plot with a fixed seed), so the cells differ only by their
mix. All cells' mixes go through `generate_prompts` with `prompt_loras` (one list per image) and
mode "route": each chunk is one pipeline run with every image's own mix added by forward hooks
(sdlora.routing), the base weights never written; a mix patched in before (a previous generation)
is restored first. Cell i of a routed grid equals the same cell generated alone with its mix patched
(up to float rounding: tests/test_ui_grids.py checks 1 uint8 level).

Chunks hold at most MAX_CHUNK_IMAGES images and at most CHUNK_PIXEL_BUDGET pixels (images × width ×
height), so a 1024² SDXL grid runs 2 images at a time while the tiny model's 64² grid of 9 runs at
once (chunk_size); the cells are spread evenly over the chunks.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sdlora.errors import SdloraError
from sdlora.extra_networks import LoraRef, parse_prompt, resolve
from sdlora.generate import Generated, generate_prompts, native_size, random_seed
from sdlora.grid import MAX_VALUES, labelled_grid

MAX_CHUNK_IMAGES = 9            # images per pipeline run of a grid (the tiny model's 3×3 at once)
CHUNK_PIXEL_BUDGET = 2 ** 21    # images × pixels per run: 8 at 512², 2 at 1024² (CFG doubles the rows)
NO_LORA = "(no LoRA)"


def chunk_size(width: int, height: int, *, max_images: int = MAX_CHUNK_IMAGES,
               pixel_budget: int = CHUNK_PIXEL_BUDGET) -> int:
    """How many images of width × height one run of a grid holds (at least 1)."""
    return max(1, min(int(max_images), int(pixel_budget) // max(1, int(width) * int(height))))


def split(n: int, size: int) -> list[range]:
    """n items in the fewest chunks of at most `size`, as even as possible (9 by 4: 3, 3, 3)."""
    if n < 1:
        return []
    count = math.ceil(n / max(1, size))
    bounds = [round(k * n / count) for k in range(count + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


@dataclass
class MixGrid:
    """A generated grid: `cells` row-major (row j, column i is cells[j * len(x_labels) + i])."""
    cells: list[Generated]
    image: object                       # the labelled grid, a PIL image
    info: str                           # what the grid shows (the grid PNG's text)
    x_title: str
    x_labels: list[str]
    y_title: str = ""
    y_labels: list[str] = field(default_factory=lambda: [""])
    chunks: list[int] = field(default_factory=list)   # images per pipeline run

    @property
    def rows(self) -> list[list[object]]:
        n = len(self.x_labels)
        return [[c.image for c in self.cells[j * n:(j + 1) * n]] for j in range(len(self.y_labels))]


def generate_mixes(base, prompt: str, mixes: Sequence[Sequence[LoraRef]], *, seed: int = -1, chunk: int | None = None,
                   width: int | None = None, height: int | None = None, mode: str = "route",
                   on_step: Callable[[int, int], None] | None = None, chunks_out: list | None = None,
                   **kwargs) -> list[Generated]:
    """One image of `prompt` per mix (LoraRefs with paths, added to the prompt's own tags and `loras`),
    all with the same seed (-1: one random seed for all), in runs of at most `chunk` images (default:
    chunk_size of the image size). `on_step(done, total)` counts the steps of all runs; the sizes of
    the runs are appended to `chunks_out`. Other options: generate_prompts'."""
    if not mixes:
        raise SdloraError("no mixes to generate")
    if chunk is not None and int(chunk) < 1:
        raise SdloraError(f"chunk must be at least 1 image (got {chunk})")
    side = native_size(base.pipe)
    width, height = int(width or side), int(height or side)
    seed = random_seed() if seed is None or int(seed) < 0 else int(seed)
    parts = split(len(mixes), int(chunk) if chunk else chunk_size(width, height))
    out: list[Generated] = []
    for k, part in enumerate(parts):
        step = None
        if on_step is not None:
            def step(done, total, k=k):
                on_step(k * total + done, len(parts) * total)
        out += generate_prompts(base, [prompt] * len(part), prompt_loras=[list(mixes[i]) for i in part],
                                seeds=[seed] * len(part), width=width, height=height, mode=mode, on_step=step,
                                **kwargs)
        if chunks_out is not None:
            chunks_out.append(len(part))
    return out


def _fmt(v: float) -> str:
    return f"{v:g}"


def weight_grid(base, prompt: str, refs: Sequence[LoraRef], *, x: int, xs: Sequence[float], y: int,
                ys: Sequence[float], **kwargs) -> MixGrid:
    """refs[x]'s weight (UNet and text encoder) along X over `xs`, refs[y]'s along Y over `ys`, the
    other refs as they are; one routed batch (generate_mixes, same options)."""
    refs = list(refs)
    for axis, i in (("X", x), ("Y", y)):
        if not 0 <= i < len(refs):
            raise SdloraError(f"{axis} axis: LoRA {i + 1} is not in the mix ({len(refs)} LoRAs)")
    if x == y:
        raise SdloraError("X and Y are the same LoRA; pick two different ones")
    xs, ys = [float(v) for v in xs], [float(v) for v in ys]
    if not xs or not ys or len(xs) > MAX_VALUES or len(ys) > MAX_VALUES:
        raise SdloraError(f"each axis needs 1 to {MAX_VALUES} values")
    mixes = []
    for yv in ys:
        for xv in xs:
            cell = list(refs)
            cell[x] = dataclasses.replace(cell[x], te=xv, unet=xv)
            cell[y] = dataclasses.replace(cell[y], te=yv, unet=yv)
            mixes.append(cell)
    sizes: list[int] = []
    cells = generate_mixes(base, prompt, mixes, chunks_out=sizes, **kwargs)
    xt, yt = refs[x].name, refs[y].name
    info = (f"XY grid: X = {xt} weight {', '.join(map(_fmt, xs))}; Y = {yt} weight {', '.join(map(_fmt, ys))}; "
            f"seed {cells[0].seed}\n{prompt}")
    xl, yl = [_fmt(v) for v in xs], [_fmt(v) for v in ys]
    rows = [[c.image for c in cells[j * len(xs):(j + 1) * len(xs)]] for j in range(len(ys))]
    image = labelled_grid(rows, x_title=xt, x_labels=xl, y_title=yt, y_labels=yl)
    return MixGrid(cells, image, info, xt, xl, yt, yl, sizes)


def parse_mixes(text: str, lora_dir) -> tuple[list[str], list[list[LoraRef]]]:
    """Mixes written one per line as prompt tags (`<lora:a:0.8> <lora:b:-0.5>`); an empty line (or
    `none`) is the base without LoRAs; empty lines at the end are ignored. Returns (labels, mixes),
    the LoRAs looked up in `lora_dir`."""
    lines = (text or "").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise SdloraError("no mixes to compare: write one per line, e.g. <lora:a:0.8> <lora:b:-0.5> "
                          "(an empty line: no LoRA)")
    if len(lines) > MAX_VALUES:
        raise SdloraError(f"{len(lines)} mixes to compare; at most {MAX_VALUES}")
    labels, mixes = [], []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if line.lower() in ("", "none", NO_LORA):
            labels.append(NO_LORA)
            mixes.append([])
            continue
        try:
            rest, tags = parse_prompt(line)
        except SdloraError as e:
            raise SdloraError(f"mix on line {n}: {e}") from None
        if rest.strip(" ,"):
            raise SdloraError(f"mix on line {n}: {rest.strip()!r} is no <lora:NAME:W> tag; a mix line holds "
                              "only tags (the prompt is the same for all)")
        try:
            mixes.append(resolve(tags, lora_dir))
        except FileNotFoundError as e:
            raise SdloraError(f"mix on line {n}: {e}") from None
        labels.append(" ".join(r.tag for r in tags))
    return labels, mixes


def compare_grid(base, prompt: str, mixes: Sequence[Sequence[LoraRef]], labels: Sequence[str] | None = None,
                 **kwargs) -> MixGrid:
    """The same prompt and seed with each mix, side by side in one labelled row; one routed batch
    (generate_mixes, same options). `labels` default to the mixes' tags."""
    mixes = [list(m) for m in mixes]
    if labels is None:
        labels = [" ".join(r.tag for r in m) or NO_LORA for m in mixes]
    if len(labels) != len(mixes):
        raise SdloraError(f"{len(labels)} labels for {len(mixes)} mixes")
    if len(mixes) > MAX_VALUES:
        raise SdloraError(f"{len(mixes)} mixes to compare; at most {MAX_VALUES}")
    sizes: list[int] = []
    cells = generate_mixes(base, prompt, mixes, chunks_out=sizes, **kwargs)
    labels = list(labels)
    info = f"Compare {len(mixes)} LoRA mixes, seed {cells[0].seed}: {' | '.join(labels)}\n{prompt}"
    image = labelled_grid([[c.image for c in cells]], x_title="LoRA mix", x_labels=labels, y_title="", y_labels=[""])
    return MixGrid(cells, image, info, "LoRA mix", labels, "", [""], sizes)
