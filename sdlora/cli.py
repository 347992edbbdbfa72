"""The `sdlora` command line: `sdlora <command> ...`.

Each command lives in its own module, which provides `add_arguments(parser)` and `run(args) -> int`;
only the chosen command's module is imported, and it imports torch/diffusers only when it runs,
so every `--help` stays fast.

`main` is the one place where errors meet the user: an expected error (sdlora's own, a ValueError
from validation, an OSError) prints one `sdlora: error: ...` line and exits 2; anything else is a
bug and prints a one-line "internal error" (exit 1). The traceback is shown only with `--debug`.
Library warnings and loading progress bars are hidden unless `--verbose`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
import warnings

# command -> (module, one-line help, loads diffusers/transformers models)
COMMANDS = {
    "train": ("sdlora.training.cli", "train a style LoRA from a folder of images", True),
    "generate": ("sdlora.generate", "generate images with the base model and any LoRAs", True),
    "mix": ("sdlora.merge_cli", "merge several weighted LoRAs into one LoRA file", False),
    "fuse": ("sdlora.merge_cli", "bake weighted LoRAs into a diffusers pipeline folder", False),
    "inspect": ("sdlora.inspect", "show a LoRA file's format, family, rank, metadata and hashes", False),
    "ui": ("sdlora.ui.app", "start the browser UI", True),
}
EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


def _global_flags(parser, default) -> None:
    # on every subcommand too (`sdlora fuse ... --debug`); SUPPRESS there keeps a value given before it
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, also print the full Python traceback")
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="show library warnings and model-loading progress bars")


def _quiet(loads_models: bool) -> None:
    """Hide library chatter: deprecation warnings, transformers' notices, loading progress bars."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")     # read when transformers is imported
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # bitsandbytes logs a missing optional kernel package at import on some CPUs (avx512-bf16)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if loads_models:   # their progress-bar switches exist only once imported
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
        for lib in (diffusers_logging, transformers_logging):
            lib.set_verbosity_error()
            lib.disable_progress_bar()


def error_message(e: BaseException) -> tuple[str, int]:
    """(the line to print, the exit code) for an exception that reached the command line."""
    from sdlora.errors import user_message
    msg = user_message(e)
    if msg is not None:
        return f"sdlora: error: {msg}", EXIT_ERROR
    return (f"sdlora: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(a bug in sdlora, not in your input); rerun with --debug for the traceback and report it",
            EXIT_INTERNAL)


def _safe_output() -> None:
    """Paths whose names are not valid UTF-8 (kept by Python as surrogate escapes) print as escapes
    instead of failing the command with UnicodeEncodeError after its work is done."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv=None) -> int:
    _safe_output()
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[:argv.index("--")] if "--" in argv else argv
    debug = "--debug" in flags     # known before parsing, for errors while a command module imports
    try:
        parser = argparse.ArgumentParser(prog="sdlora", description="Train, load, mix and bake Stable Diffusion LoRAs.")
        _global_flags(parser, False)
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        chosen = next((a for a in argv if not a.startswith("-")), None)
        for name, (module, help_, _) in COMMANDS.items():
            p = sub.add_parser(name, help=help_, description=help_)
            _global_flags(p, argparse.SUPPRESS)
            if name == chosen:
                importlib.import_module(module).add_arguments(p, name)
        args = parser.parse_args(argv)
        if not args.verbose:
            _quiet(COMMANDS[args.command][2])
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except KeyboardInterrupt:
        print("sdlora: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            traceback.print_exc()
        message, code = error_message(e)
        print(message, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
