"""Train the embedded tiny Stable Diffusion (sample_data/models/tiny-sd) from scratch on a CPU.

    python -m tools.make_base_model --out DIR --vae-cache VAE_DIR

(the shipped model: one run, 56 minutes on a 2-core CPU, with the VAE of sample_data/models/tiny-sd
as VAE_DIR; VAE_DIR is where the VAE is trained once and then reused: a folder without a VAE gets
one trained there. `--init-unet DIR` continues a UNet at a second stage).

The model has SD1.5's module structure at small widths, so every LoRA key it produces is a real
SD1.5 key (same block types and module names, conv proj_in), only narrower and with one resnet and
one transformer per down block (SD1.5 has two; --layers-per-block 2 gives exactly SD1.5's module
set, at 0.65x the training speed: it was tried, and after the same 25 minutes it followed prompts
far worse):
  * text encoder: CLIPTextModel, hidden 64, 2 layers, 4 heads, the real CLIP BPE vocabulary (49,408
    tokens), built by tools/text_encoder.py so that a word put in front of a prompt (a LoRA's
    trigger word) changes nothing past the prompt's second word; frozen;
  * VAE: AutoencoderKL, 3 blocks of widths (16, 32, 64) (64x64 pixels -> 16x16x4 latents), trained on
    the procedural scenes AND on broad images (colours, gradients, stripes, dots, outlines, glow,
    noise), so a style LoRA can later learn looks the scenes never show;
  * UNet: UNet2DConditionModel with SD1.5's block types, widths (32, 64, 96, 96), GroupNorm in 8
    groups (see --norm-groups), one attention head
    (4 heads trained 1.6x slower per step and were no better at 1500 steps), epsilon prediction on
    SD1.5's noise schedule, min-SNR(5) loss weighting, noise offset 0.3 (see --noise-offset), 10%
    caption dropout (for classifier-free guidance), fresh unknown words in front of half the
    captions (Prefixes), EMA weights.
UNet and VAE weights are stored in fp16, the text encoder in fp32 (see save); each component is
rounded to fp16 as soon as it is trained, so what later stages learn from is what ships. Seeded:
the same command gives the same model (up to float reduction order).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdlora.atomic import replace_dir, temp_dir, umask
from sdlora.families import CONFIG_DIR, load_config
from tools import scenes as S

TOKENIZER_DIR = CONFIG_DIR / "tokenizer"
TE_WIDTH = 64


def unet_config(layers_per_block: int = 1, heads: int = 1, norm_groups: int = 8) -> dict:
    cfg = load_config("sd1", "unet")
    # widths grow like SD1.5's (320, 640, 1280, 1280): the same resnets get a conv_shortcut, so
    # every module, and every LoRA key, is one SD1.5 has
    cfg.update(block_out_channels=[32, 64, 96, 96], layers_per_block=layers_per_block, cross_attention_dim=TE_WIDTH,
               attention_head_dim=heads, sample_size=S.SIZE // 4, norm_num_groups=norm_groups)
    return cfg


def vae_config() -> dict:
    cfg = load_config("sd1", "vae")
    cfg.update(block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=16,
               down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
               sample_size=S.SIZE)
    return cfg


def text_encoder_config() -> dict:
    cfg = load_config("sd1", "text_encoder")
    cfg.update(hidden_size=TE_WIDTH, intermediate_size=4 * TE_WIDTH, num_hidden_layers=2,
               num_attention_heads=4, projection_dim=TE_WIDTH)
    return cfg


def scheduler_config(zero_snr: bool = False) -> dict:
    """SD1.5's noise schedule; with `zero_snr` rescaled so that t=999 is pure noise (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed"), which needs v-prediction and
    trailing timesteps. diffusers' samplers read all three from the saved config."""
    cfg = load_config("sd1", "scheduler")
    if zero_snr:
        cfg.update(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    return cfg


def log(msg: str, t0=[time.time(), time.process_time()]) -> None:  # noqa: B006 (start of the run)
    wall, cpu = (time.time() - t0[0]) / 60, (time.process_time() - t0[1]) / 60
    print(f"[{wall:6.2f} min, cpu {cpu:6.2f}] {msg}", flush=True)


def round_fp16_(module: torch.nn.Module) -> torch.nn.Module:
    """Round weights to fp16 precision in place (the model ships in fp16)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())
    return module


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------
# VAE

def train_vae(images: np.ndarray, steps: int, *, batch: int, crop: int, full_steps: int, lr: float,
              gen: torch.Generator, device: str = "cpu"):
    """AutoencoderKL on uint8 images: MSE + 0.5 L1 + 1e-6 KL. Random crops (crop x crop) first,
    which teach local detail at a quarter of the cost; the last `full_steps` on whole images."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_config(vae_config()).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    data = torch.from_numpy(images)
    n = len(data)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 50)
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = to_tensor(data[idx].numpy()).to(device)
        if step < steps - full_steps:
            oy, ox = torch.randint(0, S.SIZE - crop + 1, (2,), generator=gen).tolist()
            x = x[:, :, oy:oy + crop, ox:ox + crop]
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(3)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    return round_fp16_(vae.eval().requires_grad_(False))


def finetune_decoder(vae, images: np.ndarray, steps: int, *, batch: int, lr: float, gen: torch.Generator,
                     device: str = "cpu"):
    """Fine-tune the decoder on whole images with the encoder frozen (what SD's ft-MSE VAE did): the
    latent space, and so any UNet trained on it, is unchanged, while the crop-trained decoder learns
    the image borders and flat areas it renders poorly. Latents are sampled from the posterior, so
    the decoder also copes with the slightly-off latents a UNet produces."""
    vae = vae.float().to(device).train()
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = torch.from_numpy(images)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 20)
        x = to_tensor(data[torch.randint(0, len(data), (batch,), generator=gen)].numpy()).to(device)
        if torch.rand((), generator=gen) < 0.5:
            x = x.flip(3)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step}/{steps} loss {loss.item():.4f}")
    return round_fp16_(vae.eval().requires_grad_(False))


@torch.no_grad()
def vae_mse(vae, images: np.ndarray, batch: int = 64) -> float:
    """Mean squared reconstruction error in [0, 1] pixel units (posterior mean, no sampling)."""
    errs = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i:i + batch]).to(vae.device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        errs.append(((rec - x) / 2).pow(2).mean(dim=(1, 2, 3)))
    return float(torch.cat(errs).mean().cpu())


@torch.no_grad()
def encode(vae, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    return torch.cat([vae.encode(to_tensor(images[i:i + batch]).to(vae.device)).latent_dist.mode().cpu()
                      for i in range(0, len(images), batch)])


# ---------------------------------------------------------------------------------------------
# text

def build_text_encoder(seed: int):
    """The local-attention CLIP encoder of tools.text_encoder (why: see there), rounded to fp16."""
    from tools import text_encoder as T
    cfg = {k: v for k, v in text_encoder_config().items() if k != "architectures"}
    return round_fp16_(T.build(cfg, seed).eval().requires_grad_(False))


def load_tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------
# UNet

def train_unet(latents: torch.Tensor, text_encoder, ids: torch.Tensor, caption_idx: torch.Tensor,
               empty_ids: torch.Tensor, steps: int, *, batch: int, lr: float, gen: torch.Generator,
               ema_decay: float = 0.999, dropout: float = 0.1, snr_gamma: float = 5.0, on_eval=None,
               eval_every: int = 0, layers_per_block: int = 1, heads: int = 1, norm_groups: int = 8,
               noise_offset: float = 0.1,
               init=None, train_text_encoder: bool = False, prefixes: "Prefixes | None" = None,
               focus: torch.Tensor | None = None,
               zero_snr: bool = False, device: str = "cpu", minutes: float | None = None):
    """Epsilon-prediction UNet on cached latents with min-SNR weighting and EMA. The text encoder
    runs every step on the batch's caption token `ids` (with `prefixes` spliced in; it costs ~4% of a
    step), frozen, or with `train_text_encoder` its transformer layers train with the UNet (its
    token embedding table stays at its init) and `on_eval`/the result get the trained one.
    `init`: a UNet to start from (a second stage) instead of a fresh one. `focus`: per-image latent
    weight maps (n, 1, h, w) for the loss (see shape_focus).
    `minutes`: a time budget instead of `steps` (steps 10-50 are timed, then the total is fixed and
    returned, so `steps=` that number reproduces the run). Random numbers come from the CPU
    generator `gen` whatever the device, so a run is the same on CPU and CUDA up to float order.
    Returns (unet, text_encoder or None, steps)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    unet = init.float().train().requires_grad_(True) if init is not None else \
        UNet2DConditionModel.from_config(unet_config(layers_per_block, heads, norm_groups))
    unet.to(device).set_default_attn_processor()  # SDPA: faster than the classic bmm processor with several heads (measured)
    params = list(unet.parameters())
    text_encoder.float().to(device).train(train_text_encoder).requires_grad_(train_text_encoder)
    if train_text_encoder:
        text_encoder.get_input_embeddings().requires_grad_(False)
        params += [p for p in text_encoder.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    sched = DDPMScheduler.from_config(scheduler_config(zero_snr))
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    if not snr_gamma:
        weight_t = torch.ones_like(snr)
    elif zero_snr:  # min-SNR on the v-loss's own scale (snr + 1): weight 1 where noise dominates, incl. t=999
        weight_t = torch.clamp(snr + 1, max=snr_gamma) / (snr + 1)
    else:         # min-SNR for epsilon prediction
        weight_t = torch.clamp(snr, max=snr_gamma) / snr
    weight_t = weight_t.to(device)
    latents = latents.to(device)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, foreach=True)
    n = len(latents)
    step, timer = 0, None
    while step < steps or minutes:
        if minutes and step in (10, 50):   # 10: past CUDA's first-call setup; 50: still in the warmup
            if device != "cpu":
                torch.cuda.synchronize(device)
            if step == 10:
                timer = time.perf_counter()
            else:
                per_step = (time.perf_counter() - timer) / 40
                steps, minutes = max(100, int(minutes * 60 / per_step) // 100 * 100), None
                log(f"unet: {per_step * 1000:.1f} ms/step, so {steps} steps fit the time budget")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 100)
        idx = torch.randint(0, n, (batch,), generator=gen)   # drawn on the CPU, used on the device
        x0 = latents[idx.to(device)]
        drop = torch.rand(batch, generator=gen) < dropout
        tok = ids[caption_idx[idx]]
        if prefixes is not None:
            tok = prefixes.apply(tok, gen)
        tok = torch.where(drop[:, None], empty_ids.expand(batch, -1), tok).to(device)
        with torch.set_grad_enabled(train_text_encoder):
            cond = text_encoder(tok)[0]
        noise = torch.randn(x0.shape, generator=gen)
        if noise_offset:  # see --noise-offset
            noise = noise + noise_offset * torch.randn((batch, x0.shape[1], 1, 1), generator=gen)
        noise = noise.to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen).to(device)
        xt = sched.add_noise(x0, noise, t)
        pred = unet(xt, t, cond).sample
        target = sched.get_velocity(x0, noise, t) if zero_snr else noise
        err = (pred - target).pow(2)
        if focus is not None:
            w = focus[idx].to(device)
            err = err * w / w.mean(dim=(1, 2, 3), keepdim=True)
        loss = (err.mean(dim=(1, 2, 3)) * weight_t[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
        if on_eval and eval_every and step and step % eval_every == 0:
            on_eval(*_ema_copy(unet, text_encoder if train_text_encoder else None, ema), step)
        step += 1
    unet, text_encoder = _ema_copy(unet, text_encoder if train_text_encoder else None, ema)
    return round_fp16_(unet), text_encoder and round_fp16_(text_encoder), steps


def shape_focus(images: np.ndarray, specs, weight: float) -> torch.Tensor:
    """(n, 1, 16, 16) loss weights: 1 + `weight` on the latent pixels that the shape touches, and one
    latent pixel around it. Circle, square and triangle differ only near their outline (a square's
    corners are ~3% of the picture), so under a plain mean the UNet learns colours and backgrounds
    long before it tells squares from circles; this puts the loss where shapes differ. Each map is
    normalised to mean 1 in train_unet, so an image's total weight is unchanged."""
    bg = torch.tensor([s.bg_rgb for s in specs], dtype=torch.float32)[:, :, None, None]
    px = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    shape = ((px - bg).abs().amax(dim=1, keepdim=True) > 24).float()
    near = F.max_pool2d(F.max_pool2d(shape, S.SIZE // 16), 3, stride=1, padding=1)
    return 1 + weight * near


def _ema_copy(unet, text_encoder, ema):
    """Fresh (unet, text_encoder or None) holding the EMA weights, in eval mode."""
    import copy
    from diffusers import UNet2DConditionModel
    out = UNet2DConditionModel.from_config(unet.config).to(unet.device)
    te = copy.deepcopy(text_encoder) if text_encoder is not None else None
    trained = list(out.parameters()) + ([p for p in te.parameters() if p.requires_grad] if te is not None else [])
    with torch.no_grad():
        for p, e in zip(trained, ema):
            p.copy_(e)
    if te is not None:
        te.eval().requires_grad_(False)
    return out.eval().requires_grad_(False), te


# ---------------------------------------------------------------------------------------------
# assembling and writing the folder

def assemble(vae, text_encoder, unet, scaling_factor: float, zero_snr: bool = False):
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    vae.register_to_config(scaling_factor=scaling_factor)
    unet.set_default_attn_processor()
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=load_tokenizer(), unet=unet,
                                   # PNDM (SD1.5's default) cannot rescale to zero SNR; DDIM can, as SD2-v ships
                                   scheduler=(DDIMScheduler if zero_snr else PNDMScheduler).from_config(
                                       scheduler_config(zero_snr)),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save(pipe, out: Path, card: str) -> None:
    """Write the pipeline folder atomically (a temp folder renamed into place): UNet and VAE in fp16,
    the text encoder in fp32, tokenizer as the small vocab.json/merges.txt pair it was loaded from.
    Why the text encoder is fp32: diffusers loads fp16-stored models as fp32 when no dtype is given,
    but transformers 5 keeps the stored dtype, so an all-fp16 folder loads with mixed dtypes and
    plain `StableDiffusionPipeline.from_pretrained(path)` fails on its first call. The values are
    the fp16-rounded ones either way (round_fp16_)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, out.name)    # umask modes (mkdtemp: 0700, and save_file's files 0600)
    try:
        pipe.to(torch.float16)
        pipe.text_encoder.to(torch.float32)
        pipe.save_pretrained(tmp, safe_serialization=True)
        pipe.to(torch.float32)
        shutil.rmtree(tmp / "tokenizer")
        shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
        (tmp / "README.md").write_text(card)
        mode = umask()
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o666 & ~mode)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def made_up_word(rng: np.random.Generator) -> str:
    """A word no caption uses, spelled like the trigger words people give LoRAs (zqx, neonstyle)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    word = "".join(rng.choice(list(letters), size=int(rng.integers(3, 8))))
    return word + ("style" if rng.random() < 0.3 else "")


class Prefixes:
    """Unknown words put in front of training captions, fresh ones every step, as a LoRA's trigger
    word ("toonstyle, a red circle") or a user's habits ("masterpiece, ...") put them in front of a
    prompt. The local text encoder keeps the caption's later tokens as they were; these teach the
    UNet to ignore the new tokens in front. A pool of `n` prefixes: 1-3 words, each made up (half)
    or a random word of the CLIP vocabulary that no caption uses, then ", " (70%) or " "."""

    def __init__(self, tokenizer, rng: np.random.Generator, fraction: float, n: int = 20000):
        self.fraction = fraction
        used = S.caption_words()
        vocab = [t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>") and t[:-4].isalpha()]
        vocab = sorted(w for w in vocab if w not in used)
        texts = []
        for _ in range(n):
            words = [made_up_word(rng) if rng.random() < 0.5 else str(rng.choice(vocab))
                     for _ in range(int(rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1])))]
            texts.append(" ".join(words) + (", " if rng.random() < 0.7 else " "))
        self.texts = texts
        self.ids = [x[1:-1] for x in tokenizer(texts).input_ids]   # without start and end tokens

    def apply(self, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Token ids (batch, 77) with a prefix spliced in after the start token of `fraction` of rows
        (the padding at the end makes room)."""
        out = ids.clone()
        picks = torch.rand(len(ids), generator=gen) < self.fraction
        which = torch.randint(0, len(self.ids), (len(ids),), generator=gen)
        for row in torch.nonzero(picks).flatten().tolist():
            p = torch.tensor(self.ids[int(which[row])], dtype=ids.dtype)
            out[row, 1:] = torch.cat([p, ids[row, 1:len(ids[row]) - len(p)]])
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="pipeline folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1, ...); data and "
                   "random numbers stay on the CPU, so the result does not depend on it beyond float order")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--scenes", type=int, default=16000, help="captioned scenes for the UNet (and VAE)")
    p.add_argument("--broad", type=int, default=6000, help="broad images for the VAE")
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--unet-steps", type=int, default=9000,
                   help="9000 for the shipped model (5000 on the same recipe: lumpier circles, see the README)")
    p.add_argument("--unet-minutes", type=float, default=None,
                   help="train the UNet for about this long instead of --unet-steps (the steps it chose are logged "
                        "and written to the model card; --unet-steps with that number repeats the run)")
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--layers-per-block", type=int, default=1, help="UNet resnets per down block (SD1.5: 2)")
    p.add_argument("--norm-groups", type=int, default=8,
                   help="GroupNorm groups in the UNet (SD1.5: 32, over 320+ channels; at width 32 that would be one "
                        "channel per group, which erases the timestep the resnets add per channel)")
    p.add_argument("--heads", type=int, default=1, help="attention heads (SD1.5: 8; diffusers calls it attention_head_dim)")
    p.add_argument("--zero-snr", action="store_true",
                   help="zero-terminal-SNR schedule with v-prediction (the principled fix for the leak that "
                        "--noise-offset works around; use with --noise-offset 0)")
    p.add_argument("--noise-offset", type=float, default=0.3,
                   help="per-channel constant noise added in training. The scenes are mostly flat background, and "
                        "SD1.5's schedule leaves 6.8%% of the image in the noise at t=999: the UNet reads the "
                        "background from that leak and, when sampling from pure noise, from the seed instead of "
                        "the prompt. The per-channel mean of 16x16 latent noise has std 1/16, 4x that of SD's 64x64, "
                        "so the 0.1 usual for SD corresponds to about 0.4 here")
    p.add_argument("--snr-gamma", type=float, default=5.0,
                   help="min-SNR loss weighting's gamma (0: none, every timestep weighted alike in epsilon)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="fraction of training captions replaced by the empty prompt (the unconditional branch of CFG)")
    p.add_argument("--shape-weight", type=float, default=0.0,
                   help="extra loss weight on the latent pixels around each scene's shape (see shape_focus)")
    p.add_argument("--prefix-words", type=float, default=0.5,
                   help="fraction of training captions that get unknown words in front, fresh each step (see Prefixes)")
    p.add_argument("--train-text-encoder", action="store_true",
                   help="train the text encoder's transformer layers with the UNet (token embeddings stay at their "
                        "seeded init); without it the encoder stays frozen at its random init")
    p.add_argument("--init-unet", type=Path, default=None,
                   help="a pipeline folder whose UNet this run continues (a second stage; its architecture wins)")
    p.add_argument("--eval-every", type=int, default=500, help="quick prompt-following check (0: off)")
    p.add_argument("--snapshots", action="store_true", help="also write the pipeline at each eval (OUT-stepN)")
    p.add_argument("--decoder-steps", type=int, default=0,
                   help="then fine-tune the VAE decoder on whole images, encoder frozen (latents unchanged)")
    p.add_argument("--vae-cache", type=Path, default=None,
                   help="load the VAE from this folder if it exists, else save the trained VAE there")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (minutes), not a usable model")
    a = p.parse_args(argv)
    widths = unet_config()["block_out_channels"]
    if a.norm_groups < 1 or any(w % a.norm_groups for w in widths):
        p.error(f"--norm-groups must divide every UNet width {widths}, got {a.norm_groups} (try 8)")
    if a.quick:
        a.scenes, a.broad, a.vae_steps, a.unet_steps, a.eval_every = 512, 256, 20, 30, 15
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    # one generator per stage, so a run that loads its VAE from --vae-cache trains the same UNet
    gen_vae, gen_unet = torch.Generator().manual_seed(a.seed), torch.Generator().manual_seed(a.seed + 1)
    rng = np.random.default_rng(a.seed)
    t_start, cpu_start = time.time(), time.process_time()

    images, specs = S.scenes(rng, a.scenes)
    broad = S.broad_images(rng, a.broad)
    n_vae_scenes = min(len(images), len(broad))
    log(f"data: {len(images)} scenes, {len(broad)} broad images")

    if a.init_unet and not a.vae_cache:
        a.vae_cache = a.init_unet / "vae"   # a second stage keeps the first stage's VAE
    vae_cached = bool(a.vae_cache and (a.vae_cache / "config.json").is_file())
    if vae_cached:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(a.vae_cache).float().to(a.device).eval().requires_grad_(False)
        log(f"vae loaded from {a.vae_cache}")
    else:
        vae = train_vae(np.concatenate([images[:n_vae_scenes], broad]), a.vae_steps, batch=a.vae_batch,
                        crop=32, full_steps=a.vae_steps // 10, lr=2e-3, gen=gen_vae, device=a.device)
    if a.decoder_steps:
        vae = finetune_decoder(vae, np.concatenate([images[:n_vae_scenes], broad]), a.decoder_steps,
                               batch=a.vae_batch, lr=5e-4, gen=gen_vae, device=a.device)
    if a.vae_cache and not vae_cached:
        vae.save_pretrained(a.vae_cache)
    val_rng = np.random.default_rng(a.seed + 1)
    val_scenes, _ = S.scenes(val_rng, 256)
    errors = {"scenes": vae_mse(vae, val_scenes), "broad": vae_mse(vae, S.broad_images(val_rng, 256))}
    log(f"vae reconstruction MSE on held-out images: {errors}")

    latents = encode(vae, images)
    scaling = float(1.0 / latents.std())
    latents = latents * scaling
    log(f"latents {tuple(latents.shape)}, scaling_factor {scaling:.4f}")

    text_encoder, tokenizer = build_text_encoder(a.seed).to(a.device), load_tokenizer()
    if a.init_unet:   # a second stage also continues the first one's text encoder (trained or not)
        from transformers import CLIPTextModel
        text_encoder = CLIPTextModel.from_pretrained(a.init_unet / "text_encoder").float().to(a.device).eval()
        text_encoder.requires_grad_(False)
    scene_captions = [s.caption for s in specs]
    captions = sorted(set(scene_captions))
    index = {c: i for i, c in enumerate(captions)}
    caption_idx = torch.tensor([index[c] for c in scene_captions])
    prefixes = Prefixes(tokenizer, np.random.default_rng(a.seed + 2), a.prefix_words) if a.prefix_words else None
    log(f"{len(captions)} distinct captions")

    from tools.eval_base_model import evaluate

    def on_eval(unet, te, step):
        pipe = assemble(vae, te or text_encoder, unet, scaling, a.zero_snr)
        if a.snapshots:
            save(pipe, a.out.with_name(f"{a.out.name}-step{step}"), f"# snapshot at UNet step {step}\n")
        r, z = evaluate(pipe, seeds=2, log=None), evaluate(pipe, seeds=2, log=None, prefix="zqx, ")
        log(f"eval at step {step}: colour {r['colour']:.2f} shape {r['shape']:.2f} background {r['background']:.2f} "
            f"flat {r['flat']:.2f}; after 'zqx, ' colour {z['colour']:.2f} shape {z['shape']:.2f} "
            f"(held-out pairs, 2 seeds)")

    init = None
    if a.init_unet:
        from diffusers import UNet2DConditionModel
        init = UNet2DConditionModel.from_pretrained(a.init_unet / "unet")
        log(f"unet continues from {a.init_unet}")
    unet, trained_te, a.unet_steps = train_unet(latents, text_encoder, token_ids(tokenizer, captions), caption_idx,
                                  token_ids(tokenizer, [""]), a.unet_steps, batch=a.unet_batch,
                                  lr=a.unet_lr, device=a.device, minutes=a.unet_minutes,
                                  init=init, gen=gen_unet, on_eval=on_eval, eval_every=a.eval_every,
                                  layers_per_block=a.layers_per_block, heads=a.heads, norm_groups=a.norm_groups,
                                  noise_offset=a.noise_offset,
                                  zero_snr=a.zero_snr, train_text_encoder=a.train_text_encoder,
                                  prefixes=prefixes, snr_gamma=a.snr_gamma, dropout=a.caption_dropout,
                                  focus=shape_focus(images, specs, a.shape_weight) if a.shape_weight else None)
    text_encoder = trained_te or text_encoder
    minutes, cpu_minutes = (time.time() - t_start) / 60, (time.process_time() - cpu_start) / 60
    pipe = assemble(vae, text_encoder, unet, scaling, a.zero_snr)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                if k not in ("out", "vae_cache", "unet_minutes")}
    origin = f"its UNet continued from {a.init_unet}" if a.init_unet else "trained from scratch"
    card = (f"# tiny-sd\n\nThe embedded base model of sdlora: SD1.5's module structure at small widths, "
            f"{origin} on procedural scenes by\n`python -m tools.make_base_model "
            f"--out DIR --seed {a.seed}` ({minutes:.1f} minutes wall, {cpu_minutes:.1f} minutes CPU, "
            f"{a.threads} thread{'s' if a.threads > 1 else ''}{', VAE from cache' if vae_cached else ''}).\n\n"
            f"```json\n{json.dumps(dict(settings, vae_mse=errors, scaling_factor=scaling), indent=1)}\n```\n")
    save(pipe, a.out, card)
    log(f"wrote {a.out}: {minutes:.1f} minutes wall, {cpu_minutes:.1f} minutes CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
