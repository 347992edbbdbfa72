"""The writer's kohya and diffusers files, loaded by diffusers itself, give our ΔW."""
import pytest
import torch

from sdlora.adapters import LoRA
from sdlora.errors import SdloraError
from sdlora.families import live_path
from sdlora.formats.writer import save_lora
from tiny import lora_pipeline, tiny_components

TARGETS = [f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{p}" for p in ("q", "k", "v", "out.0")] + \
    [f"text_encoder.text_model.encoder.layers.1.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]


def _patches(comps, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in TARGETS:
        comp = path.split(".")[0]
        w = comps[comp].get_submodule(live_path(comps[comp], path)).weight
        out[path] = LoRA(torch.randn(w.shape[0], 4, generator=g), torch.randn(4, w.shape[1], generator=g), alpha=2.0)
    return out


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_loads_what_we_write(tmp_path, fmt):
    comps = tiny_components("sd1")
    patches = _patches(comps)
    before = {p: comps[p.split(".")[0]].get_submodule(live_path(comps[p.split(".")[0]], p)).weight.clone() for p in TARGETS}
    save_lora(tmp_path / "x.safetensors", patches, "sd1", fmt=fmt, metadata={"ss_network_dim": 4})
    pipe = lora_pipeline("sd1", comps)
    pipe.load_lora_weights(str(tmp_path / "x.safetensors"))
    pipe.fuse_lora()
    for p in TARGETS:
        comp = comps[p.split(".")[0]]
        got = comp.get_submodule(live_path(comp, p)).weight - before[p]
        torch.testing.assert_close(got, patches[p].delta(before[p]), rtol=1e-5, atol=1e-5)


def test_unwritable_path_is_a_clear_error(tmp_path):
    with pytest.raises(SdloraError, match="does not exist"):
        save_lora(tmp_path / "nope" / "x.safetensors", {}, "sd1")
    assert not list(tmp_path.iterdir())
