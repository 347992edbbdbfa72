"""The training plan: what was found in the folders and how many steps that makes.

Users think in total optimizer steps: `steps` is the budget and epochs are derived from it
(`epochs > 0` asks for whole epochs instead).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from sdlora.errors import SdloraError


@dataclass
class Plan:
    folders: list                      # dataset.FolderInfo (training and class folders)
    items: list                        # dataset.ImageItem
    skipped: list                      # (path, reason)
    buckets: Counter                   # (w, h) -> images
    min_bucket_reso: int
    max_bucket_reso: int
    batch_size: int
    grad_accum: int
    num_processes: int
    batches_per_epoch: int             # global micro-batches of one epoch (all processes)
    total_steps: int
    epochs: int
    tag_frequency: dict
    captions_by_source: Counter = field(default_factory=Counter)
    truncated_captions: int = 0
    resolution: str = ""               # e.g. "64 px (the base model's native size)"

    @property
    def train_images(self) -> int:
        return sum(1 for it in self.items if not it.is_reg)

    @property
    def reg_images(self) -> int:
        return sum(1 for it in self.items if it.is_reg)

    @property
    def train_samples_per_epoch(self) -> int:
        return sum(it.repeats for it in self.items if not it.is_reg)

    @property
    def total_batch_size(self) -> int:
        return self.batch_size * self.grad_accum * self.num_processes

    @property
    def micro_batches_per_epoch(self) -> int:
        """Batches one process sees per epoch (the data is one stream across epochs)."""
        return self.batches_per_epoch // self.num_processes

    @property
    def steps_per_epoch(self) -> float:
        return self.micro_batches_per_epoch / self.grad_accum

    def describe(self) -> str:
        lines = ["Training plan"]
        for f in self.folders:
            kind = "class images" if f.is_reg else "images"
            lines.append(f"  {f.path}: {f.images} {kind} x {f.repeats} repeats, {f.captions} caption files")
        src = self.captions_by_source
        lines.append(f"  captions: {src['file']} from files, {src['trigger']} from trigger/class word, "
                     f"{src['folder']} from folder names, {src['none']} empty")
        if src["none"]:
            lines.append(f"  warning: {src['none']} image(s) have no caption, trigger or class word; they "
                         "train an unconditional style")
        if self.truncated_captions:
            lines.append(f"  warning: {self.truncated_captions} caption(s) are longer than 75 tokens and are cut")
        if self.skipped:
            lines.append(f"  skipped: {len(self.skipped)} image(s) (see the warning above)")
        if self.resolution:
            lines.append(f"  resolution: {self.resolution}")
        bk = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(self.buckets.items()))
        lines.append(f"  buckets: {bk}")
        lines.append(f"  batch: {self.batch_size} x {self.grad_accum} accumulation x {self.num_processes} "
                     f"process(es) = {self.total_batch_size} images per step")
        lines.append(f"  {self.train_samples_per_epoch} training samples per epoch"
                     + (f" (+ {self.train_samples_per_epoch} class samples)" if self.reg_images else "")
                     + f" = {self.steps_per_epoch:g} steps per epoch")
        lines.append(f"  total: {self.total_steps} optimizer steps = {self.epochs} epoch(s)")
        return "\n".join(lines)


def make_plan(*, folders, items, skipped, buckets, min_reso, max_reso, cfg, num_processes, batches_per_epoch,
              tag_frequency, captions_by_source, truncated) -> Plan:
    if batches_per_epoch < num_processes:
        raise SdloraError(f"{batches_per_epoch} batch(es) per epoch cannot feed {num_processes} processes; "
                          "add images or repeats, or lower --batch-size")
    plan = Plan(folders, items, skipped, buckets, min_reso, max_reso, cfg.batch_size, cfg.grad_accum,
                num_processes, batches_per_epoch, 0, 0, tag_frequency, captions_by_source, truncated)
    if cfg.epochs > 0:
        plan.total_steps = max(1, cfg.epochs * plan.micro_batches_per_epoch // cfg.grad_accum)
    else:
        plan.total_steps = cfg.steps
    plan.epochs = math.ceil(plan.total_steps * cfg.grad_accum / plan.micro_batches_per_epoch)
    return plan
