"""The training loop: folder -> dataset -> cached latents/embeddings -> LoRA -> accelerate loop -> file.

    from sdlora.training import TrainConfig, train
    result = train(TrainConfig(data_dir="imgs", output="style.safetensors", base="path/to/model"))

or, to show the plan before the heavy work (what the CLI does):

    trainer = Trainer(cfg, callbacks=..., control=...)
    plan = trainer.prepare()          # scan, load the base model, buckets, steps (and class images)
    print(plan.describe())
    result = trainer.run()            # -> TrainResult(status, output, step, loss, checkpoint, metadata)

Callbacks and commands: see `sdlora.training.control`. Runs the same under `accelerate launch`
(DDP over several processes: each takes every n-th batch, gradients are averaged, only the main
process writes files and calls callbacks).

Reproducibility: the data order and every augmentation are functions of (seed, epoch, position);
noise, timesteps and the global torch RNG (LoRA dropout) are re-seeded from (seed, micro-batch,
process) before each micro-batch. So a run resumed from a checkpoint computes exactly what the
uninterrupted run did (bit-identical on CPU; GPU kernels may add last-bit noise).
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from sdlora.errors import FamilyMismatchError, SdloraError
from sdlora.atomic import atomic_save_file, temp_file
from sdlora.network import LoRANetwork, NetworkSpec
from sdlora.training import checkpoint as ckpt
from sdlora.training import dataset as ds
from sdlora.training import loss as L
from sdlora.pipelines import BaseModel, as_base, load_base
from sdlora.precisions import torch_dtype
from sdlora.quant import quantize_pipeline
from sdlora.training.cache import EmbeddingCache, LatentCache, VaeEncoder, prepare_pixels
from sdlora.training.conditioning import count_truncated, encode_captions, sdxl_time_ids
from sdlora.training.config import TrainConfig, absolute_paths, base_lora_spec, option_names
from sdlora.training.control import CallbackList, Progress, TrainingControl
from sdlora.training.metadata import addnet_hashes, build_metadata
from sdlora.training.optim import build_optimizer, build_scheduler
from sdlora.training.plan import Plan, make_plan
from sdlora.training.sampling import ensure_class_images, generate, write_png


class TrainingError(SdloraError):
    """Training had to stop (NaN loss, ...); the message says what to do."""


@dataclass
class TrainResult:
    status: str                     # "done" | "stopped" | "interrupted"
    output: Path | None             # the LoRA file (None when interrupted)
    step: int
    total_steps: int
    loss: float | None              # smoothed loss at the end
    checkpoint: Path | None         # the newest checkpoint written
    metadata: dict = field(default_factory=dict)


@dataclass
class MicroInputs:
    """One micro-batch, ready for the model (`noisy`, `timesteps`, `kw`) and the loss."""
    noisy: torch.Tensor
    timesteps: torch.Tensor
    kw: dict                        # context/pooled (cached embeddings) or captions; SDXL time_ids
    latents: torch.Tensor
    noise: torch.Tensor
    weights: torch.Tensor           # per sample (prior-loss weight of class images)
    uncond_kw: dict | None = None   # the same samples with the empty prompt (uncond_preservation)


def check_output(path: str) -> Path:
    """Fail before any work when the LoRA cannot be written there."""
    if not path:
        raise SdloraError("no output file: pass --out NAME.safetensors")
    out = Path(path)
    if out.suffix.lower() != ".safetensors":
        raise SdloraError(f"--out {path}: the LoRA is written as .safetensors; name it e.g. {out.stem}.safetensors")
    if out.is_dir():
        raise SdloraError(f"--out {path} is a folder; give a file name like {out / 'style.safetensors'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temp_file(out.parent, out.name).unlink()      # can a file be created there?
    except OSError as e:
        raise SdloraError(f"cannot write the LoRA to {out}: {e.strerror or e}; pick another --out") from None
    return out


def check_base_loras(specs: list[str]) -> list[tuple[Path, float, str]]:
    """(file, weight, addnet hash) of each --base-lora PATH[:WEIGHT], or one clear error (before any
    model loads). The hash is the addnet one (sshs_model_hash) for .safetensors, else the sha256."""
    from sdlora.formats.container import read_header
    from sdlora.hashes import addnet_hash, file_sha256
    out = []
    for spec in specs:
        path, weight = base_lora_spec(spec)
        p = Path(path).expanduser()
        try:
            read_header(p)
        except (OSError, SdloraError) as e:
            raise SdloraError(f"--base-lora {spec!r}: {e}; expected an existing LoRA file as PATH or "
                              "PATH:WEIGHT") from None
        out.append((p, weight, addnet_hash(p) if p.suffix.lower() == ".safetensors" else file_sha256(p)))
    return out


def make_accelerator(mixed_precision: str, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs
    AcceleratorState._reset_state()      # allow several trainings with other settings in one process
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def _mix(*parts) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def sdpa_processor():
    """diffusers' AttnProcessor2_0 (torch SDPA) with its call signature computed once: diffusers'
    Attention.forward runs inspect.signature(processor.__call__) on every call (~0.3 ms each,
    ~3% of a small model's training step)."""
    import inspect
    from diffusers.models.attention_processor import AttnProcessor2_0

    class SDPAProcessor(AttnProcessor2_0):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    SDPAProcessor.__call__.__signature__ = inspect.signature(AttnProcessor2_0.__call__)
    return SDPAProcessor()


class DenoiserStep(nn.Module):
    """What DDP wraps: conditioning (when the text encoders are trained) + UNet, with the LoRA
    network as a submodule so its gradients are synchronised."""

    def __init__(self, unet, network: LoRANetwork, text_encoders: list, encode):
        super().__init__()
        self.unet = unet
        self.network = network
        self.text_encoders = nn.ModuleList(text_encoders)
        self._encode = encode

    def forward(self, noisy, timesteps, context=None, pooled=None, captions=None, time_ids=None):
        if context is None:
            context, pooled = self._encode(captions)
        added = {"text_embeds": pooled, "time_ids": time_ids} if time_ids is not None else None
        return self.unet(noisy, timesteps, context, added_cond_kwargs=added).sample


class Trainer:
    def __init__(self, cfg: TrainConfig, callbacks=None, control: TrainingControl | None = None, base=None,
                 on_micro_batch=None):
        self.cfg = cfg.validate()
        # on_micro_batch(epoch, samples): called on every process for each micro-batch it trains on,
        # before the forward pass (the data order is observable without patching the trainer)
        self.on_micro_batch = on_micro_batch
        self.cb = CallbackList(callbacks)
        self.control = control or TrainingControl()
        self._base_arg = base          # a BaseModel or a diffusers pipeline (tests, the UI)
        self.stack_network = False     # hook on top of other jobs' networks (training.multi)
        # The state, declared here and filled stage by stage; a later stage reads only what an
        # earlier one filled (prepare() -> run(): _setup -> _start -> the step loop -> _finish).
        # prepare(): the output, the accelerator, the base model on it, the data and the plan
        self._created: list[Path] = []           # folders made for the output (removed on failure)
        self.out: Path | None = None
        self.name = ""
        self.ckpt_dir: Path | None = None
        self.accel = None                        # accelerate.Accelerator
        self.weight_dtype = torch.float32
        self.resume_from: Path | None = None
        self.base_loras: list = []
        self.base: BaseModel | None = None
        self.base_precision = ""
        self.prediction_type = ""
        self.noise_scheduler = None
        self.resolution = 0
        self.items: list = []
        self.plan: Plan | None = None
        # _setup(): the network, text encoding, caches, optimizer (self.model is the prepared DenoiserStep)
        self.family = ""
        self.network: LoRANetwork | None = None
        self.encode = None
        self.cache_text = False
        self.vae_encoder: VaeEncoder | None = None
        self.latents: LatentCache | None = None
        self.embeddings: EmbeddingCache | None = None
        self.offloaded: list = []                # models moved off the accelerator while training
        self.model = self.optimizer = self.lr_scheduler = None
        self.optimizer_desc = ""
        self.params: list = []
        # _start() and the loop: position, losses, the last outputs
        self.step = self.start_step = self.epoch = 0
        self._epoch: int | None = None           # the epoch whose batches _epoch_batches holds
        self._epoch_batches: list = []
        self.t0 = 0.0
        self.smoothed: float | None = None
        self.losses: list = []
        self.last_sample = None
        self.last_checkpoint: Path | None = None

    # ------------------------------------------------------------------------------------------
    # messages

    @property
    def main(self) -> bool:
        return self.accel.is_main_process

    def _status(self, status: str, message: str = "") -> None:
        if self.main:
            self.cb.on_status(status, message)

    def _warn(self, message: str) -> None:
        if self.main:
            warnings.warn(message, stacklevel=2)
            self.cb.on_warning(message)

    # ------------------------------------------------------------------------------------------
    # preparation

    def prepare(self) -> Plan:
        # folders this run creates for its output are removed again if it fails before writing there
        parent = Path(self.cfg.output).parent
        self._created = [p for p in (parent, *parent.parents) if not p.exists()]
        try:
            return self._prepare()
        except BaseException:
            self._remove_created()
            raise

    def _remove_created(self) -> None:
        for d in self._created:      # deepest first; stops at the first that is not empty
            try:
                d.rmdir()
            except OSError:
                break

    def _prepare(self) -> Plan:
        self.out = check_output(self.cfg.output)
        self.name = self.out.stem
        # the resolved config (absolute paths, the checkpoint folder named) is what checkpoints store
        ckpt_dir = self.cfg.checkpoint_dir or str(Path("checkpoints") / self.name)
        cfg = self.cfg = absolute_paths(self.cfg.replace(checkpoint_dir=ckpt_dir))
        self.ckpt_dir = Path(cfg.checkpoint_dir)
        cuda = torch.cuda.is_available()
        if cfg.device == "cuda" and not cuda:
            raise SdloraError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
        cpu = cfg.device == "cpu" or not cuda
        mp = cfg.mixed_precision
        if cpu and mp == "fp16":
            warnings.warn("fp16 mixed precision needs a GPU; training in fp32 on the CPU (bf16 works on CPUs)")
            mp = "no"
        self.accel = make_accelerator(mp, cpu)
        self.weight_dtype = torch_dtype(mp)
        if self.main:
            ckpt.recover(self.ckpt_dir)         # leftovers of a killed checkpoint write
        self.accel.wait_for_everyone()
        self.resume_from = ckpt.find_checkpoint(cfg.resume) if cfg.resume else None
        self.base_loras = check_base_loras(cfg.base_lora)     # before the model loads, like the folder

        # the folder first: a wrong path should not wait for a model to load
        self._status("scanning", f"reading {cfg.data_dir}")
        min_size = cfg.min_image_size or cfg.resolution // 4     # resolution 0: known once the base is loaded
        train_scan = ds.scan(cfg.data_dir, trigger=cfg.trigger, class_word=cfg.class_word,
                             caption_extensions=cfg.caption_extensions, repeats=cfg.repeats, min_image_size=min_size)

        self._status("loading", f"base model {cfg.base or '(embedded)'}")
        self.base = self._load_base()
        self._place_models()
        self._apply_base_loras()

        granularity = self._latent_granularity()
        native = self._native_resolution()
        res_note = f"{cfg.resolution or native} px" + ("" if cfg.resolution else " (the base model's native size)")
        if not cfg.resolution:
            cfg = self.cfg = cfg.replace(resolution=native)
            min_size = cfg.min_image_size or native // 4
            train_scan = ds.scan(cfg.data_dir, trigger=cfg.trigger, class_word=cfg.class_word,
                                 caption_extensions=cfg.caption_extensions, repeats=cfg.repeats,
                                 min_image_size=min_size)
        res = max(granularity, cfg.resolution // granularity * granularity)
        step = max(granularity, math.ceil(cfg.bucket_step / granularity) * granularity)
        if step > res:                      # tiny resolutions: finer steps than kohya's 64
            step = granularity
        if res != cfg.resolution:
            self._warn(f"resolution {cfg.resolution} is not a multiple of {granularity} (what this model's latents "
                       f"need); training at {res}")
        self.resolution = res
        min_reso = cfg.min_bucket_reso or res // 2
        max_reso = cfg.max_bucket_reso or res * 2
        buckets = ds.make_buckets(res, step, min_reso, max_reso) if cfg.buckets else [(res, res)]

        scans = [train_scan]
        if cfg.prior_preservation:
            scans.append(self._class_images(min_size))
        items = [it for s in scans for it in s.items]
        skipped = [x for s in scans for x in s.skipped]
        if skipped:
            self._warn(f"skipped {len(skipped)} image(s): " + ds.skip_list(skipped, limit=50))
        counts = ds.assign_buckets(items, buckets)
        self.items = items
        captions = [it.caption for it in items]
        sources = Counter(it.caption_source for it in items if not it.is_reg)
        plan = make_plan(folders=[f for s in scans for f in s.folders], items=items, skipped=skipped,
                         buckets=counts, min_reso=min_reso if cfg.buckets else res,
                         max_reso=max_reso if cfg.buckets else res, cfg=cfg,
                         num_processes=self.accel.num_processes,
                         batches_per_epoch=len(ds.epoch_batches(items, cfg.batch_size, cfg.seed, 0,
                                                                self.accel.num_processes)),
                         tag_frequency=ds.tag_frequency(items), captions_by_source=sources,
                         truncated=count_truncated(self.base.tokenizers[0], captions))
        plan.resolution = res_note
        self.plan = plan
        if self.main:
            self.cb.on_plan(plan)
        return plan

    def _load_base(self) -> BaseModel:
        b = self._base_arg
        if b is None:
            return load_base(self.cfg.base, family=self.cfg.family)
        return as_base(b, self.cfg.family)

    def _place_models(self) -> None:
        pipe, dev, dt = self.base.pipe, self.accel.device, self.weight_dtype
        pipe.unet.set_attn_processor(sdpa_processor())        # SDPA (torch's fused attention)
        # the frozen base is stored first, where it was loaded: a quantized base never needs its
        # full-precision copy on the accelerator (the dtype cast below leaves stored weights alone)
        self.base_precision = quantize_pipeline(pipe, self.cfg.base_precision, dt)
        for comp in ["unet", "vae", *self.base.text_encoders]:
            m = getattr(pipe, comp).to(dev)
            if m.dtype != dt:        # (diffusers warns on any dtype cast, even a no-op one)
                m.to(dtype=dt)
            m.requires_grad_(False).eval()
        self.prediction_type = (self.base.prediction_type if self.cfg.prediction_type == "auto"
                                else self.cfg.prediction_type)
        from diffusers import DDPMScheduler
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def _apply_base_loras(self) -> None:
        """The --base-lora mix applied to the frozen base (patched weights; routed hooks on a
        quantized base); the new LoRA trains on top. It stays applied after training."""
        if not self.base_loras:
            return
        from sdlora.mixing import MixEntry
        from sdlora.routing import set_active
        mix = [MixEntry(str(p), unet=w, text_encoder=w) for p, w, _ in self.base_loras]
        how = set_active(self.base.pipe, mix)
        self._status("loading", f"base LoRA(s) {', '.join(f'{p.name}:{w:g}' for p, w, _ in self.base_loras)} "
                                f"{how} into the base")

    def _base_lora_metadata(self) -> dict:
        """The stack in kohya's argument spelling (kohya itself writes no such keys) + addnet hashes."""
        if not self.base_loras:
            return {}
        import json
        return {"ss_base_weights": json.dumps([p.name for p, _, _ in self.base_loras]),
                "ss_base_weights_multiplier": json.dumps([w for _, w, _ in self.base_loras]),
                "ss_base_weights_hashes": json.dumps([h for _, _, h in self.base_loras])}

    def _native_resolution(self) -> int:
        """The size the base was trained at: UNet sample size x VAE downscale (SD1 512, SD2-v 768, SDXL 1024)."""
        pipe = self.base.pipe
        return pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def _latent_granularity(self) -> int:
        """Pixel multiple the model needs: VAE downscale x UNet downsamplings."""
        pipe = self.base.pipe
        vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        downs = sum(1 for b in pipe.unet.config.down_block_types) - 1
        return vae_factor * 2 ** downs

    def _class_images(self, min_size: int) -> ds.ScanResult:
        cfg = self.cfg
        folder = Path(cfg.class_data_dir) if cfg.class_data_dir else self.out.with_name(self.name + "-class-images")
        prompt = cfg.class_prompt or cfg.class_word
        from sdlora.training.sampling import count_images
        missing = cfg.num_class_images - count_images(folder)
        if missing > 0:
            self._status("generating", f"{missing} class image(s) of {prompt!r} into {folder}")
            if self.main:
                ensure_class_images(self.base.pipe, folder, prompt, cfg.num_class_images, seed=cfg.seed,
                                    steps=cfg.sample_steps, cfg=cfg.sample_cfg, size=self.resolution,
                                    autocast=self.accel.autocast)
            self.accel.wait_for_everyone()
        scan = ds.scan(folder, trigger="", class_word=prompt, caption_extensions=cfg.caption_extensions,
                       repeats=1, min_image_size=min_size, is_reg=True)
        for it in scan.items:       # class images teach the class prompt, whatever their file names
            if it.caption_source != "file":
                it.caption = prompt
        return scan

    # ------------------------------------------------------------------------------------------
    # the run

    def run(self) -> TrainResult:
        if self.plan is None:
            self.prepare()
        try:
            return self._run()
        except BaseException as e:
            if isinstance(e, Exception):
                self._status("failed", str(e) if isinstance(e, SdloraError) else f"{type(e).__name__}: {e}")
            self._remove_created()
            raise
        finally:
            if self.offloaded:
                self._offload(False)        # hand the pipeline back whole (the UI generates with it)

    def _setup(self) -> None:
        cfg, pipe = self.cfg, self.base.pipe
        self.family = self.base.family
        torch.manual_seed(cfg.seed)          # LoRA init (DDP also broadcasts rank 0's weights)
        spec = NetworkSpec(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, unet_groups=tuple(cfg.unet_targets),
                           text_groups=tuple(cfg.text_targets) if cfg.train_text_encoder else (),
                           conv_rank=cfg.conv_rank or None, conv_alpha=cfg.conv_alpha)
        comps = {"unet": pipe.unet, **self.base.text_encoders}
        self.network = LoRANetwork.inject(comps, spec, stack=self.stack_network)
        self.network.to(self.accel.device)
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for te in self.base.text_encoders.values():
                    te.gradient_checkpointing_enable()
        tes = list(self.base.text_encoders.values())
        self.encode = partial(encode_captions, self.family, self.base.tokenizers, tes, clip_skip=cfg.clip_skip)
        self.cache_text = cfg.cache_text and not cfg.train_text_encoder and not cfg.shuffle_caption
        self.vae_encoder = VaeEncoder(pipe.vae, warn=self._warn)
        self._fill_caches()
        # what the loop no longer needs leaves the accelerator (kohya does the same); sampling
        # brings it back for a moment
        self.offloaded = [m for m, idle in ((pipe.vae, self.latents is not None),
                                            *((te, self.embeddings is not None) for te in tes)) if idle]
        self._offload(True)
        step_model = DenoiserStep(pipe.unet, self.network, tes if cfg.train_text_encoder else [], self.encode)
        step_model.train()
        for te in tes:
            te.train(cfg.train_text_encoder)
        groups = self.network.parameter_groups(cfg.unet_lr, cfg.text_encoder_lr)
        opt, self.optimizer_desc = build_optimizer(cfg.optimizer, groups, cfg, warn=self._warn)
        self.model, self.optimizer = self.accel.prepare(step_model, opt)
        self.params = list(self.network.parameters())
        self.lr_scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps,
                                            self.plan.total_steps)

    def _offload(self, away: bool) -> None:
        if self.accel.device.type != "cpu":
            for m in self.offloaded:
                m.to("cpu" if away else self.accel.device)

    def _fill_caches(self) -> None:
        cfg = self.cfg
        self.latents = None
        if cfg.cache_latents != "none":
            flips = (False, True) if cfg.random_flip else (False,)
            keys = [(i, f) for i in range(len(self.items)) for f in flips]
            cache_dir = None
            if cfg.cache_latents == "disk":
                cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out.with_name(self.name + "-cache")
            self._status("caching", f"encoding {len(keys)} latent(s)")
            self.latents = LatentCache(cache_dir)
            vae = self.base.pipe.vae       # config + a weight fingerprint: another VAE never reuses a cache
            fp = hashlib.sha1(str(sorted(vae.config.items())).encode())
            for t in (vae.encoder.conv_in.weight, vae.quant_conv.weight if vae.quant_conv is not None else None):
                if t is not None:
                    fp.update(t.detach().float().cpu().numpy().tobytes())
            vae_id = fp.hexdigest()[:16]
            self.latents.fill(self.items, keys, self.vae_encoder, self.cfg.seed, cfg.vae_batch_size, vae_id)
        self.embeddings = None
        if self.cache_text:
            empty = cfg.caption_dropout or cfg.uncond_preservation
            captions = {it.caption for it in self.items} | ({""} if empty else set())
            self._status("caching", f"encoding {len(captions)} caption(s)")
            self.embeddings = EmbeddingCache(self.encode)
            self.embeddings.fill(captions)

    def _run(self) -> TrainResult:
        started = self._start()
        status = "done"
        try:
            while self.step < self.plan.total_steps:
                if self._after_step(self._optimizer_step(), self._commands):
                    status = "stopped"
                    break
        except KeyboardInterrupt:
            return self._interrupted()
        return self._finish(status, started)

    def _start(self) -> float:
        """Set up the network, optimizer and caches, resume; the start time (for the metadata)."""
        self._setup()
        started = time.time()
        self.step, self.smoothed, self.losses, self.last_sample = 0, None, [], None
        self.start_step = self._resume() if self.resume_from else 0
        self.step = self.start_step
        self._status("training", f"{self.plan.total_steps - self.start_step} step(s) to go")
        self.t0 = time.time()
        return started

    def _after_step(self, loss: float, commands) -> bool:
        """Count the step, report it, obey the commands (`commands()` -> (stop, save, sample)),
        sample and checkpoint when due; True when the run is to stop."""
        cfg = self.cfg
        self.step += 1
        self._report(loss, self.t0, self.start_step)
        stop, save, sample = commands()
        if (cfg.sample_every and self.step % cfg.sample_every == 0) or sample:
            self._sample()
        if stop:
            return True
        if ((cfg.save_every and self.step % cfg.save_every == 0) or save) and self.step < self.plan.total_steps:
            self._save_checkpoint()
        return False

    def _interrupted(self) -> TrainResult:
        self.optimizer.zero_grad(set_to_none=True)
        self._status("interrupted", f"Ctrl-C at step {self.step}: saving a checkpoint")
        self._save_checkpoint()
        self._status("interrupted", f"checkpoint {self.last_checkpoint}")
        return TrainResult("interrupted", None, self.step, self.plan.total_steps, self.smoothed, self.last_checkpoint)

    def _finish(self, status: str, started: float) -> TrainResult:
        self._save_checkpoint()
        self._status("saving", str(self.out))
        md = self._save_output(started)
        if self.cfg.preview:
            self._save_preview()
        self.accel.wait_for_everyone()
        self._status(status, f"{self.out} after {self.step} step(s)")
        return TrainResult(status, self.out, self.step, self.plan.total_steps, self.smoothed, self.last_checkpoint, md)

    # ------------------------------------------------------------------------------------------
    # one step

    def _batch(self, epoch: int) -> list:
        if self._epoch != epoch:
            world, rank = self.accel.num_processes, self.accel.process_index
            self._epoch_batches = ds.epoch_batches(self.items, self.cfg.batch_size, self.cfg.seed, epoch, world)[rank::world]
            self._epoch = epoch
        return self._epoch_batches

    def _micro_at(self, j: int) -> tuple[list, int, int]:
        """(batch, epoch, micro-batch number) of the j-th micro-batch of the current step."""
        m = self.step * self.cfg.grad_accum + j
        epoch, idx = divmod(m, self.plan.micro_batches_per_epoch)
        self.epoch = epoch
        return self._batch(epoch)[idx], epoch, m

    def _optimizer_step(self) -> float:
        accel, accum = self.accel, self.cfg.grad_accum
        total = torch.zeros((), device=accel.device)
        for j in range(accum):
            batch, epoch, m = self._micro_at(j)
            sync = nullcontext() if j == accum - 1 else accel.no_sync(self.model)
            with sync:
                if self.on_micro_batch is not None:
                    self.on_micro_batch(epoch, batch)
                loss = self._micro_batch(batch, epoch, m)
                accel.backward(loss / accum)
            total += loss.detach() / accum
        return self._apply_step(total)

    def _apply_step(self, total: torch.Tensor) -> float:
        """The optimizer step after the micro-batches' backward passes; the step's mean loss."""
        cfg, accel = self.cfg, self.accel
        mean = accel.reduce(total, "mean") if accel.num_processes > 1 else total
        value = float(mean)
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                     else "no checkpoint was written before it (use --save-every)")
            raise TrainingError(f"the loss became {value} at step {self.step + 1}; stopped without saving the broken "
                                f"weights ({where}). Lower the learning rate, use bf16 or fp32 instead of fp16, or "
                                "check the images.")
        if cfg.max_grad_norm:
            # (gradients are already averaged over processes; accelerate's wrapper adds only overhead)
            if accel.scaler is not None:
                accel.unscale_gradients()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm, foreach=accel.device.type == "cuda")
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _micro_batch(self, batch: list, epoch: int, m: int) -> torch.Tensor:
        inputs = self._micro_inputs(batch, epoch, m)
        loss = self._micro_loss(inputs, self.model(inputs.noisy, inputs.timesteps, **inputs.kw))
        if inputs.uncond_kw is not None:
            loss = loss + self._uncond_loss(inputs)
        return loss

    def _uncond_loss(self, inputs: "MicroInputs") -> torch.Tensor:
        """uncond_preservation: the LoRA's prediction for the empty prompt against the base model's
        (the network switched off for that pass), on the micro-batch's own noisy latents."""
        with torch.no_grad():
            self.network.set_multiplier(0.0)
            try:
                base = self.model(inputs.noisy, inputs.timesteps, **inputs.uncond_kw)
            finally:
                self.network.set_multiplier(1.0)
        pred = self.model(inputs.noisy, inputs.timesteps, **inputs.uncond_kw)
        return self.cfg.uncond_preservation * L.per_sample_loss(pred, base).mean()

    def _micro_inputs(self, batch: list, epoch: int, m: int) -> "MicroInputs":
        """Everything one micro-batch feeds the model and the loss; seeds the RNGs of micro-batch m."""
        cfg, dev = self.cfg, self.accel.device
        rank = self.accel.process_index
        torch.manual_seed(_mix("global", cfg.seed, m, rank))          # LoRA dropout and anything else
        gen = torch.Generator().manual_seed(_mix("noise", cfg.seed, m, rank))
        lats, captions, weights, time_ids, pixels, seeds = [], [], [], [], [], []
        for s in batch:
            item = self.items[s.item]
            rng = ds.sample_rng(cfg.seed, epoch, s.slot)
            flip = cfg.random_flip and rng.random() < 0.5
            if self.latents is not None:
                lat = self.latents[(s.item, flip)]
                lats.append(lat.latent)
                original, crop = lat.original_size, lat.crop_top_left
            else:
                px, original, crop = prepare_pixels(item, flip, rng if cfg.crop == "random" else None)
                pixels.append(px)
                seeds.append(_mix("latent", cfg.seed, epoch, s.slot))
            captions.append(ds.process_caption(item.caption, rng, shuffle=cfg.shuffle_caption,
                                               keep_tokens=cfg.keep_tokens, dropout=cfg.caption_dropout))
            weights.append(cfg.prior_loss_weight if item.is_reg else 1.0)
            bw, bh = item.bucket
            time_ids.append(sdxl_time_ids(original, crop, (bh, bw)))
        latents = torch.stack(lats).to(dev) if lats else self.vae_encoder(torch.stack(pixels), seeds).to(dev)
        noise = L.draw_noise(latents.shape, gen, cfg.noise_offset).to(dev)
        t = L.draw_timesteps(len(batch), self.noise_scheduler.config.num_train_timesteps, gen,
                             cfg.min_timestep, cfg.max_timestep).to(dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        kw = {"time_ids": torch.stack(time_ids).to(dev)} if self.family == "sdxl" else {}
        uncond_kw = dict(kw) if cfg.uncond_preservation else None
        for out, texts in ((kw, captions), (uncond_kw, [""] * len(batch))):
            if out is None:
                continue
            if self.embeddings is not None:
                ctx, pooled = self.embeddings.batch(texts)
                out.update(context=ctx.to(dev), pooled=None if pooled is None else pooled.to(dev))
            else:
                out["captions"] = texts
        return MicroInputs(noisy, t, kw, latents, noise, torch.tensor(weights, device=dev), uncond_kw)

    def _micro_loss(self, inputs: "MicroInputs", pred: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss: the weighted mean over its samples."""
        t = inputs.timesteps
        tgt = L.target(self.noise_scheduler, self.prediction_type, inputs.latents, inputs.noise, t)
        per = L.per_sample_loss(pred, tgt)
        w = inputs.weights
        if self.cfg.min_snr_gamma:
            w = w * L.min_snr_weights(self.noise_scheduler.alphas_cumprod, t, self.cfg.min_snr_gamma,
                                      self.prediction_type)
        return (per * w).mean()

    # ------------------------------------------------------------------------------------------
    # reporting, commands, samples

    def _report(self, loss: float, t0: float, start_step: int) -> None:
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        self.losses.append((self.step, loss, self.smoothed))    # the whole run's curve, kept in checkpoints
        if not self.main:
            return
        done = self.step - start_step
        rate = done / max(1e-9, time.time() - t0)
        total = self.plan.total_steps
        self.cb.on_progress(Progress(self.step, total, self.epoch + 1, self.plan.epochs, loss, self.smoothed,
                                     self.lr_scheduler.get_last_lr()[0], rate, (total - self.step) / max(rate, 1e-9)))

    def _commands(self) -> tuple[bool, bool, bool]:
        flags = self.control.poll() if self.main else (False, False, False)
        if self.accel.num_processes > 1:
            from accelerate.utils import broadcast
            t = broadcast(torch.tensor([float(f) for f in flags], device=self.accel.device), from_process=0)
            flags = tuple(bool(x) for x in t.tolist())
        return flags

    def sample_prompts(self) -> list[str]:
        cfg = self.cfg
        if cfg.sample_prompts:
            return list(cfg.sample_prompts)
        default = f"{cfg.trigger} {cfg.class_word}".strip()
        return [default or next(it.caption for it in self.items if not it.is_reg)]

    def _generate(self, prompts: list[str]) -> list:
        cfg = self.cfg
        self.network.eval()
        self._offload(False)
        try:
            return generate(self.base.pipe, prompts, seed=cfg.sample_seed, steps=cfg.sample_steps,
                            cfg=cfg.sample_cfg, size=cfg.sample_size or self.resolution, autocast=self.accel.autocast)
        finally:
            self._offload(True)
            self.network.train()

    def _sample(self) -> None:
        if not self.main:
            return
        self._status("sampling", f"step {self.step}")
        images = self._generate(self.sample_prompts())
        self.last_sample = images[0]
        folder = self.ckpt_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, im in enumerate(images):
            p = folder / f"step-{self.step:06d}-{i:02d}.png"
            write_png(im, p)
            paths.append(p)
        self.cb.on_sample(self.step, images, paths)

    # ------------------------------------------------------------------------------------------
    # checkpoints, resume, output

    def _metadata(self, started: float, finished: float | None) -> dict:
        return build_metadata(cfg=self.cfg, family=self.family, prediction_type=self.prediction_type,
                              base_name=self.base.name, plan=self.plan, optimizer_desc=self.optimizer_desc,
                              step=self.step, epoch=self.epoch + 1, started_at=started,
                              finished_at=finished, output_name=self.name, base_precision=self.base_precision) \
            | self._base_lora_metadata()

    def _save_checkpoint(self) -> None:
        if not self.main:
            return
        cfg = self.cfg
        training_state = {"scheduler": self.lr_scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                          "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        if self.accel.scaler is not None:
            training_state["grad_scaler"] = self.accel.scaler.state_dict()
        m = self.step * cfg.grad_accum
        state = {"step": self.step, "micro_batch": m, "epoch": m // self.plan.micro_batches_per_epoch,
                 "batch_in_epoch": m % self.plan.micro_batches_per_epoch, "family": self.family,
                 "num_processes": self.accel.num_processes, "total_steps": self.plan.total_steps,
                 "config": cfg.to_dict(), "losses": self.losses,
                 "base_lora_hashes": [h for _, _, h in self.base_loras]}
        tensors = self.network.state_dict_for(self.family, "kohya", self.base.pipe.unet.config)
        self.last_checkpoint = ckpt.save_checkpoint(
            self.ckpt_dir, self.step, lora_name=f"{self.name}-step{self.step:06d}.safetensors", lora_tensors=tensors,
            metadata=self._metadata(time.time(), None), optimizer_state=self.optimizer.state_dict(),
            training_state=training_state, state=state)
        ckpt.prune(self.ckpt_dir, cfg.keep_checkpoints)
        self._status("checkpoint", str(self.last_checkpoint))
        self.cb.on_checkpoint(self.step, self.last_checkpoint)

    def _resume(self) -> int:
        data = ckpt.load_checkpoint(self.resume_from)
        st, cfg = data["state"], self.cfg
        if st["family"] != self.family:
            raise FamilyMismatchError(f"checkpoint {self.resume_from} was trained on {st['family']}, the base "
                                      f"model is {self.family}; resume with the same --base")
        old = st["config"]
        changed = [k for k in option_names(resume="network") if old.get(k) != getattr(cfg, k)]
        if changed:
            raise SdloraError(f"cannot resume {self.resume_from}: the network options differ ({', '.join(changed)}: "
                              f"{[old.get(k) for k in changed]} in the checkpoint)")
        drift = [k for k in option_names(resume="stream") if old.get(k) != getattr(cfg, k)]
        if st["num_processes"] != self.accel.num_processes:
            drift.append("number of processes")
        if st["total_steps"] != self.plan.total_steps:
            drift.append("total steps")
        if st.get("base_lora_hashes", []) != [h for _, _, h in self.base_loras] and "base_lora" not in drift:
            drift.append("base LoRA file contents")
        if drift:
            self._warn(f"resuming with other settings ({', '.join(drift)}): the result will differ from an "
                       "uninterrupted run")
        self.network.load_kohya(data["lora"], self.family, self.base.pipe.unet.config)
        self.optimizer.load_state_dict(data["optimizer"])
        self.lr_scheduler.load_state_dict(data["training"]["scheduler"])
        if self.accel.scaler is not None and "grad_scaler" in data["training"]:
            self.accel.scaler.load_state_dict(data["training"]["grad_scaler"])
        torch.set_rng_state(data["training"]["torch_rng"])
        if data["training"]["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(data["training"]["cuda_rng"])
        self.last_checkpoint = self.resume_from
        self.losses = [tuple(x) for x in st.get("losses", [])]
        self.smoothed = self.losses[-1][2] if self.losses else None
        self._status("resumed", f"from {self.resume_from} at step {st['step']}")
        if self.main:
            self.cb.on_resume(int(st["step"]), list(self.losses))
        return int(st["step"])

    def _save_output(self, started: float) -> dict:
        if not self.main:
            return {}
        cfg = self.cfg
        md = self._metadata(started, time.time())
        tensors = self.network.state_dict_for(self.family, cfg.save_format, self.base.pipe.unet.config,
                                              dtype=torch_dtype(cfg.save_precision))
        md["sshs_model_hash"], md["sshs_legacy_hash"] = addnet_hashes(tensors, md)
        atomic_save_file(tensors, self.out, md)
        return md

    def _save_preview(self) -> None:
        """NAME.preview.png beside the LoRA, the card image A1111 and the Library show."""
        if not self.main:
            return
        image = self.last_sample or self._generate(self.sample_prompts()[:1])[0]
        write_png(image, self.out.with_name(self.name + ".preview.png"))


def train(cfg: TrainConfig, *, callbacks=None, control: TrainingControl | None = None, base=None) -> TrainResult:
    """Train a LoRA as `cfg` says; see the module docstring and `sdlora.training.control`."""
    trainer = Trainer(cfg, callbacks, control, base)
    trainer.prepare()
    return trainer.run()
