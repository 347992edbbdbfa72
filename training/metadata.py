"""kohya-style `ss_*` metadata, SAI `modelspec.*` and the additional-networks hashes.

Key names and value spellings follow kohya sd-scripts (train_network.py, library/train_util.py,
library/sai_model_spec.py) so A1111, the Civitai uploader and metadata viewers read them.
"""
from __future__ import annotations

import hashlib
import json
import random

import safetensors.torch

import sdlora
from sdlora.modelspec import base_model_version, modelspec


def addnet_hashes(tensors: dict, metadata: dict) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's `precalculate_safetensors_hashes` computes them:
    the file is serialised with only the `ss_*` metadata; the model hash is the sha256 of the bytes
    after the header, the legacy hash the first 8 hex digits of the sha256 of the 64 KiB at 1 MiB."""
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()},
                                  {k: str(v) for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


def build_metadata(*, cfg, family: str, prediction_type: str, base_name: str, plan, optimizer_desc: str,
                   step: int, epoch: int, started_at: float, finished_at: float | None, session_id: int | None = None,
                   output_name: str, base_precision: str = "") -> dict[str, str]:
    """Every metadata key of the LoRA file except the hashes (strings only, as safetensors wants)."""
    v = prediction_type == "v_prediction"
    res = cfg.resolution
    md = {
        "ss_session_id": str(session_id if session_id is not None else random.randint(0, 2**32)),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(finished_at) if finished_at is not None else "",
        "ss_output_name": output_name,
        "ss_sd_model_name": base_name,
        "ss_base_model_version": base_model_version(family, v),
        "ss_v2": str(family == "sd2"),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_dropout": str(cfg.dropout),
        "ss_learning_rate": str(cfg.unet_lr),
        "ss_unet_lr": str(cfg.unet_lr),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr if cfg.train_text_encoder else 0.0),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_optimizer": optimizer_desc,
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_steps": str(step),
        "ss_max_train_steps": str(plan.total_steps),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(plan.epochs),
        "ss_num_batches_per_epoch": str(plan.batches_per_epoch),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_total_batch_size": str(plan.total_batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum),
        "ss_gradient_checkpointing": str(cfg.gradient_checkpointing),
        "ss_mixed_precision": cfg.mixed_precision,
        # how the frozen base was stored while training (kohya writes ss_fp8_base for its --fp8_base)
        "ss_base_precision": base_precision or "fp32",
        "ss_fp8_base": str(base_precision == "fp8"),
        "ss_full_fp16": "False",
        "ss_training_comment": cfg.comment,
        "sdlora_version": sdlora.__version__,
        "sdlora_unet_targets": ",".join(cfg.unet_targets),
        "sdlora_text_targets": ",".join(cfg.text_targets) if cfg.train_text_encoder else "",
    }
    md.update(_dataset_keys(cfg, plan, family))
    if "conv" in cfg.unet_targets:
        md["ss_network_args"] = json.dumps({"conv_dim": str(cfg.conv_rank), "conv_alpha": str(cfg.conv_alpha)})
    md.update(modelspec(family, title=output_name, when=finished_at or started_at, v_prediction=v))
    md.update({"modelspec.resolution": f"{res}x{res}", "modelspec.prediction_type": "v" if v else "epsilon"})
    if cfg.trigger:
        md["modelspec.trigger_phrase"] = cfg.trigger
    return md


def _dataset_keys(cfg, plan, family: str) -> dict[str, str]:
    """kohya's keys for what was trained on: seed, resolution and buckets, caption handling, folders."""
    res = cfg.resolution
    return {
        "ss_seed": str(cfg.seed),
        "ss_resolution": str((res, res)),
        "ss_enable_bucket": str(cfg.buckets),
        "ss_min_bucket_reso": str(plan.min_bucket_reso),
        "ss_max_bucket_reso": str(plan.max_bucket_reso),
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(b), "count": n}
                                                  for i, (b, n) in enumerate(sorted(plan.buckets.items()))}}),
        "ss_clip_skip": str(cfg.clip_skip) if family != "sdxl" else "None",
        "ss_noise_offset": str(cfg.noise_offset) if cfg.noise_offset else "None",
        "ss_min_snr_gamma": str(cfg.min_snr_gamma) if cfg.min_snr_gamma else "None",
        "ss_caption_dropout_rate": str(cfg.caption_dropout),
        "ss_shuffle_caption": str(cfg.shuffle_caption),
        "ss_keep_tokens": str(cfg.keep_tokens),
        "ss_flip_aug": str(cfg.random_flip),
        "ss_random_crop": str(cfg.crop == "random"),
        "ss_cache_latents": str(cfg.cache_latents != "none"),
        "ss_prior_loss_weight": str(cfg.prior_loss_weight),
        "ss_num_train_images": str(plan.train_samples_per_epoch),
        "ss_num_reg_images": str(plan.reg_images),
        "ss_dataset_dirs": json.dumps({f.name: {"n_repeats": f.repeats, "img_count": f.images}
                                       for f in plan.folders if not f.is_reg}),
        "ss_reg_dataset_dirs": json.dumps({f.name: {"n_repeats": f.repeats, "img_count": f.images}
                                           for f in plan.folders if f.is_reg}),
        "ss_tag_frequency": json.dumps(plan.tag_frequency),
    }
