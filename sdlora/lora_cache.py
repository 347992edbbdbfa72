"""Parsed LoRA files kept in RAM: read once, bounded, re-read only when the file changes on disk.

Mixer, Router, `mix` and `fuse` all read LoRA files through one of these (DEFAULT_CACHE unless
given another), so switching mixes or routing a batch over many LoRAs never re-reads the disk.
Tensors stay on the CPU here; each user moves what it needs to its model's device.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Any, Callable

import torch


def _read_lora(path, family, configs):
    from sdlora.formats import read_lora
    return read_lora(path, family=family, configs=configs)


def _nbytes(t: torch.Tensor) -> int:
    # a sparse tensor (LyCORIS sparse residual) has no .nbytes: count what it stores
    return t.indices().nbytes + t.values().nbytes if t.is_sparse else t.nbytes


def _lora_nbytes(lora) -> int:
    return sum(_nbytes(t) for ad in lora.patches.values() for t in getattr(ad, "tensors", {}).values()
               if isinstance(t, torch.Tensor))


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class LoraCache:
    """Parsed LoRA files on CPU, least recently used evicted past `max_bytes` of tensors.

    Keyed by (real path, size, mtime, target family and configs): a file edited on disk is read
    again, an unchanged one never is. The entry just loaded is kept even if it alone is too big.
    """

    def __init__(self, max_bytes: int = 4 << 30, reader: Callable | None = None):
        self.max_bytes = max_bytes
        self.reader = reader or _read_lora
        self.reads = 0                       # files actually read (for tests and the UI)
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()

    def get(self, path, family: str | None, configs: dict | None):
        from sdlora.paths import check_input_file
        check_input_file(path, "LoRA file")     # missing, a folder, a link loop: said before reading
        real = os.path.realpath(path)
        st = os.stat(real)
        key = (real, st.st_size, st.st_mtime_ns, family, _digest(configs))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        lora = self.reader(os.fspath(path), family, configs)
        self.reads += 1
        for old in [k for k in self._entries if k[0] == real and k[3:] == key[3:]]:
            del self._entries[old]   # an older version of the same file
        self._entries[key] = (lora, _lora_nbytes(lora))
        while sum(n for _, n in self._entries.values()) > self.max_bytes and len(self._entries) > 1:
            self._entries.popitem(last=False)
        return lora

    def clear(self) -> None:
        self._entries.clear()


DEFAULT_CACHE = LoraCache()
