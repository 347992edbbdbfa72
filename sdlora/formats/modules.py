"""Turn one module's tensors (by normalized part) into an adapter (docs/formats.md "From tensors to an adapter").

The algorithm is the first of adapters.ALGORITHMS (ComfyUI's detection order) that claims the
parts, and it builds itself from them. What is generic is done here, for every algorithm: the
modifiers `alpha`, `scale`, A1111 `bias`, LyCORIS' sparse `bias_indices/bias_values/bias_size`,
`diff_b` beside a LoRA (ComfyUI), `dora_scale` / PEFT `lora_magnitude_vector` (wraps the adapter
in DoRA), and the shape check.
"""
from __future__ import annotations

import torch

from sdlora.adapters import ALGORITHMS, Adapter, DoRA, scalar
from sdlora.errors import LoraFormatError

# parts any algorithm may carry beside its own (the algorithms' own parts: adapters.known_parts())
MODIFIERS = ("alpha", "scale", "bias", "dora_scale", "magnitude", "diff_b")
SPARSE_PARTS = ("bias_indices", "bias_values", "bias_size")


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
    cls = next((a for a in ALGORITHMS if a.claims(parts)), None)
    if cls is None:
        raise LoraFormatError(f"{module}: no known LoRA algorithm for parts {sorted(parts)}")
    ad = cls.build(module, parts, alpha=alpha, scale=scale, offset=offset)
    used |= (set(cls.parts) | set(cls.modifiers)) & parts.keys()
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
