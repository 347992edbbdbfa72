"""Encode once, train many times: VAE latents (memory or disk) and frozen-text-encoder embeddings.

A latent is drawn from the VAE's posterior once per image (and flip) with a generator seeded by the
image, as kohya caches `latent_dist.sample()`; the draw does not depend on how images were
batched. An fp16/bf16 VAE that returns non-finite latents (SDXL's VAE in fp16 is the known case) is
upcast to fp32 and the batch re-encoded: training never sees NaNs.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sdlora.atomic import atomic_write
from sdlora.errors import SdloraError
from sdlora.training import dataset as ds


@dataclass
class Latent:
    latent: torch.Tensor               # [C, h, w] fp32, already times the VAE scaling factor
    original_size: tuple[int, int]     # (h, w) of the upright image (SDXL conditioning)
    crop_top_left: tuple[int, int]     # (top, left) of the crop in the resized image


def prepare_pixels(item: ds.ImageItem, flip: bool, rng=None):
    """The item's image resized and cropped to its bucket (random crop with `rng`), maybe flipped."""
    im = ds.load_image(item.path)
    original = (im.height, im.width)
    im, crop = ds.resize_and_crop(im, item.bucket, rng)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return ds.to_tensor(im), original, crop


class VaeEncoder:
    """Pixels -> scaled latents with the NaN guard. `seeds` make each posterior draw per image."""

    def __init__(self, vae, warn=warnings.warn):
        self.vae = vae
        self.warn = warn
        self.upcast = False

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        vae = self.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        if not (torch.isfinite(dist.mean).all() and torch.isfinite(dist.std).all()):
            if vae.dtype == torch.float32:
                raise SdloraError("the VAE returned NaN/inf latents even in fp32; the VAE weights are broken")
            self.warn(f"the {str(vae.dtype).removeprefix('torch.')} VAE returned NaN latents; upcasting the VAE "
                      "to fp32 (use a fixed fp16 VAE to avoid this)")
            vae.to(torch.float32)
            self.upcast = True
            dist = vae.encode(pixels.to(vae.device, torch.float32)).latent_dist
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(s))
                             for s in seeds]).to(dist.mean.device, dist.mean.dtype)
        latents = (dist.mean + dist.std * noise).float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor


def latent_seed(seed: int, item: int, flip: bool) -> int:
    return int.from_bytes(hashlib.sha256(f"latent:{seed}:{item}:{int(flip)}".encode()).digest()[:7], "little")


class LatentCache:
    """(item index, flipped) -> Latent, kept in memory; on disk too when `cache_dir` is given."""

    def __init__(self, cache_dir: Path | None = None):
        self.mem: dict[tuple[int, bool], Latent] = {}
        self.dir = Path(cache_dir) if cache_dir else None

    def _file(self, item: ds.ImageItem, flip: bool, vae_id: str) -> Path:
        st = item.path.stat()
        key = f"{item.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{item.bucket}|{flip}|{vae_id}"
        return self.dir / (hashlib.sha1(key.encode()).hexdigest() + ".safetensors")

    def fill(self, items, keys: list[tuple[int, bool]], encoder: VaeEncoder, seed: int, batch_size: int,
             vae_id: str, progress=None) -> None:
        """Encode every key not cached yet, batched per bucket in a fixed order."""
        todo = []
        for k in keys:
            if k in self.mem:
                continue
            if self.dir is not None:
                f = self._file(items[k[0]], k[1], vae_id)
                if f.is_file():
                    t = load_file(f)
                    self.mem[k] = Latent(t["latent"], tuple(t["original_size"].tolist()),
                                         tuple(t["crop_top_left"].tolist()))
                    continue
            todo.append(k)
        todo.sort(key=lambda k: (items[k[0]].bucket, k))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            # batches never mix buckets (different shapes)
            groups: dict = {}
            for k in chunk:
                groups.setdefault(items[k[0]].bucket, []).append(k)
            for group in groups.values():
                prepared = [prepare_pixels(items[i], flip) for i, flip in group]
                lat = encoder(torch.stack([p[0] for p in prepared]), [latent_seed(seed, i, f) for i, f in group])
                for k, (_, original, crop), z in zip(group, prepared, lat.cpu()):
                    self.mem[k] = Latent(z.clone(), original, crop)
                    if self.dir is not None:
                        self._write(self._file(items[k[0]], k[1], vae_id), self.mem[k])
            if progress:
                progress(min(start + batch_size, len(todo)), len(todo))

    def _write(self, path: Path, lat: Latent) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"latent": lat.latent.contiguous(), "original_size": torch.tensor(lat.original_size),
                   "crop_top_left": torch.tensor(lat.crop_top_left)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))

    def __getitem__(self, key) -> Latent:
        return self.mem[key]


class EmbeddingCache:
    """caption -> (context, pooled) of frozen text encoders, encoded one caption at a time so the
    numbers never depend on which captions shared a batch."""

    def __init__(self, encode_fn):
        self.encode_fn = encode_fn      # list[str] -> (context [B, T, D], pooled [B, P] | None)
        self.mem: dict[str, tuple] = {}

    @torch.no_grad()
    def fill(self, captions) -> None:
        for c in sorted(set(captions)):
            if c not in self.mem:
                ctx, pooled = self.encode_fn([c])
                self.mem[c] = (ctx[0], None if pooled is None else pooled[0])

    def batch(self, captions: list[str]):
        ctx = torch.stack([self.mem[c][0] for c in captions])
        pooled = None if self.mem[captions[0]][1] is None else torch.stack([self.mem[c][1] for c in captions])
        return ctx, pooled
