"""`sdlora inspect PATH [--json]`: what a LoRA file is, for people and for machines.

Format, algorithm(s), family (and why), rank/alpha from the tensors (metadata can say "Dynamic"),
modules per component, metadata (`ss_*`, `modelspec.*`, `ssmd_*`; the huge `ssmd_cover_images`
dropped), trigger words (docs/formats.md "Trigger words" order) and the ecosystem's hashes.
`inspect_lora(path)` returns the same information as a dict (the UI's library uses it).
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

from sdlora.hashes import lora_hashes

FAMILIES = ("sd1", "sd2", "sdxl")  # --family choices (sdlora.formats, which needs torch, loads on use)

DROPPED_METADATA = ("ssmd_cover_images",)
TOP_TAGS = 10


def _json(value: str):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return None


def _split_words(text: str) -> list[str]:
    return [w.strip() for w in str(text).split(",") if w.strip()]


def trigger_words(metadata: dict[str, str], path: Path | None = None, embeddings=(), top: int = TOP_TAGS):
    """(words, where they came from), in the order of docs/formats.md "Trigger words"."""
    if metadata.get("ssmd_keywords", "").strip():
        return _split_words(metadata["ssmd_keywords"]), "ssmd_keywords"
    if metadata.get("modelspec.trigger_phrase", "").strip():
        return _split_words(metadata["modelspec.trigger_phrase"]), "modelspec.trigger_phrase"
    if path is not None:
        info = path.with_name(path.name.rsplit(".", 1)[0] + ".civitai.info")
        words = (_json(info.read_text(encoding="utf-8", errors="replace")) or {}).get("trainedWords") \
            if info.is_file() else None
        if words:
            return [str(w).strip() for w in words if str(w).strip()], info.name
    freq = _json(metadata.get("ss_tag_frequency", ""))
    if isinstance(freq, dict):
        total = Counter()
        for tags in freq.values():
            if isinstance(tags, dict):
                total.update({str(t).strip(): int(n) for t, n in tags.items() if str(t).strip()})
        if total:
            return [t for t, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:top]], "ss_tag_frequency"
    dirs = _json(metadata.get("ss_dataset_dirs", ""))
    if isinstance(dirs, dict) and dirs:
        names = [d.split("_", 1)[1] if d.split("_", 1)[0].isdigit() and "_" in d else d for d in dirs]
        return [n for n in names if n], "ss_dataset_dirs"
    if embeddings:
        return list(embeddings), "bundle_emb"
    return [], ""


def display_name(metadata: dict[str, str], path: Path | None) -> str:
    for key in ("ssmd_display_name", "modelspec.title", "ss_output_name"):
        if metadata.get(key, "").strip():
            return metadata[key].strip()
    return path.name.rsplit(".", 1)[0] if path else ""


def _spread(values) -> dict:
    c = Counter(v for v in values if v is not None)
    return {"min": min(c) if c else None, "max": max(c) if c else None,
            "counts": {str(k): n for k, n in sorted(c.items())}}


def inspect_lora(path, *, family: str | None = None) -> dict:
    """Everything `sdlora inspect` shows, as a JSON-serialisable dict. Raises LoraFormatError for non-LoRAs."""
    from sdlora.formats import read_header, read_lora
    from sdlora.formats.detect import SD_FAMILIES
    path = Path(path)
    header = read_header(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lf = read_lora(path, family=family, allow_partial=True, check_shapes=False)
    metadata = {k: (f"<{len(v)} characters dropped>" if k in DROPPED_METADATA else v)
                for k, v in sorted(lf.metadata.items())}
    words, source = trigger_words(lf.metadata, path, lf.embeddings)
    ads = list(lf.patches.values())
    conv = sorted(p for p, ad in lf.patches.items()
                  if any(t.dim() == 4 and t.shape[2:] != (1, 1) for t in ad.tensors.values()))
    return {
        "path": str(path), "name": display_name(lf.metadata, path), "container": lf.container,
        "format": lf.format, "algorithms": lf.algorithms,
        "family": lf.family, "family_label": SD_FAMILIES[lf.family], "family_evidence": lf.family_evidence,
        "modules": lf.counts(), "total_modules": len(lf.patches),
        "has_text_encoder": any(not p.startswith("unet.") for p in lf.patches),
        "conv_modules": len(conv),
        "rank": _spread(ad.rank for ad in ads),
        "alpha": _spread(ad.alpha for ad in ads),
        "tensors": len(header.tensors), "dtypes": dict(Counter(t.dtype for t in header.tensors.values())),
        "size_bytes": header.file_size,
        "trigger_words": words, "trigger_source": source, "embeddings": list(lf.embeddings),
        "metadata": metadata, "hashes": lora_hashes(path), "unmatched": lf.unmatched,
        "shape_misfits": lf.misfits,  # vs the family's real-size model
        "notes": lf.notes,  # e.g. metadata that contradicts the tensors, a sparse residual applied
    }


def format_text(info: dict, width: int = 100) -> str:
    def spread(s):
        if s["min"] is None:
            return "-"
        return f"{s['min']:g}" if s["min"] == s["max"] else f"{s['min']:g}..{s['max']:g} ({s['counts']})"
    lines = [
        f"{info['name']}  ({info['path']})",
        f"  format      {info['format']} ({info['container']}), algorithms: {', '.join(info['algorithms']) or '-'}",
        f"  family      {info['family_label']}  [{info['family_evidence']}]",
        f"  modules     {info['total_modules']}: " + ", ".join(f"{c} {n}" for c, n in info["modules"].items())
        + (f"; conv layers {info['conv_modules']}" if info["conv_modules"] else ""),
        f"  rank        {spread(info['rank'])}",
        f"  alpha       {spread(info['alpha'])}",
        f"  tensors     {info['tensors']} ({', '.join(f'{k} {v}' for k, v in info['dtypes'].items())}), "
        f"{info['size_bytes'] / 1e6:.1f} MB",
        f"  triggers    {', '.join(info['trigger_words']) or '-'}"
        + (f"  [{info['trigger_source']}]" if info["trigger_source"] else ""),
    ]
    if info["embeddings"]:
        lines.append(f"  embeddings  {', '.join(info['embeddings'])}")
    h = info["hashes"]
    lines.append(f"  sha256      {h['sha256']}  (AutoV2 {h['autov2']})")
    if "addnet" in h:
        lines.append(f"  addnet      {h['addnet']}  (A1111 'Lora hashes': {h['addnet_short']})")
    for note in info["notes"]:
        lines.append(f"  note        {note}")
    if info["unmatched"]:
        lines.append(f"  NOT PLACED  {len(info['unmatched'])} keys: {', '.join(info['unmatched'][:10])}")
    if info["shape_misfits"]:
        lines.append(f"  MISFITS     {len(info['shape_misfits'])} modules do not fit a real-size {info['family_label']} "
                     f"model, e.g. {info['shape_misfits'][0]}")
    if info["metadata"]:
        lines.append("  metadata")
        for k, v in info["metadata"].items():
            v = v.replace("\n", " ")
            lines.append(f"    {k}: {v if len(v) <= width else v[:width] + f'... ({len(v)} chars)'}")
    return "\n".join(lines)


def add_arguments(parser, name=None):
    parser.add_argument("path", help="a LoRA file (.safetensors, or .pt/.ckpt with plain tensors)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    parser.add_argument("--family", choices=FAMILIES, default=None,
                        help="check the file against this model family (default: detect it)")


def run(args) -> int:
    info = inspect_lora(args.path, family=args.family)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_text(info))
    return 0
