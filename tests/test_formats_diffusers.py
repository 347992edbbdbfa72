"""diffusers / PEFT dotted-name files: diffusers' own loading, peft's own DoRA/bias merge, and formulas."""
import json

import pytest
import torch
from safetensors.torch import save_file

from loras import assert_matches_diffusers, linear_conv, lora_pair
from sdlora.formats import read_lora
from tiny import tiny_components, tiny_configs

g = torch.Generator().manual_seed(2)


def peft_state(family, rank=2, prefix_of=lambda p: p, suffix=("lora_A.weight", "lora_B.weight")):
    sd = {}
    for p, info in linear_conv(family).items():
        up, down = lora_pair(info.shape, rank, g)
        sd[f"{prefix_of(p)}.{suffix[0]}"], sd[f"{prefix_of(p)}.{suffix[1]}"] = down, up
    return sd


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_peft_every_module_matches_diffusers(tmp_path, family):
    f = tmp_path / "d.safetensors"
    save_file(peft_state(family), str(f))
    lf = read_lora(f, configs=tiny_configs(family))
    assert lf.family == family and lf.format == "peft" and not lf.unmatched
    assert_matches_diffusers(lf, family, f)


def test_adapter_metadata_alpha_matches_diffusers(tmp_path):
    """alpha from diffusers' `lora_adapter_metadata` (PEFT LoraConfig per component, with alpha_pattern)."""
    sd = peft_state("sd1")
    targets = sorted({k.rsplit(".", 2)[0].split(".", 1)[1] for k in sd if k.startswith("unet.")})
    # without `text_model.`: peft matches by suffix, and transformers 5's CLIPTextModel has no such level
    te_targets = sorted({k.rsplit(".", 2)[0].split(".", 2)[2] for k in sd if k.startswith("text_encoder.")})
    md = {"unet.r": 2, "unet.lora_alpha": 4, "unet.alpha_pattern": {"proj_in": 1.0}, "unet.target_modules": targets,
          "text_encoder.r": 2, "text_encoder.lora_alpha": 8, "text_encoder.target_modules": te_targets}
    f = tmp_path / "d.safetensors"
    save_file(sd, str(f), metadata={"lora_adapter_metadata": json.dumps(md)})
    lf = read_lora(f, family="sd1", configs=tiny_configs("sd1"))
    assert lf.patches["unet.down_blocks.0.attentions.0.proj_in"].scale == 0.5
    assert lf.patches["unet.down_blocks.0.attentions.0.proj_out"].scale == 2.0
    assert lf.patches["text_encoder.text_model.encoder.layers.0.mlp.fc1"].scale == 4.0
    assert_matches_diffusers(lf, "sd1", f)


FLAVOURS = {  # file key (module part) -> canonical path, for older and raw spellings
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.{}.weight":
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.{}.weight":
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora.{}.weight":
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.{}.weight":
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    "base_model.model.up_blocks.1.attentions.0.proj_in.lora_{}.default.weight":
        "unet.up_blocks.1.attentions.0.proj_in",
    "base_model.model.text_model.encoder.layers.1.mlp.fc2.lora_{}.weight":
        "text_encoder.text_model.encoder.layers.1.mlp.fc2",
    "text_encoder.encoder.layers.1.self_attn.v_proj.lora_{}.weight":  # saved from a transformers-5 CLIPTextModel
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj",
    "unet.down_blocks.1.resnets.0.conv1.lora_{}.default.weight": "unet.down_blocks.1.resnets.0.conv1",
}


def test_old_and_raw_dotted_flavours_by_formula(tmp_path):
    T = linear_conv("sd1")
    sd, expect = {}, {}
    for pattern, path in FLAVOURS.items():
        up, down = lora_pair(T[path].shape, 2, g)
        names = ("A", "B") if "lora_{}" in pattern else ("down", "up")
        sd[pattern.format(names[0])], sd[pattern.format(names[1])] = down, up
        expect[path] = (up, down)
    f = tmp_path / "o.safetensors"
    save_file(sd, str(f))
    lf = read_lora(f, family="sd1", configs=tiny_configs("sd1"))
    assert set(lf.patches) == set(expect) and not lf.unmatched
    for path, (up, down) in expect.items():
        W = torch.zeros(T[path].shape)
        ref = (up.reshape(up.shape[0], 2) @ down.reshape(2, -1)).reshape(W.shape)  # no alpha: scale 1
        torch.testing.assert_close(lf.patches[path].delta(W), ref, msg=path)


def _peft_unet(config_kwargs, targets):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet = tiny_components("sd1")["unet"]
    unet.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=targets, **config_kwargs))
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in n else 0.0))
    return unet, {"unet." + k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


TARGETS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
           "down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in"]


@pytest.mark.parametrize("kind", ["dora", "bias"])
def test_peft_dora_and_lora_bias_match_peft_merge(tmp_path, kind):
    """PEFT DoRA (`lora_magnitude_vector`, [out] or conv [1, out, 1, 1]) and `lora_B.bias` vs peft's own merge."""
    targets = TARGETS if kind == "dora" else TARGETS[1:]  # lora_bias needs layers with a bias (to_q has none)
    unet, sd = _peft_unet({"use_dora": True} if kind == "dora" else {"lora_bias": True}, targets)
    assert any("magnitude" in k for k in sd) if kind == "dora" else any(k.endswith("lora_B.bias") for k in sd)
    md = {"unet.r": 2, "unet.lora_alpha": 3, "unet.target_modules": targets}
    f = tmp_path / "p.safetensors"
    save_file(sd, str(f), metadata={"lora_adapter_metadata": json.dumps(md)})
    layer = {t: unet.get_submodule(t).base_layer for t in targets}
    base = {t: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()) for t, m in layer.items()}
    for t in targets:
        unet.get_submodule(t).merge()  # peft's own merge (DoRA: magnitude / ‖W + ΔW‖ per output row)
    lf = read_lora(f, family="sd1", configs=tiny_configs("sd1"))
    assert set(lf.patches) == {"unet." + t for t in targets} and lf.format == "peft"
    for t in targets:
        ad, (w0, b0) = lf.patches["unet." + t], base[t]
        assert (ad.algorithm == "dora") == (kind == "dora")
        merged = unet.get_submodule(t).base_layer
        torch.testing.assert_close(ad.apply(w0, 1.0), merged.weight.detach(), rtol=1e-4, atol=1e-5, msg=t)
        if kind == "bias":
            torch.testing.assert_close(b0 + ad.bias_delta(b0), merged.bias.detach(), rtol=1e-5, atol=1e-6)
