"""Apply a mix of 3 rank-32 kohya LoRAs to a real-size SD1.5 UNet + CLIP-L: sdlora vs diffusers.

Same run, same files, same model (random weights built from sdlora/configs/sd1):
  * apply + restore:  sdlora Mixer.apply(3 entries) + restore()  (files read, cold cache)
                      vs diffusers load_lora_weights ×3 + set_adapters + fuse_lora + unfuse_lora
  * switching mixes:  sdlora apply(mix A) -> apply(mix B) -> apply(mix A) (files already parsed)
                      vs diffusers unfuse_lora + set_adapters + fuse_lora per switch (adapters loaded)
  * UNet step time:   base weights vs the mix applied by sdlora (must be equal within noise), and
                      diffusers with the 3 adapters active but not fused (its runtime path), for scale.
The last line is `apply speedup vs diffusers: X.XX` (diffusers time / sdlora time, apply + restore).

    python bench/apply.py [--repeats 3] [--threads N] [--device cpu] [--dtype fp32]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdlora.adapters import LoRA
from sdlora.families import build_text_encoder, build_unet, canonical_modules, load_config
from sdlora.formats.writer import save_lora
from sdlora.mixing import LoraCache, MixEntry, Mixer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _reader():
    try:
        from sdlora.formats import read_lora
        return read_lora, "sdlora.formats.read_lora"
    except ImportError:  # the loader is developed on another branch; its test stand-in reads kohya files
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from lora_shim import read_lora
        return read_lora, "tests/lora_shim.read_lora (sdlora.formats.read_lora not merged yet)"


def build_model(device, dtype):
    """Real-size SD1.5 UNet + CLIP-L with random weights (fast init: normal(0, 0.02) in place)."""
    unet = build_unet(load_config("sd1", "unet"), "meta")
    te = build_text_encoder(load_config("sd1", "text_encoder"), "meta")
    g = torch.Generator(device="cpu").manual_seed(0)
    for model in (unet, te):
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02, generator=g)
            for b in model.buffers():   # CLIP's position_ids: the only buffer that matters
                if not b.is_floating_point():
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
        model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return {"unet": unet, "text_encoder": te}


def kohya_targets(comps):
    """kohya's default LoRA targets: Linear/1×1 conv inside UNet transformers, text attention + MLP."""
    out = {}
    for comp, model in comps.items():
        for path, mod in canonical_modules(comp, model).items():
            if comp == "unet" and ".attentions." in path and (mod.weight.dim() == 2 or mod.weight.shape[2:] == (1, 1)):
                out[path] = tuple(mod.weight.shape)
            elif comp != "unet" and ".encoder.layers." in path:
                out[path] = tuple(mod.weight.shape)
    return out


def write_loras(folder: Path, targets, n=3, rank=32):
    files = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        patches = {}
        for path, shape in targets.items():
            tail = [1, 1] if len(shape) == 4 else []
            patches[path] = LoRA(torch.randn(shape[0], rank, *tail, generator=g) * 0.01,
                                 torch.randn(rank, *shape[1:], generator=g) * 0.01, alpha=rank / 2)
        f = folder / f"lora{i}.safetensors"
        save_lora(f, patches, "sd1", dtype=torch.float16, metadata={"ss_base_model_version": "sd_v1"})
        files.append(str(f))
    return files


def timed(fn) -> float:
    gc.collect()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--latent", type=int, default=32, help="latent side for the UNet step (32 = 256 px)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    import diffusers
    from diffusers import StableDiffusionPipeline
    diffusers.utils.logging.set_verbosity_error()
    import transformers
    transformers.utils.logging.set_verbosity_error()
    read_lora, reader_name = _reader()

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads, "
          f"device {args.device}, {args.dtype}; reader: {reader_name}")
    t = time.perf_counter()
    comps = build_model(args.device, dtype)
    targets = kohya_targets(comps)
    n_params = sum(p.numel() for m in comps.values() for p in m.parameters())
    print(f"model: SD1.5 UNet + CLIP-L, {n_params / 1e6:.0f}M parameters, built in {time.perf_counter() - t:.1f}s")
    tmp = Path(tempfile.mkdtemp(prefix="sdlora-bench-"))
    files = write_loras(tmp, targets)
    size = sum(os.path.getsize(f) for f in files) / 2 ** 20
    print(f"LoRAs: 3 × rank 32, {len(targets)} modules each ({sum(1 for p in targets if p.startswith('unet.'))} UNet, "
          f"{sum(1 for p in targets if not p.startswith('unet.'))} text encoder), fp16 kohya files, {size:.0f} MiB total")

    mix_a = [(files[0], 0.8), (files[1], -0.5), (files[2], 0.6)]
    mix_b = [(files[0], 0.8), (files[1], 0.3), (files[2], 0.6)]     # one multiplier changed
    entries = lambda mix: [MixEntry(f, unet=w, text_encoder=w) for f, w in mix]  # noqa: E731
    mixer = Mixer(comps)

    def sdlora_apply_restore():
        mixer.cache = LoraCache(reader=lambda p, fam, cfg: read_lora(p, family=fam, configs=cfg))
        mixer.apply(entries(mix_a))
        mixer.restore()

    pipe = StableDiffusionPipeline(vae=None, text_encoder=comps["text_encoder"], tokenizer=None, unet=comps["unet"],
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    names = ["l0", "l1", "l2"]

    def set_mix(mix):
        pipe.set_adapters(names, adapter_weights=[w for _, w in mix])

    def diffusers_apply_restore():
        for f, name in zip(files, names):
            pipe.load_lora_weights(f, adapter_name=name)
        set_mix(mix_a)
        pipe.fuse_lora(adapter_names=names)
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    sdlora_apply_restore()         # warm-up, untimed: first-call costs (imports, allocator) on both sides
    diffusers_apply_restore()
    ours, theirs = [], []
    for _ in range(args.repeats):   # interleaved, so both see the same machine load
        ours.append(timed(sdlora_apply_restore))
        theirs.append(timed(diffusers_apply_restore))
    t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
    print(f"apply+restore   sdlora {t_ours:6.2f}s   diffusers {t_theirs:6.2f}s   "
          f"(medians of {args.repeats} after a warm-up; all: sdlora {', '.join(f'{x:.2f}' for x in ours)}; "
          f"diffusers {', '.join(f'{x:.2f}' for x in theirs)})")

    # switching: both sides have the files parsed/loaded already
    mixer.apply(entries(mix_a))
    switches = [(mix_b, mix_a)[i % 2] for i in range(args.repeats)]
    sw_ours = [timed(lambda m=m: mixer.apply(entries(m))) for m in switches]
    warm = timed(lambda: (mixer.restore(), mixer.apply(entries(mix_a))))
    mixer.restore()
    for f, name in zip(files, names):
        pipe.load_lora_weights(f, adapter_name=name)
    set_mix(mix_a)
    pipe.fuse_lora(adapter_names=names)

    def diffusers_switch(mix):
        pipe.unfuse_lora()
        set_mix(mix)
        pipe.fuse_lora(adapter_names=names)

    sw_theirs = [timed(lambda m=m: diffusers_switch(m)) for m in switches]
    pipe.unfuse_lora()
    s_ours, s_theirs = statistics.median(sw_ours), statistics.median(sw_theirs)
    print(f"switch mix      sdlora {s_ours:6.2f}s   diffusers {s_theirs:6.2f}s   (one multiplier changed; medians "
          f"of {len(sw_ours)}) -> {s_theirs / s_ours:.2f}x; sdlora full re-apply from cache {warm:.2f}s")

    # UNet step: base vs sdlora-patched (must match), diffusers runtime adapters for scale
    x = torch.randn(1, 4, args.latent, args.latent, device=args.device, dtype=dtype)
    ctx = torch.randn(1, 77, 768, device=args.device, dtype=dtype)
    t_step = torch.tensor([500], device=args.device)

    def step():
        with torch.no_grad():
            comps["unet"](x, t_step, ctx)

    step()  # warm-up
    set_mix(mix_a)                 # adapters active, not fused: diffusers' runtime path
    unfused = [timed(step) for _ in range(2)]
    pipe.unload_lora_weights()
    base, mixed = [], []
    for _ in range(args.repeats):  # interleaved pairs; the minimum is the least disturbed by other load
        base.append(timed(step))
        mixer.apply(entries(mix_a))
        mixed.append(timed(step))
        mixer.restore()
    b, m, u = min(base), min(mixed), min(unfused)
    print(f"UNet step ({args.latent}×{args.latent} latent, min of {args.repeats})   base {b:.3f}s   sdlora mix {m:.3f}s "
          f"({m / b - 1:+.1%})   diffusers 3 adapters unfused {u:.3f}s ({u / b - 1:+.1%}); medians: base "
          f"{statistics.median(base):.3f}s, sdlora mix {statistics.median(mixed):.3f}s")
    print(f"apply speedup vs diffusers: {t_theirs / t_ours:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
