"""Many LoRAs side by side: routed batches vs one mix at a time, several LoRAs trained in one run.

  1. grid: a 3x3 XY grid over two LoRAs' weights on the embedded model, as routed batches vs
     patch-and-generate per cell (bench/multi_grid.py); the max relative difference of the decoded
     images (floats, before PNG rounding) is the accuracy line;
  2. real-size step: one SD1.5 UNet call (random weights, 32x32 latents, CFG-doubled rows) with 4
     different rank-32 mixes in one routed batch vs 4 patched calls (patch, call, next mix), and the
     max relative difference of the UNet outputs;
  3. training: 3 style jobs in one `train_many` run vs 3 sequential `train` runs on the embedded
     model, wall time and peak RSS, each in its own process (bench/multi_train.py).

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python bench/multi.py [--train-steps 100] [--no-real]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from loras import attention_paths, lora_file, random_lora  # noqa: E402

from sdlora.families import build_unet, load_config  # noqa: E402
from sdlora.mixing import MixEntry, Mixer  # noqa: E402
from sdlora.routing import Router  # noqa: E402
from timing import median_time  # noqa: E402


def real_size_step(repeats: int) -> dict:
    """4 mixes of 2 random rank-32 attention LoRAs (weights ±) in one routed UNet call vs 4 patched calls."""
    torch.manual_seed(0)
    unet = build_unet(load_config("sd1", "unet"), "cpu").eval().requires_grad_(False)
    comps = {"unet": unet}
    paths = attention_paths(comps)
    files = [lora_file(random_lora(comps, paths, rank=32, seed=s, scale=0.02), "sd1") for s in (1, 2)]
    weights = [(0.8, 0.0), (0.0, 0.8), (0.5, -0.5), (1.0, 1.0)]
    mixes = [[MixEntry(f, unet=w, text_encoder=0) for f, w in zip(files, ws) if w] for ws in weights]
    g = torch.Generator().manual_seed(0)
    n = len(mixes)
    x = torch.randn(n, 4, 32, 32, generator=g)
    ctx = torch.randn(2 * n, 77, 768, generator=g)
    t = torch.tensor([500])
    rows = torch.cat([x, x])                                  # CFG: [uncond; cond], image i in rows i and n+i
    mixer = Mixer(comps)

    def patched():
        outs = []
        for i, mix in enumerate(mixes):
            mixer.apply(mix)
            outs.append(unet(torch.stack([x[i], x[i]]), t, ctx[[i, n + i]]).sample)
        mixer.restore()
        return torch.cat([o[:1] for o in outs] + [o[1:] for o in outs])

    def routed():                              # the Router is built (factors moved) inside the timing
        with Router(comps, mixes):
            return unet(rows, t, ctx).sample

    with torch.no_grad():
        want, got = patched(), routed()
        diff = float((got - want).abs().max() / want.abs().max())
        # warm-up: the accuracy calls above
        t_patched = median_time(patched, repeats, warm_up=False)
        t_routed = median_time(routed, repeats, warm_up=False)
    return {"patched_s": t_patched, "routed_s": t_routed, "max_rel_diff": diff}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--no-real", action="store_true")
    a = ap.parse_args()
    from multi_grid import bench_grid
    from multi_train import bench_training
    grid = bench_grid()
    print(f"3x3 XY grid, embedded model: routed {grid['routed_s']:.2f} s, patch-and-generate per cell "
          f"{grid['sequential_s']:.2f} s; decoded images max relative difference {grid['decoded_rel_diff']:.1e} "
          f"(as floats; {grid['max_rel_diff']:.1e} in PNG levels, where one level is 3.9e-03)")
    if not a.no_real:
        r = real_size_step(a.repeats)
        print(f"real-size SD1.5 UNet call, 4 mixes (CFG rows 8): routed {r['routed_s']:.2f} s, 4 patched calls "
              f"{r['patched_s']:.2f} s (speedup {r['patched_s'] / r['routed_s']:.2f}); UNet output max relative "
              f"difference {r['max_rel_diff']:.1e}")
    tr = bench_training(a.train_steps)
    print(f"3 style jobs x {a.train_steps} steps: one run {tr['parallel_s']:.1f} s, peak {tr['par_peak_mib']:.0f} MiB; "
          f"3 sequential runs {tr['sequential_s']:.1f} s, peak {tr['seq_peak_mib']:.0f} MiB "
          f"(memory ratio {tr['par_peak_mib'] / tr['seq_peak_mib']:.2f})")
    print(f"grid speedup vs sequential: {grid['sequential_s'] / grid['routed_s']:.2f}")
    print(f"routed vs patched max relative difference: {grid['decoded_rel_diff']:.1e}")
    print(f"parallel training speedup vs sequential: {tr['sequential_s'] / tr['parallel_s']:.2f}")


if __name__ == "__main__":
    main()
