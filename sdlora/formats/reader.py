"""`read_lora`: any SD LoRA file (or state dict) -> the normalized form (`LoraFile`).

Steps (docs/formats.md "Reading a file"): read the header; refuse what is not an SD LoRA; detect the family
and check it against the caller's; parse keys into modules; load tensors (refusing NaN/inf);
look module names up in tables built from the target model's canonical names; build one adapter
per module and check its shape against the target weight. Nothing is dropped silently: keys that
cannot be placed fail the read (or, with allow_partial=True, warn and land in `unmatched`).
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora.adapters import Adapter
from sdlora.errors import FamilyMismatchError, LoraFormatError, UnmatchedKeysError
from sdlora.families import clip_layouts, get_family, module_table
from sdlora.formats import comfy, diffusers, kohya
from sdlora.formats.container import header_of_state_dict, load_tensors, read_header
from sdlora.formats.detect import SD_FAMILIES, detect_family, refuse_non_lora
from sdlora.formats.keys import ParsedKeys, parse_keys
from sdlora.formats.modules import build_adapter

LIST_LIMIT = 20  # keys named in an error message
log = logging.getLogger(__name__)


@dataclass
class LoraFile:
    """A LoRA file in normalized form: canonical module path -> adapter."""
    patches: dict[str, Adapter]
    family: str                                   # "sd1" | "sd2" | "sdxl"
    format: str                                   # "kohya" | "lycoris" | "diffusers" | "peft" (+ "+..." if mixed)
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # bundle_emb token -> tensors
    unmatched: list[str] = field(default_factory=list)
    path: Path | None = None
    family_evidence: str = ""                     # why this family (metadata, names, shapes, or the caller)
    container: str = "safetensors"                # "safetensors" | "pickle" | "state_dict"
    misfits: list[str] = field(default_factory=list)  # shape misfits kept when read with check_shapes=False
    notes: list[str] = field(default_factory=list)    # things `inspect` should say (warnings, skipped no-ops)

    @property
    def algorithms(self) -> list[str]:
        return sorted({ad.algorithm for ad in self.patches.values()})

    def counts(self) -> dict[str, int]:
        """Matched modules per component (every component of the family, zeros included)."""
        c = Counter(p.split(".", 1)[0] for p in self.patches)
        return {comp: c.get(comp, 0) for comp in get_family(self.family).components}

    def summary(self) -> str:
        parts = ", ".join(f"{comp} {n}" for comp, n in self.counts().items())
        text = (f"{SD_FAMILIES[self.family]} {self.format} LoRA ({'/'.join(self.algorithms) or 'no modules'}): "
                f"{len(self.patches)} modules ({parts})")
        if self.embeddings:
            text += f", embeddings {', '.join(self.embeddings)}"
        if self.unmatched:
            text += f", {len(self.unmatched)} keys not placed"
        return text


def _format_name(parsed: ParsedKeys, algorithms: set[str], metadata: dict[str, str]) -> str:
    schemes = set()
    for name, mod in parsed.modules.items():
        if mod.scheme == "kohya":
            lyco = name.startswith("lycoris_") or str(metadata.get("ss_network_module", "")).startswith("lycoris")
            schemes.add("lycoris" if lyco or algorithms - {"lora", "locon"} else "kohya")
        elif mod.scheme == "comfy":
            schemes.add("comfyui")
        else:
            keys = mod.keys.values()
            schemes.add("peft" if any(".lora_A." in k or ".lora_B." in k or "magnitude" in k for k in keys)
                        else "diffusers")
    return "+".join(sorted(schemes)) or "none"


def _peft_alpha(adapter_md: dict, path: str, rank: int) -> float | None:
    """alpha of a module from diffusers' `lora_adapter_metadata` (PEFT LoraConfig per component)."""
    comp, _, name = path.partition(".")
    name_variants = clip_layouts(name)
    cfg = {k[len(comp) + 1:]: v for k, v in adapter_md.items() if k.startswith(comp + ".")}
    if not cfg:
        return None
    alpha = cfg.get("lora_alpha")
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if any(n == pattern or re.fullmatch(rf"(.*\.)?{pattern}", n) for n in name_variants):
            alpha = value
            break
    if alpha is None:
        return None
    if cfg.get("use_rslora"):
        return float(alpha) * rank / rank ** 0.5  # scale alpha/sqrt(r) expressed as alpha'/r
    return float(alpha)


def _resolve(mod, table, aliases, comfy_names) -> list[str]:
    if mod.scheme == "kohya":
        return [c for c in aliases.get(mod.name, ()) if c in table]
    if mod.scheme == "comfy":
        return [comfy_names[mod.name]] if mod.name in comfy_names else []
    return [c for c in diffusers.candidates(mod.name) if c in table]


def _fits(ad: Adapter, info) -> bool:
    if not ad.target_shape_ok(info.shape):
        return False
    if "diff_b" in ad.tensors:  # Full, or a ComfyUI bias difference beside a LoRA
        want = (info.shape[0],) if len(info.shape) > 1 else tuple(info.shape)  # norms: bias shaped as weight
        return info.has_bias and tuple(ad.tensors["diff_b"].shape) == want
    return True


def _shape_text(ad: Adapter) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in ad.tensors.items() if v.dim() > 0)


def read_lora(source, *, family: str | None = None, configs: dict | None = None,
              allow_partial: bool = False, check_shapes: bool = True) -> LoraFile:
    """Read a LoRA file (`.safetensors`, or `.pt/.ckpt` via weights_only) or a state dict.

    `family` ("sd1"|"sd2"|"sdxl") is the target model's family: a LoRA for another family raises
    FamilyMismatchError. `configs` (component -> config dict) matches names and shapes against that
    exact model (e.g. a tiny test model); by default the family's real-size configs are used.
    Unplaceable keys raise UnmatchedKeysError unless `allow_partial` (then a warning).
    `check_shapes=False` (for describing files, e.g. `sdlora inspect` on a model of another size)
    places modules whose shapes do not fit and lists them in `misfits` instead of failing.
    """
    if family is not None:
        get_family(family)
    header, state, path = _open(source)
    parsed = parse_keys(header.names)
    refuse_non_lora(header, parsed)
    where = f"{path}: " if path else ""

    fam, evidence, conflict = _choose_family(header, parsed, family, where)
    notes = []
    if conflict:  # metadata is a hint: the tensors decide, the user hears about the disagreement
        notes.append(conflict)
        warnings.warn(f"{where}{conflict}", stacklevel=2)
    if state is None:
        state = load_tensors(path, header)
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise LoraFormatError(f"{where}the file is damaged: {len(bad)} tensors hold NaN or infinite values "
                              f"(e.g. {', '.join(bad[:5])}); re-download it or use another version")

    placed = _place(parsed, state, header, fam, configs, where, check_shapes)
    patches, unmatched, misfits = placed.patches, placed.unmatched, placed.misfits
    embeddings = {tok: {k[len(f"bundle_emb.{tok}."):] or tok: state[k] for k in keys}
                  for tok, keys in parsed.embeddings.items()}
    if placed.sparse:
        notes.append(f"LyCORIS sparse residual (bias_indices/bias_values/bias_size) added to the ΔW of "
                     f"{placed.sparse} modules, scaled like the rest of each module")
    if placed.no_effect:
        notes.append(f"{len(placed.no_effect)} keys of ComfyUI's CLIP-L/H text_projection skipped: this model's "
                     f"text encoder has none and its pooled output is unused (e.g. {placed.no_effect[0]})")
    if not patches and not embeddings:
        raise UnmatchedKeysError(f"{where}none of the {len(unmatched)} LoRA keys matches a module of the "
                                 f"{SD_FAMILIES[fam]} model (e.g. {', '.join(unmatched[:5])})")
    if unmatched:
        msg = (f"{where}{len(unmatched)} keys could not be placed on the {SD_FAMILIES[fam]} model: "
               + ", ".join(unmatched[:LIST_LIMIT]) + (f" ... and {len(unmatched) - LIST_LIMIT} more"
                                                      if len(unmatched) > LIST_LIMIT else ""))
        if not allow_partial:
            raise UnmatchedKeysError(msg + ". Nothing was loaded; pass allow_partial=True to load the rest anyway")
        warnings.warn(msg + f" (loaded the other {len(patches)} modules)", stacklevel=2)
    algorithms = {ad.algorithm for ad in patches.values()}
    lf = LoraFile(patches=patches, family=fam, format=_format_name(parsed, algorithms, header.metadata),
                  metadata=dict(header.metadata), embeddings=embeddings, unmatched=unmatched, path=path,
                  family_evidence=evidence, container=header.container, misfits=misfits, notes=notes)
    log.info("%s%s", where, lf.summary())  # matched modules per component, on every load
    return lf


def _open(source):
    """(header, state dict or None until needed, path or None) of a file path or an in-memory state dict."""
    if isinstance(source, Mapping):
        state = dict(source)
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise LoraFormatError(f"not a LoRA state dict: {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a tensor")
        return header_of_state_dict(state), state, None
    path = Path(source)
    return read_header(path), None, path


def _choose_family(header, parsed, family, where):
    """(family, evidence, conflict note or None): the caller's family if given (refusing a LoRA detected
    as another), else the detected one, else the first family the shapes fit."""
    guess = detect_family(header, parsed)
    detected, evidence = guess.family, guess.evidence
    if family is not None and detected is not None and detected != family:
        raise FamilyMismatchError(
            f"{where}this LoRA is for {SD_FAMILIES[detected]} ({evidence}) but the model is "
            f"{SD_FAMILIES[family]}; pick a {SD_FAMILIES[family]} LoRA or a {SD_FAMILIES[detected]} base model")
    fam = family or detected or guess.fits[0]
    if family is not None:
        evidence = f"given by the caller ({evidence})" if detected is None else evidence
    elif detected is None:
        evidence = f"assumed {SD_FAMILIES[fam]}: {evidence}"
    return fam, evidence, guess.conflict


@dataclass
class _Placed:
    patches: dict = field(default_factory=dict)      # live module path -> Adapter
    unmatched: list = field(default_factory=list)    # keys no module took
    misfits: list = field(default_factory=list)      # "name (shape) does not fit ..." lines
    no_effect: list = field(default_factory=list)    # keys of modules this model lacks on purpose
    sparse: int = 0                                  # modules with a LyCORIS sparse residual


def _place(parsed, state, header, fam, configs, where, check_shapes) -> _Placed:
    """Build every parsed module's adapter and put it on the model module its names and shapes match."""
    table = module_table(fam, configs, include_norms=True)
    schemes = {m.scheme for m in parsed.modules.values()}
    aliases = kohya.aliases(fam, configs) if "kohya" in schemes else {}
    comfy_names = comfy.aliases(fam, configs) if "comfy" in schemes else {}
    adapter_md = {}
    if "lora_adapter_metadata" in header.metadata:
        try:
            adapter_md = json.loads(header.metadata["lora_adapter_metadata"])
        except ValueError:
            raise LoraFormatError(f"{where}damaged metadata: lora_adapter_metadata is not JSON") from None
    out, source_of = _Placed(unmatched=list(parsed.unknown) + list(parsed.duplicate)), {}
    for name, mod in parsed.modules.items():
        cands = _resolve(mod, table, aliases, comfy_names)
        if not cands:
            (out.no_effect if name in comfy.NO_EFFECT else out.unmatched).extend(mod.keys.values())
            continue
        parts = {p: state[k] for p, k in mod.keys.items()}
        alpha = None
        if "alpha" not in parts and "down" in parts and adapter_md:
            alpha = _peft_alpha(adapter_md, cands[0], parts["down"].shape[0])
        try:
            ad, used = build_adapter(name, parts, alpha)
        except LoraFormatError as e:
            raise LoraFormatError(f"{where}{e}") from None
        out.sparse += "bias_indices" in used
        out.unmatched.extend(k for p, k in mod.keys.items() if p not in used)
        fits = [c for c in cands if _fits(ad, table[c])]
        if not fits:
            out.misfits.append(f"{name} ({_shape_text(ad)}) does not fit {cands[0]} weight "
                               f"{list(table[cands[0]].shape)}")
            if check_shapes:
                continue
        target = (fits or cands)[0]
        if target in out.patches:
            raise LoraFormatError(f"{where}two entries of the file patch the same module {target}: "
                                  f"{source_of[target]} and {name}; the file is inconsistent")
        out.patches[target], source_of[target] = ad, name
    if out.misfits and check_shapes:
        raise LoraFormatError(
            f"{where}{len(out.misfits)} modules do not fit the {SD_FAMILIES[fam]} model's weights (a LoRA for "
            f"another model or a damaged file): " + "; ".join(out.misfits[:5])
            + (" ..." if len(out.misfits) > 5 else ""))
    return out
