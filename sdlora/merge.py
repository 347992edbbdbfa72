"""`sdlora mix` (several weighted LoRAs -> one LoRA file) and `sdlora fuse` (-> a diffusers folder).

mix, exact: when every input module is plain LoRA/LoCon and no rank is asked for, ranks are
concatenated: up' = [s₁·scale₁·U₁ | s₂·scale₂·U₂ | …], down' = [D₁; D₂; …], so up'·down' = Σ s_k·ΔW_k
exactly (kohya-ss/sd-scripts#839). The sign of a negative weight goes on
the up side. A Tucker `lora_mid` is folded into its down matrix (mid·down is again a conv kernel),
so LoCon files with and without mid concatenate too.
mix, SVD (`--rank R`, or any LoHa/LoKr/full input): the summed ΔW of each module is truncated to
rank R by SVD; up = U·√S, down = √S·Vh. Unlike kohya's svd_merge_lora there is no
0.99-quantile clamp of U and Vh: the clamp moves the result away from the best rank-R approximation
and only guarded fp16 range, which the √S split already keeps small. When all inputs are low-rank
the SVD is taken of the small core of the concatenated factors (QR first), which is exact and fast.
DoRA cannot be merged without the base weights it rescales: bake it with `fuse` instead.
Every module of the written file has the same alpha (the largest rank; up is scaled by r/alpha to
match), because diffusers mis-scales kohya files whose alphas differ between modules.

fuse works on the folder's safetensors files directly: each touched tensor is recomputed from the
stored value (fp32, cast back to the file's dtype); every other tensor and file is copied as is.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from sdlora.adapters import LoRA
from sdlora.errors import SdloraError
from sdlora.families import TEXT_ENCODERS, clip_layouts, family_of_unet_config, get_family, module_table
from sdlora.atomic import as_oserror, atomic_save_file, clean_stale, replace_dir, temp_dir, umask
from sdlora.formats.writer import lora_state_dict
from sdlora.paths import explain_oserror, scan_tree
from sdlora.modelspec import modelspec
from sdlora.fusion import bias_deltas, fused_bias, fused_weight
from sdlora.lora_cache import DEFAULT_CACHE, LoraCache
from sdlora.mixplan import MixEntry, Target, check_fit, load_sources, plan



# ---------------------------------------------------------------------------------------------
# mix: several LoRAs -> one

@dataclass
class MixedLora:
    patches: dict[str, LoRA]
    family: str
    method: str                                         # "concat" | "svd"
    rank: int | None                                    # requested rank (svd)
    errors: dict[str, float] = field(default_factory=dict)   # component -> relative Frobenius error
    modules: dict[str, int] = field(default_factory=dict)    # component -> modules written
    dtype: torch.dtype = torch.float32                  # the inputs' common dtype (fp32 when mixed)
    inputs: list = field(default_factory=list)          # the inputs' LoraFiles (for their metadata)


def _as_lora(up: torch.Tensor, down: torch.Tensor, shape: tuple) -> LoRA:
    """A LoRA with ΔW = up @ down (scale 1), in the target's layout (conv: up [out, r, 1, 1])."""
    r = down.shape[0]
    if len(shape) == 4:
        return LoRA(up.reshape(shape[0], r, 1, 1).contiguous(), down.reshape(r, *shape[1:]).contiguous(), alpha=r)
    return LoRA(up.contiguous(), down.contiguous(), alpha=r)


def _one_alpha(patches: dict[str, LoRA]) -> dict[str, LoRA]:
    """The same ΔW with one alpha (the largest rank) in every module: up·(r/alpha), scale alpha/r.

    diffusers misreads files whose modules carry different alphas (its `alpha_pattern` keys do not
    match for kohya names), so a single alpha keeps mixed-rank merges right there too.
    """
    if not patches:
        return patches
    alpha = max(ad.rank for ad in patches.values())
    return {p: ad if ad.rank == alpha else
            LoRA(ad.tensors["up"] * (ad.rank / alpha), ad.tensors["down"], alpha=float(alpha))
            for p, ad in patches.items()}


def _svd_low_rank(up: torch.Tensor, down: torch.Tensor):
    """SVD of up @ down through QR of the thin factors: (U, S, Vh) of the product, exactly."""
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def mix_loras(entries: list[MixEntry], *, rank: int | None = None, family: str | None = None,
              configs: dict | None = None, cache: LoraCache | None = None) -> MixedLora:
    """The weighted sum of several LoRAs as one plain LoRA (exact concat, or SVD to `rank`)."""
    if rank is not None and rank < 1:
        raise SdloraError(f"--rank must be at least 1, got {rank}")
    loras = load_sources(entries, family, configs, cache or DEFAULT_CACHE)
    family = family or next((getattr(lf, "family", None) for lf in loras), None)
    if family is None:
        raise SdloraError("cannot tell the model family of the inputs; pass family='sd1'|'sd2'|'sdxl'")
    target = Target(family, configs or {})
    table = module_table(family, configs)
    recipes = plan(entries, loras, target.unet_config)
    check_fit(entries, loras, lambda p: table[p].shape if p in table else None,
              get_family(family).components, target.unet_config)
    _refuse_unmergeable(entries, loras, recipes)
    algos = sorted({ad.algorithm for r in recipes.values() for ad, _ in r if not ad.plain})
    if rank is None and algos:
        raise SdloraError(f"the inputs contain {', '.join(algos)} modules, which cannot be concatenated into a "
                          "plain LoRA exactly; pass --rank R to merge them by SVD")
    dtypes = {t.dtype for lf in loras for ad in lf.patches.values() for t in ad.tensors.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    out = MixedLora({}, family, "concat" if rank is None else "svd", rank,
                    dtype=dtypes.pop() if len(dtypes) == 1 else torch.float32, inputs=list(loras))
    sq_err: dict[str, float] = {}
    sq_norm: dict[str, float] = {}
    with torch.no_grad():
        for path, recipe in recipes.items():
            shape = tuple(table[path].shape)
            comp = path.partition(".")[0]
            if all(ad.plain for ad, _ in recipe):
                ups, downs = zip(*(ad.flat_factors() for ad, _ in recipe))
                up = torch.cat([u * (s * ad.scale) for u, (ad, s) in zip(ups, recipe)], dim=1)
                down = torch.cat(downs, dim=0)
                if rank is None:
                    out.patches[path] = _as_lora(up, down, shape)
                    out.modules[comp] = out.modules.get(comp, 0) + 1
                    continue
                u, s, vh = _svd_low_rank(up, down)
            else:
                zeros = torch.zeros(()).expand(shape)  # additive ΔW needs only W's shape
                mat = sum(s * ad.delta(zeros) for ad, s in recipe).reshape(shape[0], -1)
                u, s, vh = torch.linalg.svd(mat, full_matrices=False)
            r = max(1, min(rank, s.numel()))
            root = s[:r].sqrt()
            out.patches[path] = _as_lora(u[:, :r] * root, root[:, None] * vh[:r], shape)
            out.modules[comp] = out.modules.get(comp, 0) + 1
            sq_err[comp] = sq_err.get(comp, 0.0) + float((s[r:] ** 2).sum())
            sq_norm[comp] = sq_norm.get(comp, 0.0) + float((s ** 2).sum())
    out.patches = _one_alpha(out.patches)
    out.errors = {c: math.sqrt(sq_err[c] / sq_norm[c]) if sq_norm[c] > 0 else 0.0 for c in sq_norm}
    return out


def _refuse_unmergeable(entries, loras, recipes) -> None:
    for e, lf in zip(entries, loras):
        for path, ad in lf.patches.items():
            if path not in recipes or not any(a is ad for a, _ in recipes[path]):
                continue
            if not ad.additive:
                raise SdloraError(f"{e.name}: {path} is {ad.algorithm}, which rescales the base model's weights, so "
                                  "it cannot be merged into a LoRA without them; bake it with `sdlora fuse` instead")
            if ad.bias_delta(torch.zeros(1)) is not None:
                raise SdloraError(f"{e.name}: {path} changes the layer's bias, which a kohya LoRA file cannot hold; "
                                  "bake it with `sdlora fuse` instead")


def mix_metadata(mixed: MixedLora, entries: list[MixEntry], out: Path) -> dict[str, str]:
    fam = get_family(mixed.family)
    ranks = {ad.rank for ad in mixed.patches.values()}
    conv_ranks = {ad.rank for ad in mixed.patches.values() if ad.tensors["down"].dim() == 4
                  and ad.tensors["down"].shape[2:] != (1, 1)}
    alphas = {float(ad.alpha) for ad in mixed.patches.values()}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    alpha = f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic"
    inputs = [(e, getattr(lf, "metadata", None) or {}) for e, lf in
              zip(entries, mixed.inputs or [e.source for e in entries])]
    titles = [m.get("modelspec.title") or Path(e.name).stem for e, m in inputs]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_base_model_version": fam.ss_base_model_version,
        "ss_v2": str(mixed.family == "sd2"),
        "ss_output_name": out.stem,
        **modelspec(mixed.family, title=out.stem),
        "modelspec.merged_from": ", ".join(titles),
        "sdlora_merge": json.dumps({
            "method": mixed.method, "rank": mixed.rank,
            "relative_error": mixed.errors,
            "inputs": [{"file": e.name, "unet": e.unet, "text_encoder": e.text_encoder,
                        "blocks": e.blocks if isinstance(e.blocks, (str, dict, type(None))) else list(e.blocks)}
                       for e in entries]}),
    }
    if conv_ranks:
        conv = str(conv_ranks.pop()) if len(conv_ranks) == 1 else "Dynamic"
        meta["ss_network_args"] = json.dumps({"conv_dim": conv, "conv_alpha": alpha})
    meta.update(_inherited(inputs, mixed))
    return meta


# what the inputs say about their base model: kept when they all agree (a mix of LoRAs trained on
# one model is still for that model); the family's generic value otherwise
SHARED_KEYS = ("ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_base_model_version",
               "ss_v2", "ss_resolution", "modelspec.architecture", "modelspec.prediction_type",
               "modelspec.resolution")


def _inherited(inputs, mixed: MixedLora) -> dict[str, str]:
    """Base-model keys the inputs agree on, and their trigger words and tag frequencies merged, so
    a mix is listed with its triggers and base model like its inputs are. Inputs with no positive
    multiplier are left out of the triggers (their style is removed, not added)."""
    from sdlora.inspect import trigger_words
    out = {}
    for key in SHARED_KEYS:
        values = {m.get(key) for _, m in inputs}
        if len(values) == 1 and None not in values and values != {""}:
            out[key] = values.pop()
    words, tags = [], {}
    for e, m in inputs:
        if max(e.unet, e.text_encoder) <= 0:
            continue
        path = getattr(e.source, "path", None) or (Path(e.source) if isinstance(e.source, (str, os.PathLike)) else None)
        found, _ = trigger_words(m, Path(path) if path else None)
        words += [w for w in found if w not in words]
        try:
            freq = json.loads(m.get("ss_tag_frequency") or "{}")
        except ValueError:
            continue
        for folder, counts in (freq.items() if isinstance(freq, dict) else ()):
            if isinstance(counts, dict):
                merged = tags.setdefault(str(folder), {})
                for tag, n in counts.items():
                    if isinstance(n, (int, float)):
                        merged[str(tag)] = merged.get(str(tag), 0) + int(n)
    if words:
        out["modelspec.trigger_phrase"] = ", ".join(words)
    if tags:
        out["ss_tag_frequency"] = json.dumps(tags)
    return out


def save_mix(path, mixed: MixedLora, entries: list[MixEntry], *, dtype: torch.dtype | None = None,
             configs: dict | None = None) -> None:
    """Write the mix as a kohya LoRA file (atomic), with merge metadata and the addnet hash."""
    path = Path(path)
    tensors = lora_state_dict(mixed.patches, mixed.family, unet_config=(configs or {}).get("unet"),
                              dtype=dtype or mixed.dtype)
    meta = mix_metadata(mixed, entries, path)
    # sd-webui-additional-networks / A1111 hash: SHA-256 of everything after the header
    data = safetensors_bytes(tensors)
    meta["sshs_model_hash"] = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    atomic_save_file(tensors, path, meta)


# ---------------------------------------------------------------------------------------------
# fuse: LoRAs baked into a diffusers pipeline folder

def _folder_target(base: Path) -> Target:
    if not (base / "model_index.json").is_file() or not (base / "unet" / "config.json").is_file():
        raise SdloraError(f"{base} is not a diffusers pipeline folder (expected model_index.json and "
                          "unet/config.json); save the model with `pipe.save_pretrained(folder)` first")
    unet = json.loads((base / "unet" / "config.json").read_text())
    family = family_of_unet_config(unet)
    configs = {"unet": unet}
    for comp in get_family(family).text_encoders:
        cfg = base / comp / "config.json"
        if cfg.is_file():
            configs[comp] = json.loads(cfg.read_text())
    return Target(family, configs)


def _file_keys(comp_dir: Path) -> dict[str, list[Path]]:
    """tensor name -> files holding it, over every safetensors file (variants, shards) of a component."""
    keys: dict[str, list] = {}
    for f in sorted(comp_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                keys.setdefault(k, []).append(f)
    return keys


def _tensor_names(path: str) -> list[str]:
    """Names a module's weight may have in a saved component (transformers 4.x or 5.x CLIP layout)."""
    comp, _, name = path.partition(".")
    return list(clip_layouts(name)) if comp in TEXT_ENCODERS else [name]


def _locate(paths, recipes, target: Target, base: Path):
    """canonical path -> (module name in the files, files with its weight, files with its bias), and
    its weight shape (for check_fit), for every module of the LoRAs."""
    keys = {comp: _file_keys(base / comp) for comp in target.configs}
    where, shapes = {}, {}
    for comp, ks in keys.items():
        if not ks and any(p.startswith(comp + ".") for p in recipes):
            raise SdloraError(f"{base / comp} has no .safetensors weights (only .bin?); convert the folder with "
                              "`pipe.save_pretrained(folder, safe_serialization=True)` and fuse again")
    for path in paths:
        comp = path.partition(".")[0]
        for name in _tensor_names(path):
            files = keys.get(comp, {}).get(name + ".weight")
            if files:
                with safe_open(str(files[0]), "pt") as sf:
                    shapes[path] = tuple(sf.get_slice(name + ".weight").get_shape())
                where[path] = (name, files, keys[comp].get(name + ".bias", []))
                break
    return where, shapes


def fuse(base, out, entries: list[MixEntry], *, overwrite: bool = False, device: str = "cpu",
         cache: LoraCache | None = None, log=print) -> dict[str, int]:
    """Write a copy of the diffusers folder `base` at `out` with the weighted LoRAs added to its weights.

    Returns the number of tensors patched per component. The folder appears at `out` only when
    complete (built next to it, then renamed). Everything is checked before anything is written.
    """
    base, out = Path(base), Path(out)
    target = _folder_target(base)
    dirs, files = scan_tree(base, "the base folder")
    replacing = _check_out(base, out, overwrite, files)
    loras = load_sources(entries, target.family, target.configs, cache or DEFAULT_CACHE)
    recipes = plan(entries, loras, target.unet_config)
    where, shapes = _locate({p for lf in loras for p in lf.patches}, recipes, target, base)
    _refuse_quantized(where)
    check_fit(entries, loras, shapes.get, tuple(target.configs), target.unet_config)

    # file -> {tensor name: recipe}; bias deltas need a bias tensor in the same file
    jobs: dict[Path, dict[str, tuple]] = {}
    for path, recipe in recipes.items():
        name, found, bias_files = where[path]
        has_bias = bool(bias_deltas(torch.zeros(shapes[path][0]), recipe))
        for f in found:
            jobs.setdefault(f, {})[name + ".weight"] = ("weight", recipe)
            if has_bias:
                if f not in bias_files:
                    raise SdloraError(f"{path}: the LoRA changes a bias the model does not have; "
                                      "it cannot be baked into this folder")
                jobs[f][name + ".bias"] = ("bias", recipe)

    clean_stale(out.parent, out.name, log=log)
    try:
        tmp = temp_dir(out.parent, out.name)
        try:
            skipped = _copy_tree(base, tmp, dirs, files, exclude=set(jobs), touched={f.parent for f in jobs})
            counts: dict[str, int] = {}
            for f, patches in jobs.items():
                _patch_file(f, tmp / f.relative_to(base), patches, device)
                comp = f.parent.name
                counts[comp] = counts.get(comp, 0) + sum(1 for kind, _ in patches.values() if kind == "weight")
            replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as e:
        raise SdloraError(f"cannot write {out}: {explain_oserror(e)}. Nothing was changed: "
                          f"{'the old ' + str(out) + ' is still there' if replacing else 'no folder was created'}"
                          ) from e
    if replacing:
        log(f"replaced {out} ({replacing})")
    for f in skipped:
        log(f"note: left out {f.relative_to(base)} (.bin weights of a component whose safetensors were changed)")
    return counts


def _check_out(base: Path, out: Path, overwrite: bool, files: list[Path]) -> str | None:
    """Refuse an `out` whose replacement would lose data; returns what will be replaced, if anything."""
    rb, ro = base.resolve(), out.resolve()
    if ro == rb or rb in ro.parents:
        raise SdloraError(f"output {out} is the base folder or inside it; write to a new folder")
    if ro in rb.parents:
        raise SdloraError(f"output {out} contains the base folder {base}; replacing it would delete the base "
                          "model. Write to a new folder")
    for f in files:
        real = (base / f).resolve()
        if real == ro or ro in real.parents:
            raise SdloraError(f"the base folder's {f} is a link into {out}; replacing {out} would delete it. "
                              "Write to a new folder")
    if not out.parent.is_dir():
        raise SdloraError(f"cannot write {out}: folder {out.parent} does not exist")
    if not (out.exists() or out.is_symlink()):
        return None
    if not overwrite:
        raise SdloraError(f"{out} already exists; pass --overwrite to replace it, or pick another folder")
    if not out.is_dir():
        raise SdloraError(f"{out} is a file, not a folder; --overwrite replaces only a model folder or an empty "
                          "folder. Move the file or pick another output")
    inside = sorted(p.name for p in out.iterdir())
    if not inside:
        return "an empty folder"
    if (out / "model_index.json").is_file():
        return f"a model folder of {len(inside)} entries"
    raise SdloraError(f"{out} is not a model folder (no model_index.json) and holds {len(inside)} entries "
                      f"(e.g. {', '.join(inside[:3])}); --overwrite replaces only a model folder or an empty "
                      "folder, so nothing was touched. Pick another output folder")


def _refuse_quantized(where) -> None:
    """fuse adds ΔW to the stored weights: a quantized folder (int8/uint8/fp8 tensors) has none."""
    for path, (name, files, _) in where.items():
        for f in files:
            with safe_open(str(f), "pt") as sf:
                if name + ".weight" not in sf.keys():
                    continue
                dtype = sf.get_slice(name + ".weight").get_dtype()
            if dtype not in ("F32", "F16", "BF16", "F64"):
                raise SdloraError(f"fuse needs a full-precision base: {path} is stored as {dtype} in {f.name} "
                                  "(a quantized model); fuse into the fp32/fp16/bf16 folder and quantize when "
                                  "loading (--base-precision)")



def _copy_tree(base: Path, dest: Path, dirs, files, exclude: set[Path], touched: set[Path]) -> list[Path]:
    """Copy every file (links followed) except `exclude`; stale .bin weights of touched components are left out."""
    skipped = []
    for d in dirs:
        (dest / d).mkdir(exist_ok=True)
    for rel in files:
        src = base / rel
        if src in exclude:
            continue
        if src.parent in touched and src.name.endswith(".bin"):
            skipped.append(src)
            continue
        shutil.copyfile(src, dest / rel)     # a new file of the user's: umask modes, not the base's (often 0600)
    return skipped


def _patch_file(src: Path, dst: Path, patches: dict[str, tuple], device: str) -> None:
    with safe_open(str(src), "pt") as sf:
        meta = sf.metadata()
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    with torch.no_grad():
        for key, (kind, recipe) in patches.items():
            t = tensors[key]
            if kind == "weight":
                new = fused_weight(t.to(device), recipe)
            else:
                new = fused_bias(t.to(device), bias_deltas(t.to(device), recipe), t)
            tensors[key] = new.to(dtype=t.dtype, device="cpu")
    try:
        save_file(tensors, str(dst), metadata=meta)
    except Exception as e:
        if as_oserror(e) is e:
            raise
        raise as_oserror(e) from e         # disk full inside safetensors: reported as any OSError
    os.chmod(dst, 0o666 & ~umask())        # safetensors writes 0600; the model folder gets normal modes
