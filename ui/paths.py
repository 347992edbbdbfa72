"""What the browser may name on disk: folders inside the configured roots, and checked uploads.

Anyone who can open the page can type a path, so every path from the page goes through `confine`:
it is resolved with symlinks followed (`os.path.realpath`) and must then lie inside one of the
roots, which are resolved the same way. `..`, absolute paths elsewhere and symlinks pointing out
are refused alike. A folder handed to the trainer is also walked (`confine_tree`), because a link
*inside* an allowed folder would otherwise let the trainer read a file from anywhere.

Uploads are checked by content, not by name: an image must start with the signature of a format
the trainer reads and open with PIL within the pixel limit; a caption must be small UTF-8 text;
file names are reduced to a safe base name.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import SdloraError

MAX_IMAGE_BYTES = 50 << 20          # one uploaded image
MAX_CAPTION_BYTES = 64 << 10        # one caption file
MAX_UPLOAD_FILES = 2000             # one training upload
MAX_IMAGE_PIXELS = 64 << 20         # 8192 x 8192: larger is a decompression bomb, not a training image
CAPTION_EXTS = (".txt", ".caption")

# magic bytes -> (format, canonical extension); the trainer reads these (training.dataset.IMAGE_EXTENSIONS)
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG", ".png"),
    (b"\xff\xd8\xff", "JPEG", ".jpg"),
    (b"BM", "BMP", ".bmp"),
)


class PathError(SdloraError):
    """A path from the page that is outside the allowed folders (or otherwise unusable)."""


class UploadError(SdloraError):
    """An uploaded file that is not what it claims to be, or too big."""


def _real(path) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _inside(path: Path, roots) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


@dataclass(frozen=True)
class Roots:
    """The folders the page may read from (training data) or write into (outputs, LoRAs)."""
    folders: tuple[Path, ...]

    @classmethod
    def of(cls, *folders) -> "Roots":
        return cls(tuple(dict.fromkeys(_real(Path(f).expanduser()) for f in folders if f)))

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.folders)

    def confine(self, user_path: str, *, kind: str = "folder", must_exist: bool = True, is_dir: bool = True) -> Path:
        """The real path named by `user_path` (relative: to the first root) if it lies inside a root."""
        text = (user_path or "").strip()
        if not text:
            raise PathError(f"no {kind} given; expected a path inside {self.describe()}")
        if "\0" in text:
            raise PathError(f"{kind} {text!r}: contains a NUL character")
        if not self.folders:
            raise PathError(f"no {kind}s are allowed: start the UI with --data-root DIR")
        p = Path(text).expanduser()
        real = _real(p if p.is_absolute() else self.folders[0] / p)
        if not _inside(real, self.folders):
            raise PathError(f"{kind} {text!r} is outside the allowed folders ({self.describe()}); "
                            "put it inside one of them or start the UI with --data-root")
        if must_exist and not real.exists():
            raise PathError(f"{kind} {text!r} does not exist (looked at {real})")
        if must_exist and is_dir and not real.is_dir():
            raise PathError(f"{kind} {text!r} is a file, not a folder")
        return real

    def confine_tree(self, folder: Path, max_depth: int = 3) -> None:
        """Refuse a folder in which a symlink (to a file or folder) leads outside the roots."""
        escapes = []
        base_depth = len(folder.parts)
        for root, dirs, files in os.walk(folder, followlinks=False):
            here = Path(root)
            for name in dirs + files:
                p = here / name
                if p.is_symlink() and not _inside(_real(p), self.folders):
                    escapes.append(str(p.relative_to(folder)))
            if len(here.parts) - base_depth >= max_depth:
                dirs[:] = []
        if escapes:
            raise PathError(f"{folder} holds link(s) that point outside the allowed folders: "
                            f"{', '.join(escapes[:5])}{' ...' if len(escapes) > 5 else ''}; copy the files instead")

    def folders_with_images(self, limit: int = 200) -> list[str]:
        """Folders (up to two levels below each root) that hold images: suggestions for the page."""
        exts = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
        found = []
        for root in self.folders:
            for d in [root, *sorted(p for p in root.glob("*") if p.is_dir()),
                      *sorted(p for p in root.glob("*/*") if p.is_dir())]:
                if d.name.startswith(".") or not _inside(_real(d), self.folders):
                    continue
                try:
                    if any(f.suffix.lower() in exts for f in d.iterdir()):
                        found.append(str(d))
                except OSError:
                    continue
                if len(found) >= limit:
                    return found
        return found


# ---------------------------------------------------------------------------------------------
# uploads

def safe_name(name: str, *, what: str = "name") -> str:
    """A file or LoRA name the page gave: no folders, no leading dot, printable, at most 120 chars."""
    base = Path(str(name).replace("\\", "/")).name.strip()
    cleaned = re.sub(r"[^\w\-. ()+,@]", "_", base).strip(" .")
    if not cleaned:
        raise PathError(f"{what} {name!r} is empty or has no usable characters; use letters, digits, - or _")
    return cleaned[:120]


def image_format(path) -> tuple[str, str]:
    """(format, extension) of an image file by its first bytes; UploadError if none the trainer reads."""
    with open(path, "rb") as f:
        head = f.read(16)
    for sig, fmt, ext in _SIGNATURES:
        if head.startswith(sig):
            return fmt, ext
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", ".webp"
    raise UploadError(f"{Path(path).name}: not a PNG, JPEG, WebP or BMP image (its content says otherwise)")


def check_image(path, *, max_bytes: int = MAX_IMAGE_BYTES) -> str:
    """Check an uploaded image (size, signature, PIL can read its header, pixel count); returns its extension."""
    from PIL import Image
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UploadError(f"{Path(path).name}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB limit")
    fmt, ext = image_format(path)
    try:
        with Image.open(path) as im:
            if im.format != fmt:
                raise UploadError(f"{Path(path).name}: looks like {fmt} but reads as {im.format}")
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise UploadError(f"{Path(path).name}: {w}x{h} pixels is over the limit of {MAX_IMAGE_PIXELS} pixels")
            im.verify()
    except UploadError:
        raise
    except Exception as e:  # PIL raises many types for broken files
        raise UploadError(f"{Path(path).name}: not a readable {fmt} image ({type(e).__name__}: {e})") from None
    return ext


def check_caption(path) -> str:
    """An uploaded caption file's text (small UTF-8 text file)."""
    size = os.path.getsize(path)
    if size > MAX_CAPTION_BYTES:
        raise UploadError(f"{Path(path).name}: {size} bytes is too long for a caption (limit {MAX_CAPTION_BYTES})")
    data = Path(path).read_bytes()
    if b"\0" in data:
        raise UploadError(f"{Path(path).name}: a caption must be text; this file is binary")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UploadError(f"{Path(path).name}: a caption must be UTF-8 text") from None


def import_training_upload(files, dest: Path) -> tuple[int, int]:
    """Check uploaded images (+ `.txt`/`.caption` captions) and copy them into the new folder `dest`.

    Every file is checked before anything is written; returns (images, captions).
    """
    files = [Path(f) for f in files or []]
    if not files:
        raise UploadError("no files uploaded; add images (PNG/JPEG/WebP/BMP) and optional .txt captions")
    if len(files) > MAX_UPLOAD_FILES:
        raise UploadError(f"{len(files)} files is over the limit of {MAX_UPLOAD_FILES} per upload")
    plan: list[tuple[Path, str]] = []
    images = captions = 0
    for f in files:
        name = safe_name(f.name, what="file name")
        stem, ext = os.path.splitext(name)
        if ext.lower() in CAPTION_EXTS:
            check_caption(f)
            plan.append((f, stem + ext.lower()))
            captions += 1
        else:
            plan.append((f, stem + check_image(f)))    # the extension follows the content
            images += 1
    if not images:
        raise UploadError("the upload has captions but no images")
    targets = [t for _, t in plan]
    dupes = sorted({t for t in targets if targets.count(t) > 1})
    if dupes:
        raise UploadError(f"several uploaded files would be named {', '.join(dupes[:5])}; rename them")
    dest.mkdir(parents=True, exist_ok=False)
    for src, target in plan:
        shutil.copyfile(src, dest / target)
    return images, captions


def unique_folder(parent: Path, name: str) -> Path:
    """parent/name, or parent/name-2, -3, ... when taken."""
    p, n = parent / name, 1
    while p.exists():
        n += 1
        p = parent / f"{name}-{n}"
    return p
