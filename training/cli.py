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
    parser.add_argument("folder", nargs="*", help="folder(s) of training images (kohya `N_name` subfolders "
                                                  "repeat); several: one LoRA each, trained together (--out-dir)")
    parser.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file (flags override it); "
                                                              "with [[job]] tables: one LoRA per job")
    parser.add_argument("--out-dir", metavar="DIR", help="write each LoRA as DIR/<folder name>.safetensors "
                                                         "(several folders or [[job]] tables)")
    names = sorted({p.stem for p in presets().values()})
    parser.add_argument("--preset", metavar="NAME", help=f"start from a preset: {', '.join(names)} "
                                                         "(config file and flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resulting options as TOML and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (images, buckets, steps) and exit")
    add_config_arguments(parser)


class CliProgress:
    """Callbacks that print the plan and drive a tqdm bar (step, smoothed loss, it/s, ETA). Several
    jobs: one per job, each with its `name` as prefix and its own bar `position`."""

    def __init__(self, name: str = "", position: int = 0, header: str = ""):
        self.bar = None
        self.name, self.position, self.header = name, position, header

    def _print(self, text: str) -> None:
        if self.name:
            text = "\n".join(f"[{self.name}] {line}" for line in text.splitlines())
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
        if self.header:
            print(self.header, flush=True)
        self._print(plan.describe())
        self.total = plan.total_steps

    def on_progress(self, p) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=p.total_steps, initial=p.step - 1, unit="step", dynamic_ncols=True,
                            desc=self.name or None, position=self.position)
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
    from sdlora.training.config import has_jobs
    folders = list(args.folder or [])
    if len(folders) > 1 or (args.config and has_jobs(args.config)):
        return run_many(args, folders)
    overrides = overrides_from_args(args)
    if folders:
        overrides["data_dir"] = folders[0]
    if args.out_dir and "output" not in overrides and folders:
        overrides["output"] = str(Path(args.out_dir) / f"{Path(folders[0]).resolve().name}.safetensors")
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
    _print_written(trainer, result)
    return 0


def _print_written(trainer, result) -> None:
    cfg = trainer.cfg
    out = Path(result.output).resolve()
    prompt = trainer.sample_prompts()[0]
    print(f"LoRA written: {out} ({result.step} steps, rank {cfg.rank}, {len(trainer.network.paths)} modules, "
          f"final loss {result.loss:.4f})")
    base = f" --base {shlex.quote(cfg.base)}" if cfg.base else ""
    print(f"try it: sdlora generate {shlex.quote(prompt)}{base} --lora {shlex.quote(str(out))}:1")


def job_configs(args: argparse.Namespace, folders: list[str]) -> list:
    """One TrainConfig per folder or [[job]] table: defaults < base defaults < preset < the file's
    shared keys < the job's keys < flags."""
    from sdlora.errors import SdloraError
    from sdlora.training.config import load_jobs
    overrides = overrides_from_args(args)
    if "output" in overrides:
        raise SdloraError(f"--out names one file, but {len(folders) or 'several'} jobs were given; use --out-dir "
                          "DIR (each LoRA is written as DIR/<folder name>.safetensors)")
    if overrides.get("resume"):
        raise SdloraError("--resume continues one run; resume each job with its own `sdlora train --resume "
                          "CHECKPOINT` (the checkpoints of a several-job run are ordinary ones)")
    shared, tables, out_dir = load_jobs(args.config) if args.config and not folders else ({}, [], "")
    if args.config and folders:
        shared = given_values(config_file=args.config)
    tables = tables or [{"data_dir": f} for f in folders]
    out_dir = args.out_dir or out_dir
    cfgs = []
    for i, table in enumerate(tables, 1):
        values = {**shared, **table, **overrides}
        if not values.get("output"):
            if not out_dir:
                raise SdloraError(f"job {i} ({values['data_dir']}) has no output file: pass --out-dir DIR "
                                  "(or set output in its [[job]] table)")
            values["output"] = str(Path(out_dir) / f"{Path(values['data_dir']).resolve().name}.safetensors")
        cfgs.append(build_config(preset=args.preset, overrides=values))
    return cfgs


def run_many(args: argparse.Namespace, folders: list[str]) -> int:
    """Several LoRAs trained together on one base model (training.multi)."""
    cfgs = job_configs(args, folders)
    if args.print_config:
        for cfg in cfgs:
            print(f"# job {Path(cfg.output).stem}\n{cfg.to_toml()}", end="\n")
        return 0
    warnings.showwarning = _show_warning
    from sdlora.training.multi import MultiTrainer
    n = len(cfgs)
    uis = [CliProgress(Path(c.output).stem, i, f"== job {i + 1}/{n}: {c.data_dir} -> {c.output}")
           for i, c in enumerate(cfgs)]
    runner = MultiTrainer(cfgs, callbacks=uis)
    runner.prepare()
    if args.dry_run:
        return 0
    try:
        results = runner.run()
    finally:
        for ui in uis:
            ui.close()
    cut = [(t, r) for t, r in zip(runner.trainers, results) if r.status == "interrupted"]
    for t, r in zip(runner.trainers, results):
        if r.status != "interrupted":
            _print_written(t, r)
    if cut:
        print("interrupted; continue each job with: " + "; ".join(
            f"sdlora train --resume {shlex.quote(str(Path(r.checkpoint).resolve()))}" for _, r in cut))
        return 130
    return 0
