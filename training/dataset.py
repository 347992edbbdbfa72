"""Training images from a folder: captions, kohya repeat folders, aspect-ratio buckets, data order.

Layout (kohya's DreamBooth layout, plus plain folders):
    FOLDER/                 images here repeat `repeats` times per epoch
    FOLDER/10_mystyle/      images here repeat 10 times; "mystyle" is their caption when no
                            caption file or trigger is given (kohya's class-token folders)
Captions: a sidecar file with the image's stem and one of `caption_extensions` (`a.txt`,
`a.caption`), else `trigger class_word`, else the folder's name after `N_`. A trigger is put first
in every caption that lacks it.

Everything random (order, flips, crops, caption shuffle/dropout) is a pure function of
(seed, epoch, position), so a resumed run sees exactly the data an uninterrupted run would.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdlora.errors import SdloraError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


class DatasetError(SdloraError):
    """The training folder cannot be used (missing, empty, no readable image)."""


# ---------------------------------------------------------------------------------------------
# images

def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: alpha composited on white, 16-bit and float scaled (not clipped)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_image(path) -> Image.Image:
    """An image file as upright 8-bit RGB (EXIF orientation applied)."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


# ---------------------------------------------------------------------------------------------
# buckets

def make_buckets(resolution: int, step: int, min_reso: int, max_reso: int) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution² pixels, sides multiples of `step` (kohya's scheme)."""
    max_area = resolution * resolution
    side = max(step, resolution // step * step)
    buckets = {(side, side)}
    w = max(step, min_reso // step * step)
    while w <= max_reso:
        h = min(max_reso, (max_area // w) // step * step)
        if h >= min_reso and h >= step:
            buckets.add((w, h))
            buckets.add((h, w))
        w += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ar = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ar), -b[0] * b[1]))


def resize_and_crop(im: Image.Image, bucket: tuple[int, int], rng: random.Random | None):
    """Scale to cover the bucket, then crop (center, or random with `rng`). Returns the image and
    the crop's (top, left) in the scaled image (SDXL's crop conditioning)."""
    bw, bh = bucket
    scale = max(bw / im.width, bh / im.height)
    w, h = max(bw, round(im.width * scale)), max(bh, round(im.height * scale))
    if (w, h) != im.size:
        im = im.resize((w, h), Image.LANCZOS)
    if rng is None:
        left, top = (w - bw) // 2, (h - bh) // 2
    else:
        left, top = rng.randint(0, w - bw), rng.randint(0, h - bh)
    return im.crop((left, top, left + bw, top + bh)), (top, left)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB image -> float32 CHW in [-1, 1] (what the SD VAE expects)."""
    a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return a.float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# the folder

@dataclass
class ImageItem:
    path: Path
    caption: str
    caption_source: str          # "file" | "trigger" | "folder" | "none"
    folder: str                  # the dataset dir it came from (kohya ss_dataset_dirs key)
    repeats: int
    size: tuple[int, int]        # upright (width, height)
    bucket: tuple[int, int] = (0, 0)
    is_reg: bool = False         # a prior-preservation class image


@dataclass
class FolderInfo:
    name: str
    path: Path
    repeats: int
    images: int = 0
    captions: int = 0
    is_reg: bool = False


@dataclass
class ScanResult:
    items: list[ImageItem]
    folders: list[FolderInfo]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _caption_file(img: Path, extensions) -> Path | None:
    for ext in extensions:
        p = img.with_suffix(ext)
        if p.is_file():
            return p
    return None


def with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption
    tags = [t.strip() for t in caption.split(",")]
    if trigger in tags or caption.startswith(trigger + " ") or caption == trigger:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under `folder`, recursively, hidden entries skipped, sorted."""
    images, others = [], []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    return images, others


def scan(root, *, trigger: str = "", class_word: str = "", caption_extensions=(".txt", ".caption"),
         repeats: int = 1, min_image_size: int = 0, is_reg: bool = False) -> ScanResult:
    """Every usable image under `root` with its caption and repeats; unusable ones in `skipped`."""
    root = Path(root)
    kind = "class image" if is_reg else "training"
    if not root.exists():
        raise DatasetError(f"{kind} folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{kind} folder {root} is a file, not a folder of images")
    # root's own files, then each immediate subfolder (kohya `N_name` folders give repeats)
    units = [(root, root.name, repeats, None)]
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        m = REPEAT_FOLDER.match(sub.name)
        units.append((sub, sub.name, int(m[1]) if m else repeats, (m[2] if m else sub.name)))
    exts = tuple(e if e.startswith(".") else "." + e for e in caption_extensions)
    items, folders, skipped, others = [], [], [], []
    for folder, name, n_rep, folder_caption in units:
        if folder == root:
            files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
            imgs = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            others += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        else:
            imgs, rest = _image_files(folder)
            others += rest
        info = FolderInfo(name, folder, n_rep, is_reg=is_reg)
        for img in imgs:
            try:
                with Image.open(img) as im:
                    im.load()
                    size = ImageOps.exif_transpose(im).size
            except Exception as e:  # PIL raises many types for broken files
                skipped.append((img, f"unreadable ({type(e).__name__}: {str(e)[:60]})"))
                continue
            if min(size) < min_image_size:
                skipped.append((img, f"too small ({size[0]}x{size[1]} < {min_image_size} px)"))
                continue
            cap_file = _caption_file(img, exts)
            if cap_file is not None:
                caption = " ".join(cap_file.read_text(encoding="utf-8", errors="replace").split())
                source = "file"
                info.captions += 1
            elif trigger or class_word:
                caption, source = f"{trigger} {class_word}".strip(), "trigger"
            elif folder_caption:
                caption, source = folder_caption.strip(), "folder"
            else:
                caption, source = "", "none"
            items.append(ImageItem(img, with_trigger(caption, trigger), source, name, n_rep, size, is_reg=is_reg))
            info.images += 1
        if info.images or folder == root:
            folders.append(info)
    if not items:
        found = (f"; it holds {len(others)} other file(s), e.g. {others[0].name}" if others else "; it is empty")
        bad = f"; {len(skipped)} image(s) could not be used: " + skip_list(skipped) if skipped else ""
        raise DatasetError(f"no usable {kind} images in {root}{found}{bad}. Expected "
                           f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files (optionally in `N_name` "
                           "subfolders).")
    folders = [f for f in folders if f.images]
    return ScanResult(items, folders, skipped)


def skip_list(skipped, limit=20) -> str:
    lines = [f"{p.name}: {why}" for p, why in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"... and {len(skipped) - limit} more")
    return "; ".join(lines)


def tag_frequency(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per dataset dir, how many captions contain each comma tag."""
    out: dict[str, Counter] = {}
    for it in items:
        if it.is_reg:
            continue
        c = out.setdefault(it.folder, Counter())
        for tag in {t.strip() for t in it.caption.split(",") if t.strip()}:
            c[tag] += 1
    return {k: dict(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# per-sample randomness and the order of an epoch

def process_caption(caption: str, rng: random.Random, *, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    """Caption dropout (-> ""), then tag shuffle keeping the first `keep_tokens` tags in place."""
    if dropout and rng.random() < dropout:
        return ""
    if shuffle:
        tags = [t.strip() for t in caption.split(",")]
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        caption = ", ".join(t for t in head + tail if t)
    return caption


def sample_rng(seed: int, epoch: int, slot: int) -> random.Random:
    """The RNG of one sample position of one epoch: flips, crops, caption shuffle and dropout."""
    return random.Random(f"sdlora:{seed}:{epoch}:{slot}")


@dataclass
class Sample:
    item: int            # index into the dataset's items
    slot: int            # position in the epoch (its RNG)


def epoch_batches(items: list[ImageItem], batch_size: int, seed: int, epoch: int,
                  num_processes: int = 1) -> list[list[Sample]]:
    """The global batches of one epoch, in order: each item repeated `repeats` times (class images
    as often as training samples, kohya's balance), grouped per bucket, shuffled deterministically.
    The count is a multiple of `num_processes` so every process gets the same number."""
    train = [i for i, it in enumerate(items) if not it.is_reg for _ in range(it.repeats)]
    reg_pool = [i for i, it in enumerate(items) if it.is_reg for _ in range(it.repeats)]
    reg = [reg_pool[k % len(reg_pool)] for k in range(len(train))] if reg_pool else []
    rng = random.Random(f"sdlora-order:{seed}:{epoch}")
    by_bucket: dict[tuple, list[int]] = {}
    for i in train + reg:
        by_bucket.setdefault(items[i].bucket, []).append(i)
    batches, slot = [], 0
    for bucket in sorted(by_bucket):
        idx = by_bucket[bucket]
        rng.shuffle(idx)
        for k in range(0, len(idx), batch_size):
            chunk = idx[k:k + batch_size]
            batches.append([Sample(i, slot + j) for j, i in enumerate(chunk)])
            slot += len(chunk)
    rng.shuffle(batches)
    usable = len(batches) // num_processes * num_processes
    return batches[:usable]


def assign_buckets(items: list[ImageItem], buckets: list[tuple[int, int]]) -> Counter:
    for it in items:
        it.bucket = nearest_bucket(it.size, buckets)
    return Counter(it.bucket for it in items)
