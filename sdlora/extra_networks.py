"""LoRAs named in a prompt (A1111's extra-network syntax) or on the command line.

    <lora:NAME>  <lora:NAME:W>  <lora:NAME:TE:UNET>  <lora:NAME:te=0.5:unet=1>  (<lyco:...> alike)
    --lora PATH  --lora PATH:W  --lora PATH:TE:UNET

As in A1111, W is the text-encoder multiplier and the UNet multiplier defaults to it; the tags are
removed from the text the text encoder sees. NAME is a file stem looked up (recursively) in the
LoRA folder, exactly first, then ignoring case.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path

from sdlora.errors import SdloraError

LORA_EXTS = (".safetensors", ".pt", ".ckpt", ".bin")
_TAG = re.compile(r"<(lora|lyco):([^>]+)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraRef:
    name: str                 # what the prompt/infotext calls it (file stem for --lora)
    te: float = 1.0           # A1111 te_multiplier
    unet: float = 1.0         # A1111 unet_multiplier
    path: Path | None = None  # resolved file

    @property
    def tag(self) -> str:
        """The A1111 prompt tag that names this LoRA with its multipliers."""
        w = f"{self.te:g}" if self.te == self.unet else f"{self.te:g}:{self.unet:g}"
        return f"<lora:{self.name}:{w}>"


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
            if key.strip() not in ("te", "unet", "dyn"):
                raise SdloraError(f"{original}: unknown option {key.strip()!r}; expected te=, unet= (or dyn=)")
            named[key.strip()] = value
        else:
            positional.append(a)
    if len(positional) > 3:
        raise SdloraError(f"{original}: too many values; expected <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET>")
    te = _number(named.get("te", positional[0] if positional else "1"), original)
    unet = _number(named.get("unet", positional[1] if len(positional) > 1 else str(te)), original)
    return LoraRef(name, te, unet)


def parse_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """(prompt without LoRA tags, the tags in order). Other `<...>` text is left alone."""
    refs = [_parse_tag(m[2], m[0]) for m in _TAG.finditer(prompt)]
    text = _TAG.sub("", prompt)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\s+([,.])", r"\1", text)
    text = re.sub(r"(,\s*)+(?=,)", "", text)
    return text.strip(" \t,\n"), refs


def parse_lora_arg(spec: str) -> LoraRef:
    """`PATH`, `PATH:W` or `PATH:TE:UNET` (a drive colon as in `C:\\x` stays in the path)."""
    parts = spec.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = Path(":".join(parts)).expanduser()
    if any(not math.isfinite(n) for n in numbers):
        raise SdloraError(f"--lora {spec!r}: weights must be finite numbers")
    if not path.is_file():
        raise FileNotFoundError(f"--lora {spec!r}: no file {path}; expected PATH[:WEIGHT] or PATH:TE:UNET")
    te = numbers[0] if numbers else 1.0
    unet = numbers[1] if len(numbers) > 1 else te
    return LoraRef(path.stem, te, unet, path)


def find_lora(name: str, folder) -> Path:
    """The LoRA file called `name` in `folder` (searched recursively)."""
    folder = Path(folder).expanduser()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in LORA_EXTS and p.is_file()) \
        if folder.is_dir() else []
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
    raise FileNotFoundError(f"<lora:{name}>: no {'/'.join(LORA_EXTS)} file named {name!r} in {folder}.{hint}")


def resolve(refs: list[LoraRef], folder) -> list[LoraRef]:
    return [r if r.path else LoraRef(r.name, r.te, r.unet, find_lora(r.name, folder)) for r in refs]
