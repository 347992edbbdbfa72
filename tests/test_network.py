"""sdlora.network: live LoRA layers vs. what diffusers makes of the file we write, and vs. W + ΔW."""
import pytest
import torch

from sdlora.errors import SdloraError
from sdlora.families import live_path
from sdlora.network import LoRANetwork, NetworkSpec
from tiny import TE_COMPS, tiny_pipeline
from tiny import probe_inputs as _inputs
from tiny import probe_outputs as _outputs


def _components(pipe):
    return {c: getattr(pipe, c) for c in ("unet",) + TE_COMPS if getattr(pipe, c, None) is not None}


def _randomize_up(net, seed=0):
    """Give every up matrix random values (they start at zero). Training a few steps does not do
    this reliably: self-attention over a single token (the tiny UNet's mid block) has exactly zero
    gradient for q and k, so those ups stay zero and only rounding noise could make them move."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in net.items():
            layer.lora_up.copy_(0.1 * torch.randn(layer.lora_up.shape, generator=gen))
    assert all(layer.lora_up.abs().sum() > 0 for _, layer in net.items())


SPEC = NetworkSpec(rank=4, alpha=2.0, unet_groups=("attn", "proj", "ff"), text_groups=("attn", "mlp"))


LOCON = NetworkSpec(rank=4, alpha=2.0, unet_groups=("attn", "conv"), conv_rank=2, conv_alpha=3.0,
                    text_groups=("attn",))


@pytest.mark.parametrize("family,fmt,spec", [("sd1", "kohya", SPEC), ("sdxl", "kohya", SPEC), ("sd1", "diffusers", SPEC),
                                             ("sd2", "kohya", SPEC), ("sd1", "kohya", LOCON)])
def test_diffusers_load_lora_weights_matches_live_network(tmp_path, family, fmt, spec):
    pipe = tiny_pipeline(family)
    inputs = _inputs(pipe)
    net = LoRANetwork.inject(_components(pipe), spec)
    _randomize_up(net)
    net.eval()
    live = _outputs(pipe, inputs)
    path = tmp_path / "lora.safetensors"
    net.save(path, family, fmt=fmt, unet_config=pipe.unet.config)

    fresh = tiny_pipeline(family)               # same seed: the same base weights
    base = _outputs(fresh, inputs)
    fresh.load_lora_weights(str(path))
    theirs = _outputs(fresh, inputs)
    for comp in live:
        assert not torch.allclose(live[comp], base[comp], atol=1e-4), comp  # the LoRA does something
        torch.testing.assert_close(theirs[comp], live[comp], rtol=1e-4, atol=1e-5, msg=comp)


def test_kohya_keys_are_canonical_whatever_transformers_calls_the_modules(tmp_path):
    pipe = tiny_pipeline("sdxl")
    assert not hasattr(pipe.text_encoder, "text_model")       # transformers 5 flattened CLIPTextModel
    net = LoRANetwork.inject(_components(pipe), SPEC)
    keys = set(net.state_dict_for("sdxl", unet_config=pipe.unet.config))
    for k in ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
              "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_up.weight",
              "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.alpha",
              "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
              "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj.lora_up.weight",
              "lora_unet_output_blocks_0_1_proj_out.alpha"):
        assert k in keys, k
    pipe1 = tiny_pipeline("sd1")
    net1 = LoRANetwork.inject(_components(pipe1), SPEC)
    keys1 = set(net1.state_dict_for("sd1", unet_config=pipe1.unet.config))
    for k in ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
              "lora_unet_up_blocks_3_attentions_2_proj_in.alpha"):
        assert k in keys1, k
    assert not any(".text_model" not in p and p.startswith("text_encoder") for p in net1.paths)


def test_live_layer_equals_merged_weight_and_remove_restores():
    """Independent reference: the hooked module computes x @ (W + alpha/r · up @ down)^T + b."""
    pipe = tiny_pipeline("sd1")
    inputs = _inputs(pipe)
    before = _outputs(pipe, inputs)
    spec = NetworkSpec(rank=3, alpha=5.0, unet_groups=("attn", "conv"), conv_rank=2, conv_alpha=1.0,
                       text_groups=("attn",))
    net = LoRANetwork.inject(_components(pipe), spec)
    with torch.no_grad():
        for _, layer in net.items():
            layer.lora_up.normal_()
    for path in ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                 "unet.down_blocks.0.resnets.0.conv1", "unet.up_blocks.0.upsamplers.0.conv",
                 "text_encoder.text_model.encoder.layers.1.self_attn.out_proj"):
        comp = path.split(".")[0]
        mod = getattr(pipe, comp).get_submodule(live_path(getattr(pipe, comp), path))
        layer = net.layer(path)
        up, down = layer.lora_up.detach(), layer.lora_down.detach()
        d = torch.einsum("or,rk->ok", up.flatten(1), down.flatten(1)).reshape(mod.weight.shape)
        w = mod.weight + layer.alpha / layer.rank * d
        if layer.is_conv:
            x = torch.randn(1, mod.in_channels, 6, 6)
            ref = torch.nn.functional.conv2d(x, w, mod.bias, mod.stride, mod.padding)
        else:
            x = torch.randn(4, mod.in_features)
            ref = torch.nn.functional.linear(x, w, mod.bias)
        with torch.no_grad():
            torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)
    assert net.layer("unet.down_blocks.0.resnets.0.conv1").rank == 2          # 3x3: conv rank
    assert net.layer("unet.down_blocks.0.resnets.0.time_emb_proj").rank == 3  # linear: network rank
    net.remove()
    after = _outputs(pipe, inputs)
    for comp in before:
        assert torch.equal(before[comp], after[comp])


def test_fp16_base_keeps_fp32_lora_weights():
    pipe = tiny_pipeline("sd1")
    pipe.unet.to(torch.bfloat16)
    net = LoRANetwork.inject({"unet": pipe.unet}, NetworkSpec(rank=2, alpha=2))
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
    sample, t, ctx, kw, _ = _inputs(pipe)
    out = pipe.unet(sample.bfloat16(), t, ctx.bfloat16()).sample
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


def test_init_is_identity_and_kohya_like():
    pipe = tiny_pipeline("sd1")
    inputs = _inputs(pipe)
    before = _outputs(pipe, inputs)
    torch.manual_seed(0)
    net = LoRANetwork.inject(_components(pipe), NetworkSpec(rank=8, alpha=4, text_groups=("attn",)))
    after = _outputs(pipe, inputs)
    for comp in before:
        assert torch.equal(before[comp], after[comp])
    layer = net.layer("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    bound = 1 / layer.lora_down.shape[1] ** 0.5          # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    assert layer.lora_down.abs().max() <= bound and layer.lora_down.abs().max() > 0.5 * bound
    assert layer.scale == 0.5


def test_bad_specs_and_double_injection_are_clear_errors():
    pipe = tiny_pipeline("sd1")
    with pytest.raises(SdloraError, match="unknown LoRA target group"):
        LoRANetwork.inject({"unet": pipe.unet}, NetworkSpec(unet_groups=("attention",)))
    with pytest.raises(SdloraError, match="conv rank"):
        LoRANetwork.inject({"unet": pipe.unet}, NetworkSpec(unet_groups=("conv",)))
    LoRANetwork.inject({"unet": pipe.unet}, NetworkSpec())
    with pytest.raises(SdloraError, match="already has a hooked forward"):
        LoRANetwork.inject({"unet": pipe.unet}, NetworkSpec())


def test_load_kohya_round_trip_and_mismatch():
    pipe = tiny_pipeline("sd1")
    net = LoRANetwork.inject({"unet": pipe.unet}, NetworkSpec(rank=2))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    sd = net.state_dict_for("sd1")
    net.remove()
    pipe2 = tiny_pipeline("sd1")
    net2 = LoRANetwork.inject({"unet": pipe2.unet}, NetworkSpec(rank=2))
    net2.load_kohya(sd, "sd1")
    for (_, a), (_, b) in zip(net.items(), net2.items()):
        assert torch.equal(a.lora_down, b.lora_down) and torch.equal(a.lora_up, b.lora_up)
    net2.remove()
    net3 = LoRANetwork.inject({"unet": tiny_pipeline("sd1").unet}, NetworkSpec(rank=4))
    with pytest.raises(SdloraError, match="shape"):
        net3.load_kohya(sd, "sd1")
