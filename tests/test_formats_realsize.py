"""Real-size key sets: a kohya name for every Linear/Conv2d of SD1.5 (UNet + CLIP-L) and SDXL (UNet + both
text encoders) maps completely, and to the same module diffusers' own kohya converter picks."""
import re
from types import SimpleNamespace

import pytest
import torch

from sdlora.families import kohya_name, load_config, module_table
from sdlora.formats import read_lora

pytestmark = pytest.mark.slow


def _diffusers_module(key: str) -> str:
    m = re.match(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.down\.weight$", key)  # old attn-processor names
    if m:
        return f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")
    m = re.match(r"(.*\.self_attn)\.to_(q|k|v|out)_lora\.down\.weight$", key)  # old text-encoder attn names
    if m:
        return f"{m[1]}.{m[2]}_proj"
    for suffix in (".lora.down.weight", ".lora_linear_layer.down.weight", ".lora_A.weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise AssertionError(key)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_every_real_module_maps_and_agrees_with_diffusers(family):
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    table = module_table(family)
    unet_cfg = load_config(family, "unet")
    sd, name_of = {}, {}
    for i, (path, info) in enumerate(table.items()):
        name = kohya_name(path, family, unet_cfg)
        name_of[i] = path
        k = tuple(info.shape[2:])
        sd[f"{name}.lora_down.weight"] = torch.full((1, info.shape[1], *k), float(i))  # tagged with its index
        sd[f"{name}.lora_up.weight"] = torch.zeros(info.shape[0], 1, *([1, 1] if k else []))
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    lf = read_lora(dict(sd), family=family)
    assert not lf.unmatched and set(lf.patches) == set(table)
    assert lf.counts() == {c: sum(p.startswith(c + ".") for p in table) for c in lf.counts()}
    for path, ad in lf.patches.items():  # the tagged tensor landed on its own module
        assert name_of[int(ad.tensors["down"].flatten()[0])] == path

    converted = _maybe_map_sgm_blocks_to_diffusers(dict(sd), SimpleNamespace(**unet_cfg))
    new, _ = _convert_non_diffusers_lora_to_diffusers(converted)
    theirs = {}
    for key, t in new.items():
        if key.endswith((".down.weight", ".lora_A.weight")):
            theirs[name_of[int(t.flatten()[0])]] = _diffusers_module(key)
    assert set(theirs) == set(table)
    assert {ours: mod for ours, mod in theirs.items() if ours != mod} == {}
