"""LoRAs named in a prompt (A1111's extra-network syntax) or on the command line.

    <lora:NAME>  <lora:NAME:W>  <lora:NAME:TE:UNET>  <lora:NAME:te=0.5:unet=1>  (<lyco:...> alike)
    <lora:NAME:W:lbw=OUTD>  <lora:NAME:W:lbw=1,0,0,...>   (per-block weights, as the A1111
                                                           LoRA Block Weight extension writes them)
    --lora PATH  --lora PATH:W  --lora PATH:TE:UNET

As in A1111, W is the text-encoder multiplier and the UNet multiplier defaults to it; the tags are
removed from the text the text encoder sees. NAME is a file stem looked up (recursively) in the
LoRA folder, exactly first, then ignoring case. The folder's LoRAs are its `.safetensors` files
outside hidden and training-checkpoint folders (`lora_files`); an older `.pt/.ckpt` LoRA is used
through `--lora PATH`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sdlora.blocks import parse_lbw
from sdlora.errors import SdloraError

LORA_EXTS = (".safetensors", ".pt", ".ckpt", ".bin")      # what --lora PATH reads
FOLDER_EXTS = (".safetensors",)                            # what a LoRA folder lists


def is_checkpoint_folder(path: Path) -> bool:
    """A training-checkpoint folder (`NAME-checkpoints/`, or a `step-N/` one with state.json): its
    step LoRAs, optimizer and state files are no LoRAs to pick."""
    return path.name.endswith("-checkpoints") or (path / "state.json").is_file()


def lora_files(folder) -> list[Path]:
    """The LoRA files in `folder` (recursively; hidden files/folders and checkpoint folders skipped)."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not is_checkpoint_folder(Path(root) / d))
        out += [Path(root) / n for n in names if n.lower().endswith(FOLDER_EXTS) and not n.startswith(".")]
    return out
_TAG = re.compile(r"<(lora|lyco):([^>]+)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraRef:
    name: str                 # what the prompt/infotext calls it (file stem for --lora)
    te: float = 1.0           # A1111 te_multiplier
    unet: float = 1.0         # A1111 unet_multiplier
    path: Path | None = None  # resolved file
    blocks: str | None = None # LoRA Block Weight spec (`lbw=`): a preset name or 12/17/20/26 numbers

    @property
    def tag(self) -> str:
        """The A1111 prompt tag that names this LoRA with its multipliers (and block weights)."""
        w = f"{self.te:g}" if self.te == self.unet else f"{self.te:g}:{self.unet:g}"
        return f"<lora:{self.name}:{w}{f':lbw={self.blocks}' if self.blocks else ''}>"


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SdloraError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SdloraError(f"{what}: {text!r} is not a finite number")
    return value


def _parse_tag(body: str, original: str) -> LoraRef:
    name, *args = [a.strip() for a in body.split(":")]
    if not name:
        raise SdloraError(f"{original}: no LoRA name; expected <lora:NAME:WEIGHT>")
    positional, named = [], {}
    for a in args:
        key, eq, value = a.partition("=")
        if eq:
            if key.strip() not in ("te", "unet", "dyn", "lbw"):
                raise SdloraError(f"{original}: unknown option {key.strip()!r}; expected te=, unet=, lbw= (or dyn=)")
            named[key.strip()] = value.strip()
        else:
            positional.append(a)
    if len(positional) > 3:
        raise SdloraError(f"{original}: too many values; expected <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET>")
    te = _number(named.get("te", positional[0] if positional else "1"), original)
    unet = _number(named.get("unet", positional[1] if len(positional) > 1 else str(te)), original)
    blocks = named.get("lbw") or None
    if blocks is not None:
        try:
            parse_lbw(blocks)   # a bad block spec fails here, with the tag in view
        except SdloraError as e:
            raise SdloraError(f"{original}: {e}") from None
    return LoraRef(name, te, unet, blocks=blocks)


def parse_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """(prompt without LoRA tags, the tags in order). Other `<...>` text is left alone."""
    refs = [_parse_tag(m[2], m[0]) for m in _TAG.finditer(prompt)]
    text = _TAG.sub("", prompt)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\s+([,.])", r"\1", text)
    text = re.sub(r"(,\s*)+(?=,)", "", text)
    return text.strip(" \t,\n"), refs


def split_lora_arg(spec: str, what: str = "--lora") -> tuple[str, float, float]:
    """The one `--lora` grammar (generate, mix, fuse, --base-lora): `PATH`, `PATH:W` or `PATH:TE:UNET`
    -> (path, te, unet). A colon that belongs to the path stays in it: a drive (`C:\\x`), a name
    like `a:b.safetensors`, or an existing file whose whole name ends like a weight (`odd:0.5`)."""
    if os.path.isfile(spec):
        return spec, 1.0, 1.0
    parts = spec.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise SdloraError(f"{what} {spec!r}: no file before the weights; expected PATH[:WEIGHT] or PATH:TE:UNET")
    if any(not math.isfinite(n) for n in numbers):
        raise SdloraError(f"{what} {spec!r}: weights must be finite numbers; expected PATH[:WEIGHT] or PATH:TE:UNET")
    te = numbers[0] if numbers else 1.0
    return path, te, numbers[1] if len(numbers) > 1 else te


def parse_lora_arg(spec: str) -> LoraRef:
    """A `--lora` argument (split_lora_arg's grammar) whose file exists, as a LoraRef."""
    text, te, unet = split_lora_arg(spec)
    path = Path(text).expanduser()
    if not path.is_file():
        if path.exists() or path.is_symlink():     # a folder, a link loop, a broken link: said as such
            from sdlora.paths import check_input_file
            check_input_file(path, f"--lora {spec!r}: LoRA file")
        raise FileNotFoundError(f"--lora {spec!r}: no file {path}; expected PATH[:WEIGHT] or PATH:TE:UNET")
    return LoraRef(path.stem, te, unet, path)


def find_lora(name: str, folder) -> Path:
    """The LoRA file called `name` in `folder` (searched recursively)."""
    folder = Path(folder).expanduser()
    files = sorted(p for p in lora_files(folder) if p.is_file()) if folder.is_dir() else []
    for match in ([p for p in files if p.stem == name], [p for p in files if p.stem.lower() == name.lower()]):
        if len(match) == 1:
            return match[0]
        if len(match) > 1:
            raise SdloraError(f"<lora:{name}>: several files match in {folder}: "
                              f"{', '.join(str(p.relative_to(folder)) for p in match)}; rename one")
    if not folder.is_dir():
        raise FileNotFoundError(f"<lora:{name}>: LoRA folder {folder} does not exist; pass --loras DIR")
    stems = sorted({p.stem for p in files})
    close = difflib.get_close_matches(name, stems, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else \
        (f" Available: {', '.join(stems[:10])}{' ...' if len(stems) > 10 else ''}." if stems else " The folder has no LoRA files.")
    raise FileNotFoundError(f"<lora:{name}>: no {'/'.join(FOLDER_EXTS)} file named {name!r} in {folder}.{hint}")


def resolve(refs: list[LoraRef], folder) -> list[LoraRef]:
    return [r if r.path else dataclasses.replace(r, path=find_lora(r.name, folder)) for r in refs]
