"""Turn one module's tensors (by normalized part) into an adapter (docs/formats.md "From tensors to an adapter").

Detection order as ComfyUI's `load_lora`: LoRA (up/down), LoHa, LoKr, GLoRA, OFT/BOFT, IA3,
full (`diff`), norm (`w_norm`). Modifiers: `alpha`, `scale`, A1111 `bias`, LyCORIS' sparse
`bias_indices/bias_values/bias_size`, `diff_b` beside a LoRA (ComfyUI), `dora_scale` /
PEFT `lora_magnitude_vector` (wraps the adapter in DoRA).
"""
from __future__ import annotations

import torch

from sdlora.adapters import IA3, OFT, Adapter, DoRA, Full, LoHa, LoKr, LoRA
from sdlora.errors import LoraFormatError

MODIFIERS = {"alpha", "scale", "bias", "dora_scale", "magnitude"}
SPARSE_PARTS = ("bias_indices", "bias_values", "bias_size")


def scalar(t: torch.Tensor, module: str = "", part: str = "value") -> float:
    """A 0-dim (or 1-element) tensor as a float; BF16 works (`.float()` first). Anything else (empty,
    several values, NaN) is a damaged file: guessing which value was meant would patch wrongly."""
    if t.numel() != 1:
        raise LoraFormatError(f"{module}: {part} must be a single number, found a tensor of shape {list(t.shape)} "
                              f"({t.numel()} values); the file is damaged or was written by a broken tool")
    value = float(t.detach().float().reshape(-1)[0])
    if value != value or value in (float("inf"), float("-inf")):
        raise LoraFormatError(f"{module}: {part} is {value}, not a finite number; the file is damaged")
    return value


def _need(parts, module, names, algorithm):
    missing = [n for n in names if n not in parts]
    if missing:
        raise LoraFormatError(f"{module}: incomplete {algorithm} module: has {sorted(parts)} but lacks {missing}")


def sparse_offset(module: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """LyCORIS `extract_linear/extract_conv` residual (lycoris/utils `extract_diff`, use_bias): the part
    of the weight difference the low rank missed, kept as a sparse COO matrix [out, in·kh·kw] stored
    as int16 `bias_indices` [2, nnz], fp16 `bias_values` [nnz] and int16 `bias_size` [2]."""
    missing = [p for p in SPARSE_PARTS if p not in parts]
    if missing:
        raise LoraFormatError(f"{module}: sparse residual has {sorted(set(SPARSE_PARTS) & parts.keys())} but lacks "
                              f"{missing}")
    idx, val, size = (parts[p] for p in SPARSE_PARTS)
    size = tuple(int(n) for n in size.flatten().tolist())
    idx = idx.long()
    if (len(size) != 2 or idx.dim() != 2 or idx.shape[0] != 2 or val.dim() != 1 or idx.shape[1] != val.numel()
            or (idx.numel() and (idx.min() < 0 or (idx.max(dim=1).values >= torch.tensor(size)).any()))):
        raise LoraFormatError(f"{module}: damaged sparse residual: bias_indices {list(idx.shape)}, bias_values "
                              f"{list(val.shape)}, bias_size {list(size)} (need [2, n] indices inside the size)")
    return torch.sparse_coo_tensor(idx, val, size, check_invariants=True).coalesce()


def build_adapter(module: str, parts: dict[str, torch.Tensor], alpha: float | None = None) -> tuple[Adapter, set]:
    """(adapter, the parts it consumed). `alpha` is a fallback (diffusers metadata) when no `alpha` tensor."""
    if "alpha" in parts:
        alpha = scalar(parts["alpha"], module, "alpha")
    scale = scalar(parts["scale"], module, "scale") if "scale" in parts else None
    offset = parts.get("bias")
    used = {"alpha"} & parts.keys()
    if any(p in parts for p in SPARSE_PARTS):
        if offset is not None:
            raise LoraFormatError(f"{module}: has both a dense `bias` offset and a sparse one (bias_indices)")
        # Added to the unscaled update, so alpha/rank and the strength scale it like the rest of the
        # module: InvokeAI does so (its layers add it and multiply by alpha/rank), and the weight-sized
        # A1111 `bias` it generalizes is scaled the same way. LyCORIS writes alpha = rank with it, so the
        # scale is 1 and ΔW = up @ down + residual, the extracted difference, either way.
        offset = sparse_offset(module, parts)
        used |= set(SPARSE_PARTS)
        parts = dict(parts, bias=offset)
    modifiers = {"scale", "bias"} & parts.keys()  # honoured by LoRA/LoHa/LoKr (A1111 finalize_updown)
    if "up" in parts or "down" in parts:
        _need(parts, module, ("up", "down"), "LoRA")
        ad = LoRA(parts["up"], parts["down"], parts.get("mid"), alpha=alpha, bias=parts.get("up_bias"),
                  scale_override=scale, offset=offset)
        used |= ({"up", "down", "mid", "up_bias"} & parts.keys()) | modifiers
    elif "hada_w1_a" in parts:
        names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        _need(parts, module, names, "LoHa")
        if ("hada_t1" in parts) != ("hada_t2" in parts):
            raise LoraFormatError(f"{module}: LoHa has only one of hada_t1/hada_t2")
        ad = LoHa(*(parts[n] for n in names), parts.get("hada_t1"), parts.get("hada_t2"), alpha=alpha,
                  scale_override=scale, offset=offset)
        used |= set(names) | ({"hada_t1", "hada_t2"} & parts.keys()) | modifiers
    elif any(p.startswith("lokr_") for p in parts):
        try:
            ad = LoKr(parts, alpha=alpha, scale_override=scale, offset=offset)
        except ValueError as e:
            raise LoraFormatError(f"{module}: incomplete LoKr module ({e}); has {sorted(parts)}") from None
        used |= {p for p in parts if p.startswith("lokr_")} | modifiers
    elif "a1.weight" in parts:
        raise LoraFormatError(f"{module}: GLoRA modules (a1/a2/b1/b2) are not supported; it is rare in SD files and "
                              "its two tensor layouts cannot be told apart reliably. Convert it to LoRA with LyCORIS.")
    elif "oft_blocks" in parts and parts["oft_blocks"].dim() == 4:
        raise LoraFormatError(f"{module}: BOFT (butterfly OFT, 4-D oft_blocks) is not supported; "
                              "merge it into the model with LyCORIS instead")
    elif "oft_diag" in parts:
        raise LoraFormatError(f"{module}: old LyCORIS OFT (oft_diag) is not supported; re-save it with a current "
                              "LyCORIS (oft_blocks) or merge it with LyCORIS")
    elif "oft_blocks" in parts:
        if parts["oft_blocks"].dim() != 3:
            raise LoraFormatError(f"{module}: oft_blocks must be [blocks, size, size], got {tuple(parts['oft_blocks'].shape)}")
        ad = OFT(parts["oft_blocks"], alpha=alpha, rescale=parts.get("rescale"))
        used |= {"oft_blocks", "rescale"} & parts.keys()
    elif "weight" in parts and "on_input" in parts:
        ad = IA3(parts["weight"], bool(scalar(parts["on_input"], module, "on_input")), scale_override=scale)
        used |= {"weight", "on_input"} | ({"scale"} & parts.keys())
    elif "diff" in parts or "diff_b" in parts:
        ad = Full(parts.get("diff"), parts.get("diff_b"))
        used |= {"diff", "diff_b"} & parts.keys()
    elif "w_norm" in parts or "b_norm" in parts:
        ad = Full(parts.get("w_norm"), parts.get("b_norm"), algorithm="norm")
        used |= {"w_norm", "b_norm"} & parts.keys()
    else:
        raise LoraFormatError(f"{module}: no known LoRA algorithm for parts {sorted(parts)}")
    if "diff_b" in parts and "diff_b" not in ad.tensors:
        # ComfyUI LoraSave (bias_diff=True) writes a bias difference beside a module's lora_up/down
        ad.tensors["diff_b"] = parts["diff_b"]
        used.add("diff_b")
    if "bias_indices" in used and "bias" not in ad.tensors:
        used -= set(SPARSE_PARTS)  # an algorithm that takes no offset: report the residual as unplaced
    if "dora_scale" in parts or "magnitude" in parts:
        axis = "out" if "magnitude" in parts else "auto"  # PEFT: always per output ([out] or [1, out, 1, 1])
        ad = DoRA(ad, parts.get("magnitude", parts.get("dora_scale")), axis=axis)
        used |= {"dora_scale", "magnitude"} & parts.keys()
    problem = ad.shape_problem()
    if problem:
        raise LoraFormatError(f"{module}: {problem}. The file is damaged or was written by a broken tool; "
                              "nothing was loaded")
    return ad, used
