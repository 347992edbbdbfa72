"""A1111's generation-parameters text ("infotext"), as stored in a PNG's `parameters` chunk.

    a red circle <lora:neon:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: 0123456789, ...

Lines up to `Negative prompt:` are the prompt, then the negative prompt, and the last line holds
`Key: value` pairs separated by commas; a value with a comma, colon or newline is JSON-quoted
(A1111's `quote`). `parse` reads what A1111, Forge and Civitai write, extra fields included
(they are kept as strings), so the UI can reuse any image's parameters.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

PNG_KEY = "parameters"
# one `Key: value` of the parameter line (A1111's re_param): quoted values may hold commas
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


def quote(value) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


@dataclass
class Infotext:
    prompt: str
    negative_prompt: str = ""
    params: dict[str, str] = field(default_factory=dict)   # in file order, values unquoted

    # typed views of the fields `generate` uses ------------------------------------------------
    def get_int(self, key: str, default=None):
        try:
            return int(self.params[key])
        except (KeyError, ValueError):
            return default

    def get_float(self, key: str, default=None):
        try:
            return float(self.params[key])
        except (KeyError, ValueError):
            return default

    @property
    def size(self) -> tuple[int, int] | None:
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", self.params.get("Size", ""))
        return (int(m[1]), int(m[2])) if m else None

    @property
    def sampler(self) -> str | None:
        """The sampler label, with A1111 >= 1.9's separate `Schedule type` folded in."""
        from sdlora.samplers import sampler_name
        name = self.params.get("Sampler")
        if not name:
            return None
        try:
            return sampler_name(name, self.params.get("Schedule type"))
        except ValueError:
            return name

    @property
    def lora_hashes(self) -> dict[str, str]:
        """`Lora hashes: "name: hash, ..."` as {name: hash}."""
        out = {}
        for item in self.params.get("Lora hashes", "").split(","):
            name, sep, h = item.rpartition(":")
            if sep and name.strip():
                out[name.strip()] = h.strip()
        return out

    def settings(self) -> dict:
        """The fields `sdlora generate` takes, for "reuse parameters" (absent ones left out)."""
        size = self.size
        out = {"prompt": self.prompt, "negative": self.negative_prompt, "steps": self.get_int("Steps"),
               "cfg": self.get_float("CFG scale"), "seed": self.get_int("Seed"), "sampler": self.sampler,
               "width": size[0] if size else None, "height": size[1] if size else None,
               "s_min_uncond": self.get_float("NGMS")}
        return {k: v for k, v in out.items() if v is not None}

    def build(self) -> str:
        return build(self.prompt, self.negative_prompt, self.params)


def build(prompt: str, negative_prompt: str = "", params: dict | None = None) -> str:
    """The infotext for a prompt, a negative prompt and ordered parameters (None values skipped)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{_NEGATIVE} {negative_prompt}")
    pairs = [f"{k}: {quote(v)}" for k, v in (params or {}).items() if v is not None and v != ""]
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse(text: str) -> Infotext:
    """An infotext (A1111/Forge/Civitai/sdlora) split into prompt, negative prompt and parameters."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    last = lines[-1] if lines else ""
    found = _PARAM.findall(last)
    if len(found) >= 3:  # A1111's rule: a last line with 3+ `Key: value` pairs is the parameter line
        params = {k.strip(): unquote(v.strip()) for k, v in found}
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE):].lstrip()
        (negative if in_negative else prompt).append(line)
    return Infotext("\n".join(prompt).strip(), "\n".join(negative).strip(), params)


def lora_hashes_value(hashes: dict[str, str]) -> str:
    """The `Lora hashes` field value: "name: hash12, name2: hash12" (quoted by `build`)."""
    return ", ".join(f"{name}: {h}" for name, h in hashes.items())


def read_png(path) -> Infotext | None:
    """The infotext of a PNG (its `parameters` text chunk), None if it has none."""
    from PIL import Image
    with Image.open(path) as im:
        text = im.info.get(PNG_KEY)
    return parse(text) if text else None
