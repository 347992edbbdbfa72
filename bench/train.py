"""Training speed and peak memory: sdlora's trainer vs the loop of diffusers' train_dreambooth_lora.py.

    python bench/train.py                     # tiny SD1 model at 64 px, then a real-size SD1.5 at 256 px
    python bench/train.py --size tiny         # only the tiny one (a minute)

Both loops train the same model (same random weights), on the same images, resolution, batch,
rank/alpha, target modules (to_q/to_k/to_v/to_out.0 of the UNet), AdamW (lr 1e-4, wd 1e-2),
grad-norm clipping 1.0, fp32, one process, one thread. The peer is diffusers' dreambooth LoRA loop
as written: peft `LoraConfig` added with `unet.add_adapter`, and every step encodes the batch with
the VAE and the prompt with the text encoder (its defaults: no latent cache, no pre-computed
embeddings). sdlora runs its real `Trainer` with its defaults (latents and text embeddings cached
once, fused LoRA layers); "sdlora no-cache" encodes every step like the peer, to show what the
LoRA layers and the loop alone are worth.

Each contender runs in its own process, one after the other, for several rounds that alternate
the contenders. Speed is counted in CPU time: steps per CPU-second = 1 / the median
`time.process_time()` of an optimizer step after `--warmup` untimed steps (one thread, so CPU time
is the work done; this machine's 2 cores are shared with other jobs, which made wall-clock rates
swing by 2x between identical runs; they are printed too). The median round is kept.
Peak memory: on CPU the peak resident set size (RSS, /proc/self/statm sampled every 2 ms by a
thread) from building the model to the last step, which includes the weights every loop holds,
sdlora's one-time caching and the libraries; on CUDA it would be `torch.cuda.max_memory_allocated`
(not measured: no GPU here).
(A race of both loops in ONE process, step for step, was tried: the two models' allocations
interfere with each other's malloc/page-fault pattern, which distorted both.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"tiny": dict(res=64, steps=30, warmup=5, images=8, rounds=3),
         "sd15": dict(res=256, steps=4, warmup=1, images=4, rounds=1)}
CONTENDERS = ("diffusers", "sdlora", "sdlora no-cache")


# ----------------------------------------------------------------------------------------------
# measurement

class PeakRSS:
    """Peak resident set size of this process, sampled by a thread."""

    def __init__(self, every=0.002):
        self.every, self.peak, self._stop = every, 0, False
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.t = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self.t.join()
        self.peak = max(self.peak, self.rss())


# ----------------------------------------------------------------------------------------------
# the model and the data (identical for every contender)

def build_pipeline(size: str, seed: int = 0):
    import torch
    if size == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import tiny_pipeline
        return tiny_pipeline("sd1", seed)
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer
    from sdlora.families import CONFIG_DIR, build_text_encoder, build_unet, load_config
    torch.manual_seed(seed)
    unet = build_unet(load_config("sd1", "unet"), "cpu")
    vae = AutoencoderKL.from_config(load_config("sd1", "vae"))
    te = build_text_encoder(load_config("sd1", "text_encoder"), "cpu")
    sched = {k: v for k, v in load_config("sd1", "scheduler").items() if not k.startswith("_")}
    for m in (unet, vae, te):
        m.eval().requires_grad_(False)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(str(CONFIG_DIR / "tokenizer")),
                                   unet=unet, scheduler=DDPMScheduler.from_config(sched), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def make_images(folder: Path, n: int, res: int) -> None:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zzstyle, picture number {i}, abstract noise")


# ----------------------------------------------------------------------------------------------
# contender 1: diffusers' train_dreambooth_lora.py loop

class DiffusersLoop:
    """The dreambooth LoRA script's setup and loop body (its defaults), one `step()` at a time."""

    def __init__(self, pipe, data: Path, a):
        import torch
        from accelerate import Accelerator
        from peft import LoraConfig
        self.accelerator = Accelerator(mixed_precision="no", cpu=True)
        self.vae, self.te, self.tok, self.sched = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
        torch.manual_seed(0)
        pipe.unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                         target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        self.params = [p for p in pipe.unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        self.unet, self.optimizer = self.accelerator.prepare(pipe.unet, optimizer)
        self.unet.train()
        self.files, self.a, self.n = sorted(data.glob("*.png")), a, 0

    def example(self, i):   # DreamBoothDataset.__getitem__: load, resize, crop, to tensor, tokenize
        from sdlora.training.dataset import load_image, resize_and_crop, to_tensor
        f = self.files[i % len(self.files)]
        im, _ = resize_and_crop(load_image(f), (self.a.res, self.a.res), None)
        ids = self.tok(f.with_suffix(".txt").read_text(), truncation=True, padding="max_length",
                       max_length=self.tok.model_max_length, return_tensors="pt").input_ids
        return to_tensor(im), ids[0]

    def step(self) -> None:
        import torch
        import torch.nn.functional as F
        batch = [self.example(self.n * self.a.batch + j) for j in range(self.a.batch)]
        self.n += 1
        pixel_values = torch.stack([b[0] for b in batch])
        input_ids = torch.stack([b[1] for b in batch])
        model_input = self.vae.encode(pixel_values).latent_dist.sample() * self.vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        timesteps = torch.randint(0, self.sched.config.num_train_timesteps, (bsz,), device=model_input.device).long()
        noisy = self.sched.add_noise(model_input, noise, timesteps)
        encoder_hidden_states = self.te(input_ids, attention_mask=None)[0]
        model_pred = self.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            self.accelerator.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()


# ----------------------------------------------------------------------------------------------
# contender 2: sdlora's trainer, and the worker process that runs one contender

def sdlora_trainer(pipe, data: Path, a, cache: bool, steps: int, callbacks):
    from sdlora.training import TrainConfig, Trainer
    out = Path(tempfile.mkdtemp()) / "bench.safetensors"
    cfg = TrainConfig(data_dir=str(data), output=str(out), resolution=a.res, buckets=False, batch_size=a.batch,
                      steps=steps, rank=a.rank, alpha=float(a.rank), unet_targets=["attn"], unet_lr=1e-4,
                      device="cpu", seed=0, save_precision="fp32", cache_latents="memory" if cache else "none",
                      cache_text=cache)
    t = Trainer(cfg, callbacks=callbacks, base=pipe)
    t.prepare()
    return t


def worker(a) -> None:
    """One contender: build the model, train warmup + steps, report steps/s and peak memory."""
    import torch
    torch.set_num_threads(a.threads)
    data, times = Path(a.data), []

    def tick():
        times.append((time.perf_counter(), time.process_time()))

    with PeakRSS() as mem:
        pipe = build_pipeline(a.size)
        if a.worker == "diffusers":
            loop = DiffusersLoop(pipe, data, a)
            for _ in range(a.warmup + a.steps + 1):
                loop.step()
                tick()
        else:
            class Clock:
                def on_progress(self, p):
                    tick()
            sdlora_trainer(pipe, data, a, a.worker == "sdlora", a.warmup + a.steps + 1, Clock()).run()
    timed = times[a.warmup:]
    wall = 1.0 / statistics.median(t1[0] - t0[0] for t0, t1 in zip(timed, timed[1:]))
    cpu = 1.0 / statistics.median(t1[1] - t0[1] for t0, t1 in zip(timed, timed[1:]))
    Path(a.json).write_text(json.dumps({"steps_per_s": cpu, "wall_steps_per_s": wall, "peak_bytes": mem.peak}))


# ----------------------------------------------------------------------------------------------
# driver

def _spawn(job: str, size: str, tmp: Path, a, spec) -> dict:
    out = tmp / (job.replace(":", "-").replace(" ", "_") + ".json")
    cmd = [sys.executable, __file__, "--worker", job, "--size", size, "--data", str(tmp / "data"), "--json", str(out),
           "--res", str(spec["res"]), "--steps", str(a.steps or spec["steps"]),
           "--warmup", str(a.warmup if a.warmup is not None else spec["warmup"]), "--batch", str(a.batch),
           "--rank", str(a.rank), "--threads", str(a.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{job} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def bench_size(size: str, a) -> dict:
    spec = SIZES[size]
    tmp = Path(tempfile.mkdtemp(prefix=f"sdlora-bench-{size}-"))
    make_images(tmp / "data", spec["images"], spec["res"])
    rounds = a.rounds or spec["rounds"]
    runs = {c: [] for c in CONTENDERS}
    for _ in range(rounds):              # contenders alternate within every round
        for c in CONTENDERS:
            runs[c].append(_spawn(c, size, tmp, a, spec))
    # CPU-time rates barely move between rounds (the median round is kept); wall-clock rates
    # swing with the machine's other load and are printed for information only
    best = {c: sorted(r, key=lambda x: x["steps_per_s"])[len(r) // 2] for c, r in runs.items()}
    for c in CONTENDERS:
        cpu = sorted(x["steps_per_s"] for x in runs[c])
        wall = sorted(x["wall_steps_per_s"] for x in runs[c])
        print(f"  {size:5s} {c:16s} {best[c]['steps_per_s']:7.3f} steps/CPU-s (rounds {cpu[0]:.3f}-{cpu[-1]:.3f}; "
              f"wall {wall[0]:.3f}-{wall[-1]:.3f} steps/s)   peak RSS {best[c]['peak_bytes'] / 2**20:6.0f} MiB",
              flush=True)
    d, s_, n = best["diffusers"], best["sdlora"], best["sdlora no-cache"]
    speed, mem = s_["steps_per_s"] / d["steps_per_s"], s_["peak_bytes"] / d["peak_bytes"]
    print(f"  {size}: speedup {speed:.2f} (no-cache {n['steps_per_s'] / d['steps_per_s']:.2f}), "
          f"peak memory {mem:.2f} (sdlora / diffusers, median of {rounds} rounds)", flush=True)
    return {"speedup": speed, "memory": mem}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "sd15", "both"], default="both")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=0, help="timed steps (default per size: tiny 30, sd15 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: tiny 5, sd15 1)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=0, help="runs per contender (default: tiny 3, sd15 1)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--res", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    sizes = ["tiny", "sd15"] if a.size == "both" else [a.size]
    print(f"sdlora train bench: batch {a.batch}, rank {a.rank}, {a.threads} thread(s), CPU fp32", flush=True)
    res = {s: bench_size(s, a) for s in sizes}
    last = res[sizes[-1]]          # the headline is the largest model run
    print(f"train speedup vs diffusers: {last['speedup']:.2f}")
    print(f"peak memory vs diffusers: {last['memory']:.2f}")


if __name__ == "__main__":
    main()
