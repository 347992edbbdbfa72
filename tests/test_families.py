"""LDM <-> diffusers UNet names checked against diffusers' own single-file checkpoint converter."""
import pytest
import torch

from sdlora import families as F


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_ldm_names_match_diffusers_converter(family):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = F.load_config(family, "unet")
    unet = F.build_component(family, "unet")
    state = unet.state_dict()
    # an LDM checkpoint written with our names; each tensor tagged by its index so we can follow it
    ldm, expected = {}, {}
    for i, (name, t) in enumerate(state.items()):
        module, _, param = name.rpartition(".")
        ldm_module = F.ldm_unet_name(module, config)
        assert ldm_module is not None, name
        ldm["model.diffusion_model." + ldm_module + "." + param] = torch.full((1,), float(i))
        expected[name] = float(i)
    converted = convert_ldm_unet_checkpoint(ldm, config)
    got = {k: float(v[0]) for k, v in converted.items()}
    assert got == expected


def test_block_slots_sd1():
    cfg = F.load_config("sd1", "unet")
    assert F.block_slot("unet.down_blocks.0.attentions.1.proj_in", cfg) == "IN02"
    assert F.block_slot("unet.mid_block.attentions.0.proj_out", cfg) == "M00"
    assert F.block_slot("unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k", cfg) == "OUT11"
    assert F.block_slot("unet.up_blocks.0.upsamplers.0.conv", cfg) == "OUT02"
    assert F.block_slot("text_encoder.text_model.encoder.layers.0.mlp.fc1", cfg) == "BASE"
    assert F.block_slot("unet.time_embedding.linear_1", cfg) is None
