"""A 3×3 XY grid over two LoRAs' weights: one routed batch (sdlora.xy.weight_grid) vs the old way,
each cell's mix patched into the weights and generated alone, in the same run on the same model.

    OMP_NUM_THREADS=1 python bench/multi_grid.py [--steps 20] [--repeats 3]
    from multi_grid import bench_grid; bench_grid()      # {"routed_s", "sequential_s", "max_rel_diff"}

Model: the embedded tiny SD1 (sample_data/models/tiny-sd, 64 px), fp32 on the CPU unless `device`
says otherwise. LoRAs: two random rank-4 kohya files on every UNet attention projection and the
text encoder's attention/MLP layers (tests/loras.py's random_lora, scale 0.3). Grid: X = LoRA a
at 0, 0.5, 1, Y = LoRA b at -1, 0, 1, the same seed in every cell, Euler a, CFG 7.
max_rel_diff: max |routed − sequential| / max |sequential| over all pixels of the 9 decoded images
(uint8 RGB, as saved). Times: the median of `repeats` rounds after one untimed warm-up round of each;
the rounds alternate routed / sequential so both see the same machine load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

XS, YS = (0.0, 0.5, 1.0), (-1.0, 0.0, 1.0)
PROMPT, SEED = "a red circle on a blue background", 3


def _loras(base, folder: Path):
    from loras import attention_paths, random_lora, write
    from sdlora.extra_networks import LoraRef
    from sdlora.mixplan import component_configs, components_of
    comps = components_of(base.pipe)
    configs = component_configs(comps)
    refs = []
    for name, seed in (("a", 1), ("b", 2)):
        path = folder / f"{name}.safetensors"
        write(path, random_lora(comps, attention_paths(comps), rank=4, seed=seed, scale=0.3), base.family, configs)
        refs.append(LoraRef(name, 1.0, 1.0, path))
    return refs


def _routed(base, refs, steps):
    from sdlora.xy import weight_grid
    g = weight_grid(base, PROMPT, refs, x=0, xs=XS, y=1, ys=YS, seed=SEED, steps=steps, progress=False)
    return [np.asarray(c.image, dtype=np.float64) for c in g.cells]


def _sequential(base, refs, steps):
    import dataclasses
    from sdlora.generate import generate_prompts
    out = []
    for y in YS:
        for x in XS:
            cell = [dataclasses.replace(refs[0], te=x, unet=x), dataclasses.replace(refs[1], te=y, unet=y)]
            (r,) = generate_prompts(base, [PROMPT], loras=cell, seed=SEED, steps=steps, progress=False, mode="patch")
            out.append(np.asarray(r.image, dtype=np.float64))
    return out


def decoded_diff(base, refs, steps: int) -> float:
    """Max |routed − patched| / max |patched| of the 9 cells' decoded images as floats (before the
    8-bit rounding of a PNG, which alone makes a difference of one level, 1/255): DPM++ 2M Karras,
    one seed per cell, CFG 7."""
    import dataclasses
    import torch
    from sdlora.mixing import mixer_for
    from sdlora.mixplan import MixEntry
    from sdlora.routing import use_mixes
    from sdlora.samplers import make_scheduler
    pipe = base.pipe
    pipe.scheduler = make_scheduler("DPM++ 2M Karras", pipe.scheduler.config)
    mixes = [[MixEntry.of(dataclasses.replace(refs[0], te=x, unet=x)),
              MixEntry.of(dataclasses.replace(refs[1], te=y, unet=y))] for y in YS for x in XS]
    kw = dict(num_inference_steps=steps, guidance_scale=7.0, output_type="np")

    def seeds(n):
        return [torch.Generator("cpu").manual_seed(SEED) for _ in range(n)]
    with torch.no_grad():
        with use_mixes(pipe, mixes, mode="route"):
            routed = pipe([PROMPT] * len(mixes), generator=seeds(len(mixes)), **kw).images
        patched = []
        for m in mixes:
            with use_mixes(pipe, [m], mode="patch"):
                patched.append(pipe([PROMPT], generator=seeds(1), **kw).images[0])
    mixer_for(pipe).restore()
    return float(max(np.abs(r - p).max() for r, p in zip(routed, patched)) / max(np.abs(p).max() for p in patched))


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def bench_grid(steps: int = 20, repeats: int = 3, device: str = "cpu") -> dict:
    """Seconds for the 3×3 grid routed (one batch of 9) and sequential (9 patched runs), medians of
    `repeats`, and the max relative difference of their decoded images."""
    from sdlora.mixing import mixer_for
    from sdlora.pipelines import load_base
    base = load_base(None, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        refs = _loras(base, Path(tmp))
        _routed(base, refs, steps)                     # warm-up: file cache, kernels
        _sequential(base, refs, steps)
        routed_t, seq_t, diff = [], [], 0.0
        for _ in range(max(1, repeats)):
            t, routed = _timed(lambda: _routed(base, refs, steps))
            routed_t.append(t)
            t, seq = _timed(lambda: _sequential(base, refs, steps))
            seq_t.append(t)
            scale = max(float(np.abs(s).max()) for s in seq)
            diff = max(diff, max(float(np.abs(r - s).max()) for r, s in zip(routed, seq)) / scale)
        mixer_for(base.pipe).restore()
        float_diff = decoded_diff(base, refs, steps)
    return {"routed_s": statistics.median(routed_t), "sequential_s": statistics.median(seq_t), "max_rel_diff": diff,
            "decoded_rel_diff": float_diff}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    r = bench_grid(a.steps, a.repeats, a.device)
    print(f"3x3 grid, tiny SD1 64 px, {a.steps} steps: routed {r['routed_s']:.2f} s, sequential {r['sequential_s']:.2f} s "
          f"(sequential/routed {r['sequential_s'] / r['routed_s']:.2f}x), max rel diff {r['max_rel_diff']:.2e} "
          f"(PNG levels), {r['decoded_rel_diff']:.1e} (decoded floats)")


if __name__ == "__main__":
    main()
