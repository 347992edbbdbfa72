"""The LoRA folder as the page sees it: every file with what `sdlora inspect` says about it.

`inspect_lora` (the `sdlora inspect` command's function) is run once per file version (path, size,
mtime) and cached; `signature()` is a cheap listing the page polls so that a LoRA written by a
training run or a saved mix shows up in every picker without a restart.
"""
from __future__ import annotations

import base64
import io
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.errors import describe
from sdlora.extra_networks import LoraRef, lora_files
from sdlora.families import get_family

PREVIEW_SUFFIXES = (".png", ".preview.png", ".jpg", ".jpeg", ".preview.jpg", ".webp", ".preview.webp")
THUMB_SIDE = 256


@dataclass
class LoraEntry:
    name: str                       # file stem: what <lora:NAME> and the pickers call it
    path: Path
    size: int
    info: dict | None = None        # inspect_lora's dict
    error: str | None = None        # why it could not be read
    preview: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        return self.info["family"] if self.info else None

    def fits(self, family: str) -> bool:
        """Usable with a base model of `family` (readable and of that family)."""
        return self.info is not None and self.family == family

    def misfit_reason(self, family: str) -> str | None:
        if self.error:
            return f"{self.name} cannot be read: {self.error}"
        if self.family != family:
            return (f"{self.name} is a {self.info['family_label']} LoRA but the loaded base model is "
                    f"{get_family(family).label}; it cannot be used for generation with this model")
        return None

    def prompt_words(self) -> list[str]:
        """The trigger words worth typing: all of an explicit list (ssmd_keywords, modelspec trigger
        phrase, Civitai's trainedWords); from kohya's tag counts only the tags that were on at least
        half as many images as the most frequent one (a trigger is on every image, a caption on one)."""
        info = self.info or {}
        words = info.get("trigger_words") or []
        if info.get("trigger_source") != "ss_tag_frequency":
            return list(words)
        counts: dict[str, int] = {}
        try:
            for tags in json.loads(info["metadata"].get("ss_tag_frequency", "{}")).values():
                for t, n in tags.items():
                    counts[t.strip()] = counts.get(t.strip(), 0) + int(n)
        except (ValueError, AttributeError, TypeError):
            return words[:1]
        top = max((counts.get(w, 0) for w in words), default=0)
        return [w for w in words if counts.get(w, 0) * 2 >= top]

    def prompt_tag(self, weight: float) -> str:
        """`<lora:NAME:W>` followed by the LoRA's trigger words (what a Library card adds)."""
        return ", ".join([LoraRef(self.name, weight, weight).tag, *self.prompt_words()])


def find_preview(path: Path) -> Path | None:
    """A1111's preview beside the file: NAME.png, NAME.preview.png (or .jpg/.webp)."""
    stem = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        p = Path(str(stem) + suffix)
        if p.is_file():
            return p
    return None


class Catalog:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._cache: dict[str, tuple[tuple, LoraEntry]] = {}
        self._thumbs: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def files(self) -> list[tuple[Path, os.stat_result]]:
        """The LoRA files (`extra_networks.lora_files`) with their stat, sorted by name."""
        out = []
        for p in lora_files(self.folder) if self.folder.is_dir() else []:
            try:
                out.append((p, p.stat()))
            except OSError:       # removed meanwhile, or a dangling link
                continue
        return sorted(out, key=lambda ps: (ps[0].stem.lower(), str(ps[0])))

    def signature(self) -> tuple:
        """Changes whenever a LoRA file (or its preview) is added, removed or rewritten."""
        sig = []
        for p, st in self.files():
            prev = find_preview(p)
            sig.append((str(p), st.st_size, st.st_mtime_ns, prev.stat().st_mtime_ns if prev else 0))
        return tuple(sig)

    def entries(self) -> list[LoraEntry]:
        from sdlora.inspect import inspect_lora
        out = []
        for p, st in self.files():
            key = (st.st_size, st.st_mtime_ns)
            with self._lock:
                cached = self._cache.get(str(p))
            if cached is None or cached[0] != key:
                entry = LoraEntry(p.stem, p, st.st_size)
                try:
                    entry.info = inspect_lora(p)
                except Exception as e:  # noqa: BLE001 - an unreadable file becomes a card that says why
                    entry.error = describe(e)
                cached = (key, entry)
                with self._lock:
                    self._cache[str(p)] = cached
            cached[1].preview = find_preview(p)
            out.append(cached[1])
        return out

    def names(self, family: str | None = None) -> list[str]:
        """Stems of the LoRAs (that fit `family`), for the pickers."""
        return [e.name for e in self.entries() if family is None or e.fits(family)]

    def get(self, name: str) -> LoraEntry | None:
        matches = [e for e in self.entries() if e.name == name] or \
                  [e for e in self.entries() if e.name.lower() == name.lower()]
        return matches[0] if len(matches) == 1 else None

    def thumbnail(self, path: Path) -> str | None:
        """A small JPEG data URL of a preview image (cached), so no file path is ever served."""
        from PIL import Image
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path), st.st_mtime_ns)
        with self._lock:
            if key in self._thumbs:
                return self._thumbs[key]
        try:
            with Image.open(path) as im:
                im.draft("RGB", (THUMB_SIDE, THUMB_SIDE))
                im = im.convert("RGB")
                im.thumbnail((THUMB_SIDE, THUMB_SIDE))
                if max(im.size) < 128:   # tiny-model previews: scale up without blurring
                    f = 128 // max(im.size) or 1
                    im = im.resize((im.width * f, im.height * f), Image.NEAREST)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
        except Exception:  # noqa: BLE001 - a broken preview just shows no picture
            return None
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        with self._lock:
            self._thumbs[key] = url
        return url
