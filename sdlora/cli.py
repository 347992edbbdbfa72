"""The `sdlora` command line: `sdlora <command> ...`.

Each command lives in its own module, which provides `add_arguments(parser)` and `run(args) -> int`;
only the chosen command's module is imported, so `sdlora --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "train": ("sdlora.training.cli", "train a style LoRA from a folder of images"),
    "generate": ("sdlora.generate", "generate images with the base model and any LoRAs"),
    "mix": ("sdlora.merge", "merge several weighted LoRAs into one LoRA file"),
    "fuse": ("sdlora.merge", "bake weighted LoRAs into a diffusers pipeline folder"),
    "inspect": ("sdlora.inspect", "show a LoRA file's format, family, rank, metadata and hashes"),
    "ui": ("sdlora.ui.app", "start the browser UI"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sdlora", description="Train, load, mix and bake Stable Diffusion LoRAs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            importlib.import_module(module).add_arguments(p, name)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an expected failure (bad file, bad option): one clear line, no traceback
        if getattr(e, "user_facing", False) or isinstance(e, (ValueError, FileNotFoundError, PermissionError)):
            print(f"sdlora {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
