"""Routed vs patched mixes: accuracy per algorithm family and the cost of one mix routed.

  * accuracy: on the tiny SD1 model (tests/tiny.py), 3 samples with 3 mixes of each algorithm
    family routed in one CFG-doubled batch vs each mix patched (Mixer) and run alone; max
    |routed − patched| / max |patched| of the UNet output, fp32;
  * speed: one UNet call, base weights vs one mix patched vs the same mix routed (single-mix mode),
    on the tiny model and on a real-size SD1.5 UNet (random weights, rank-32 LoRA on the attention
    projections, 32x32 latents).

    OMP_NUM_THREADS=1 python bench/routed.py [--repeats 5] [--no-real]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loras import attention_paths, components, lora_file, random_lora  # noqa: E402
from test_routing import ALGOS, _mixes, patched_per_sample, probe, rel, outputs  # noqa: E402

from sdlora.families import build_unet, load_config  # noqa: E402
from timing import median_time  # noqa: E402
from sdlora.mixing import MixEntry, Mixer  # noqa: E402
from sdlora.routing import Router  # noqa: E402


def accuracy():
    for algo in ALGOS:
        comps = components("sd1")
        _, _, mixes = _mixes(comps, "sd1", algo)
        inputs = probe(comps, 6)
        want = patched_per_sample(comps, mixes, inputs, 6)
        with Router(comps, mixes):
            got = outputs(comps, inputs)
        print(f"{algo:15s} max rel diff unet {rel(got['unet'], want['unet']):.1e}  "
              f"text encoder {rel(got['text_encoder'], want['text_encoder']):.1e}")


def speed(name, comps, args_, mix, repeats):
    unet = comps["unet"]
    with torch.no_grad():
        def call():
            unet(*args_)
        base = median_time(call, repeats)
        mixer = Mixer(comps)
        mixer.apply(mix)
        patched = median_time(call, repeats)
        mixer.restore()
        with Router(comps, [mix]):
            routed = median_time(call, repeats)
        after = median_time(call, repeats)
    print(f"{name}: UNet call base {base * 1e3:.1f} ms, patched {patched * 1e3:.1f} ms, routed {routed * 1e3:.1f} ms "
          f"(routed/patched {routed / patched:.2f}), base after routing {after * 1e3:.1f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-real", action="store_true")
    a = ap.parse_args()
    accuracy()
    comps = components("sd1")
    lf = lora_file(random_lora(comps, attention_paths(comps), rank=8, seed=1), "sd1")
    x, t, ctx, _, _ = probe(comps, 2)
    speed("tiny SD1, batch 2", comps, (x, t, ctx), [MixEntry(lf, unet=0.8)], a.repeats)
    if not a.no_real:
        torch.manual_seed(0)
        unet = build_unet(load_config("sd1", "unet"), "cpu").eval().requires_grad_(False)
        comps = {"unet": unet}
        paths = [p for p in attention_paths({"unet": unet})]
        lf = lora_file(random_lora(comps, paths, rank=32, seed=1, scale=0.02), "sd1")
        g = torch.Generator().manual_seed(0)
        args_ = (torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g))
        speed("real-size SD1.5 UNet, 32x32 latents, rank-32 LoRA on attention", comps, args_,
              [MixEntry(lf, unet=0.8, text_encoder=0)], max(2, a.repeats // 2))


if __name__ == "__main__":
    main()
