"""LoRA training on a quantized frozen base (sdlora.quant): memory, speed and what the LoRA learns.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python bench/quant.py
    python bench/quant.py --steps 2 --style-steps 150     # shorter

1. Real-size SD1.5 UNet (sdlora/configs/sd1, random weights), one fresh process per base precision
   (fp32, bf16, int8, nf4): the UNet is built on the meta device and each layer is materialised
   (random init) and stored in the precision at once, so no process ever holds the fp32 model
   unless it trains on it. Then LoRA training as sdlora's trainer sets it up (rank 16, alpha 8,
   attention projections, AdamW lr 1e-4, fp32 LoRA, gradient checkpointing for every precision),
   batch 1 at 256 px (a 32x32 latent, a 77-token context), `--warmup` untimed steps then `--steps`
   timed ones. Peak memory = the process's peak resident set size (`ru_maxrss`, so torch's
   allocator, bitsandbytes and the libraries are all counted, import baseline included); step time
   = median CPU time (`time.process_time`, one thread: the work done, robust to the other jobs on a
   shared machine) of the timed steps.
2. The embedded model (sample_data/models/tiny-sd): tools/eval_style.py's procedure on a style
   folder (base images, `tiny-cpu-demo` training, LoRA images on the same prompts and seeds, the
   style metric) with the fp32 base and with the NF4 base, same seeds. Headline: the LoRA images
   generated as the trainer leaves them (the LoRA on the base it was trained on); also printed,
   the NF4-trained file applied to the fp32 base (how A1111/ComfyUI users would use it).
Last two lines: `peak memory nf4 vs fp32: X.XX` and `style metric nf4 minus fp32: X.XX`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "bf16", "int8", "nf4")


def random_unet(precision: str):
    """A real-size SD1.5 UNet with random weights, each Linear/Conv2d stored in `precision` as soon
    as it exists (peak: the stored model plus one fp32 layer)."""
    import torch
    from sdlora.families import build_unet, load_config
    from sdlora.quant import _mmap_large_blocks, quantize_module, release_freed_memory
    if precision != "fp32":
        _mmap_large_blocks()              # what sdlora.quant.quantize does for a stored base
    torch.manual_seed(0)
    unet = build_unet(load_config("sd1", "unet"), "meta")
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if next(child.children(), None) is not None:
                continue                               # not a leaf: its leaves come in turn
            if any(True for _ in child.parameters(recurse=False)) or any(True for _ in child.buffers(recurse=False)):
                child.to_empty(device="cpu", recurse=False)
                if hasattr(child, "reset_parameters"):
                    child.reset_parameters()
                setattr(parent, name, quantize_module(child, precision))
                release_freed_memory()      # what sdlora.quant.quantize does once at its end
    for name, p in list(unet.named_parameters(recurse=True)):   # parameters of non-leaf modules, if any
        if p.is_meta:
            raise RuntimeError(f"{name} was not materialised")
    return unet.requires_grad_(False).eval()


def worker(a) -> None:
    import torch
    from sdlora.network import LoRANetwork, NetworkSpec
    from sdlora.training.trainer import sdpa_processor
    torch.set_num_threads(1)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    unet = random_unet(a.worker)
    unet.set_attn_processor(sdpa_processor())
    unet.enable_gradient_checkpointing()
    unet.train()
    torch.manual_seed(1)
    net = LoRANetwork.inject({"unet": unet}, NetworkSpec(rank=16, alpha=8.0, unet_groups=("attn",)))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-2)
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(1, 77, 768, generator=g)
    times = []
    for i in range(a.warmup + a.steps):
        x = torch.randn(1, 4, 32, 32, generator=g)
        noise = torch.randn(1, 4, 32, 32, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        c0 = time.process_time()
        loss = torch.nn.functional.mse_loss(unet(x + noise, t, ctx).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(a.json).write_text(json.dumps({"peak": peak, "import_peak": base_rss, "step_s": statistics.median(times),
                                        "loss": float(loss.detach())}))


def realsize(a) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="sdlora-bench-quant-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    res = {}
    for prec in PRECISIONS:
        out = tmp / f"{prec}.json"
        cmd = [sys.executable, __file__, "--worker", prec, "--json", str(out), "--steps", str(a.steps),
               "--warmup", str(a.warmup)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{prec} failed:\n{proc.stderr[-4000:]}")
        res[prec] = json.loads(out.read_text())
        r = res[prec]
        print(f"  SD1.5 UNet 256 px, {prec:4s} base: peak RSS {r['peak'] / 2**20:6.0f} MiB "
              f"(imports alone {r['import_peak'] / 2**20:4.0f} MiB), step {r['step_s']:6.2f} CPU-s", flush=True)
    f = res["fp32"]
    for prec in PRECISIONS[1:]:
        r = res[prec]
        print(f"  {prec} vs fp32: peak memory {r['peak'] / f['peak']:.2f}, step time {r['step_s'] / f['step_s']:.2f}",
              flush=True)
    return res


def style(a) -> dict:
    """eval_style's procedure with the fp32 and the NF4 base, same seeds."""
    from tools.metrics import style_score
    from sdlora.mixing import MixEntry, Mixer
    from sdlora.pipelines import load_base
    from tools.eval_style import evaluate
    from sdlora.training.sampling import generate
    style_dir = ROOT / "sample_data" / "styles" / a.style
    tmp = Path(tempfile.mkdtemp(prefix="sdlora-bench-quant-style-"))
    seeds = tuple(range(a.seeds))
    reports = {}
    for prec in ("fp32", "nf4"):
        t0 = time.time()
        r = evaluate(style_dir, metric=style_score, base=load_base().pipe, seeds=seeds, out_dir=tmp / prec,
                     overrides={"base_precision": prec, "steps": a.style_steps})
        reports[prec] = r
        print(f"  {a.style}, {prec} base: style metric base {r.base_mean:.3f} -> LoRA {r.lora_mean:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    # the NF4-trained file on the fp32 base, same prompts and seeds as eval_style
    pipe = load_base().pipe
    Mixer(pipe).apply([MixEntry(reports["nf4"].lora_path)])
    ims = [im for s in seeds for im in generate(pipe, reports["nf4"].prompts, seed=s * 1000, steps=20, cfg=5.0, size=64)]
    on_fp32 = statistics.fmean(style_score(im, style_dir) for im in ims)
    print(f"  {a.style}, NF4-trained LoRA file on the fp32 base: style metric {on_fp32:.3f} "
          f"(fp32-trained {reports['fp32'].lora_mean:.3f})", flush=True)
    return {"fp32": reports["fp32"].lora_mean, "nf4": reports["nf4"].lora_mean, "nf4_file_on_fp32": on_fp32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per precision (real-size UNet)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--style", default="toon", help="style folder of sample_data/styles")
    p.add_argument("--style-steps", type=int, default=300, help="training steps of the style LoRAs")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--skip-realsize", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    print(f"sdlora quantized-base bench: SD1.5 UNet 256 px batch 1, {a.warmup}+{a.steps} steps per precision; "
          f"style {a.style}, {a.style_steps} steps, {a.seeds} seeds", flush=True)
    mem = realsize(a) if not a.skip_realsize else None
    st = style(a)
    if mem:
        print(f"peak memory nf4 vs fp32: {mem['nf4']['peak'] / mem['fp32']['peak']:.2f}")
    print(f"style metric nf4 minus fp32: {st['nf4'] - st['fp32']:.2f}")


if __name__ == "__main__":
    main()
