"""Per-block weights in the A1111 "LoRA Block Weight" (LBW) conventions.

hako-mikan/sd-webui-lora-block-weight (scripts/lora_block_weight.py) defines 26 slots: BASE (every
text encoder), IN00-IN11 (LDM `input_blocks.0..11`), M00 (`middle_block`), OUT00-OUT11
(`output_blocks.0..11`). Users write `lbw=` as a preset name or as 12/17/20/26 comma-separated
values; the count picks the list of slots the values are for:
  17: SD1/SD2 blocks that hold attention (what a default kohya LoRA touches), 26: every slot,
  12: SDXL attention blocks, 20: every SDXL block (SDXL has no IN09-11 / OUT09-11).

Two rules follow LBW exactly (`to26`, `ratiodealer`):
  * a slot the chosen list does not name gets weight 0 (a 17-value list switches the resnet-only
    blocks of a LoCon off). kohya's svd_merge_lora `--lbws` leaves them at 1 instead;
  * a module outside every block (time embedding, SDXL add-embedding, conv_norm_out/conv_out)
    keeps the plain multiplier (LBW: "not picked" -> ratio 1; svd_merge_lora: index -1 -> no lbw).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from sdlora.errors import SdloraError
from sdlora.families import block_slot

SLOTS = ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))

LISTS: dict[int, tuple[str, ...]] = {
    26: SLOTS,
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(3, 12)),
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00") + tuple(f"OUT{i:02d}" for i in range(6)),
    20: ("BASE",) + tuple(f"IN{i:02d}" for i in range(9)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(9)),
}


def _preset(spec: str) -> tuple[float, ...]:
    return tuple(float(v) for v in spec.split(","))


# LBW's built-in presets (DEF_WEIGHT_PRESET), all 17-value lists.
PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": _preset("0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "ALL": _preset("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
    "INS": _preset("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "IND": _preset("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "INALL": _preset("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "MIDD": _preset("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    "OUTD": _preset("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    "OUTS": _preset("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    "OUTALL": _preset("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    "ALL0.5": _preset("0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"),
}

BlockSpec = str | Sequence[float] | Mapping[str, float]


def _bad(spec, found: str) -> SdloraError:
    return SdloraError(f"block weights {spec!r}: {found}; expected a preset name ({', '.join(PRESETS)}) or "
                       "12, 17, 20 or 26 comma-separated numbers (A1111 LoRA Block Weight lists)")


def parse_lbw(spec: BlockSpec) -> dict[str, float]:
    """Weights of all 26 slots from a preset name, a comma list / sequence of numbers, or {slot: weight}.

    A mapping names slots directly; slots it leaves out keep weight 1.
    """
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in SLOTS]
        if unknown:
            raise _bad(spec, f"unknown slot(s) {', '.join(map(str, unknown))} (slots are {', '.join(SLOTS)})")
        weights = dict.fromkeys(SLOTS, 1.0)
        weights.update({k: _number(spec, v) for k, v in spec.items()})
        return weights
    if isinstance(spec, str):
        text = spec.strip()
        name = text.upper()
        if name in PRESETS:
            values = list(PRESETS[name])
        elif "," in text or _is_number(text):
            values = [_number(spec, v) for v in text.split(",")]
        else:
            raise _bad(spec, "not a preset name")
    else:
        values = [_number(spec, v) for v in spec]
    if len(values) not in LISTS:
        raise _bad(spec, f"{len(values)} values")
    weights = dict.fromkeys(SLOTS, 0.0)
    weights.update(zip(LISTS[len(values)], values))
    return weights


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(spec, v) -> float:
    try:
        x = float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError):
        raise _bad(spec, f"{v!r} is not a number") from None
    if not math.isfinite(x):
        raise _bad(spec, f"{v!r} is not a finite number")
    return x


def block_weight(weights: Mapping[str, float], canonical_path: str, unet_config) -> float:
    """The block factor of one module: its slot's weight, or 1 outside every block."""
    slot = block_slot(canonical_path, unet_config)
    return 1.0 if slot is None else weights[slot]
