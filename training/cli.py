"""`sdlora train FOLDER --out style.safetensors [--base SPEC] [--trigger WORD] [--config FILE.toml]`
   `sdlora train --resume CHECKPOINT`   (continues that run with the options stored in the checkpoint)

Every option of `training.config.TrainConfig` is also a flag (`--unet-lr 2e-4`) and a TOML key
(`unet_lr = 2e-4`). Prints the plan, shows a progress bar, and ends with the file and a command to
try it. Several GPUs/machines: `accelerate launch -m sdlora.cli train ...`.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path

from sdlora.training.config import add_arguments as add_config_arguments
from sdlora.training.config import build_config, given_values, overrides_from_args, presets, resume_config


def add_arguments(parser: argparse.ArgumentParser, name: str = "train") -> None:
    parser.add_argument("folder", nargs="?", help="folder of training images (kohya `N_name` subfolders repeat)")
    parser.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file (flags override it)")
    names = sorted({p.stem for p in presets().values()})
    parser.add_argument("--preset", metavar="NAME", help=f"start from a preset: {', '.join(names)} "
                                                         "(config file and flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resulting options as TOML and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (images, buckets, steps) and exit")
    add_config_arguments(parser)


class CliProgress:
    """Callbacks that print the plan and drive a tqdm bar (step, smoothed loss, it/s, ETA)."""

    def __init__(self):
        self.bar = None

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def on_status(self, status: str, message: str) -> None:
        if status in ("training", "done", "stopped", "saving"):
            if status == "training":
                return
            self.close()
        self._print(f"[{status}] {message}" if message else f"[{status}]")

    def on_plan(self, plan) -> None:
        self._print(plan.describe())
        self.total = plan.total_steps

    def on_progress(self, p) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=p.total_steps, initial=p.step - 1, unit="step", dynamic_ncols=True)
        self.bar.set_postfix(loss=f"{p.smoothed_loss:.4f}", lr=f"{p.lr:.2e}", epoch=f"{p.epoch}/{p.total_epochs}",
                             refresh=False)
        self.bar.update(p.step - self.bar.n)

    def on_sample(self, step, images, paths) -> None:
        self._print(f"[samples] step {step}: " + ", ".join(str(p) for p in paths))

    def on_checkpoint(self, step, path) -> None:
        pass   # reported through on_status("checkpoint")

    def on_warning(self, message: str) -> None:
        pass   # printed by the warnings hook below

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _print_base_defaults(cfg, given: dict) -> None:
    """Say which settings the base model chose (see config.base_defaults), so no default is hidden."""
    from sdlora.training.config import base_defaults
    name, values = base_defaults(cfg.base)
    chosen = [f"{k}={getattr(cfg, k)}" for k in values if k not in given]
    if chosen:
        print(f"settings from the base model (preset {name}; a flag or --preset overrides them): "
              + ", ".join(chosen), flush=True)


def run(args: argparse.Namespace) -> int:
    from sdlora.errors import SdloraError
    overrides = overrides_from_args(args)
    if args.folder:
        overrides["data_dir"] = args.folder
    if overrides.get("resume"):
        from sdlora.training.checkpoint import stored_config
        given = given_values(preset=args.preset, config_file=args.config, overrides=overrides)
        cfg = resume_config(stored_config(overrides["resume"]), given, overrides["resume"])
    else:
        cfg = build_config(preset=args.preset, config_file=args.config, overrides=overrides)
        if not args.preset:
            _print_base_defaults(cfg, given_values(config_file=args.config, overrides=overrides))
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    if not cfg.data_dir:
        raise SdloraError("no training folder: sdlora train FOLDER --out NAME.safetensors")
    warnings.showwarning = _show_warning
    from sdlora.training.trainer import Trainer
    ui = CliProgress()
    trainer = Trainer(cfg, callbacks=ui)
    trainer.prepare()
    if args.dry_run:
        return 0
    try:
        result = trainer.run()
    finally:
        ui.close()
    if not trainer.main:
        return 0
    if result.status == "interrupted":
        # the checkpoint holds the run's whole config: this one command continues it from anywhere
        print(f"interrupted at step {result.step}/{result.total_steps}; checkpoint: {result.checkpoint}\n"
              f"continue with: sdlora train --resume {shlex.quote(str(Path(result.checkpoint).resolve()))}")
        return 130
    out = Path(result.output).resolve()
    prompt = trainer.sample_prompts()[0]
    print(f"LoRA written: {out} ({result.step} steps, rank {cfg.rank}, {len(trainer.network.paths)} modules, "
          f"final loss {result.loss:.4f})")
    base = f" --base {shlex.quote(cfg.base)}" if cfg.base else ""
    print(f"try it: sdlora generate {shlex.quote(prompt)}{base} --lora {shlex.quote(str(out))}:1")
    return 0
