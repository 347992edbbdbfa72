"""kohya / A1111 / LyCORIS underscore-named files: every module of the tiny SD1/SD2/SDXL models.

Plain LoRA/LoCon is checked against diffusers' own load_lora_weights + fuse_lora; LyCORIS
algorithms (which diffusers does not load) against formulas written out here.
"""
import pytest
import torch
from safetensors.torch import save_file

from loras import assert_matches_diffusers, linear_conv, lora_pair, table
from sdlora.families import kohya_name
from sdlora.formats import read_lora
from tiny import tiny_configs

g = torch.Generator().manual_seed(1)


def kohya_file(path, family, *, ldm=None, rank=2, skip=(), metadata=None, varied_alpha=False):
    """Every Linear/Conv2d as kohya LoRA/LoCon, some tensors fp16. Alpha: one BF16 0-dim value, or
    (varied_alpha) per module a float, a BF16 value or none at all."""
    cfg = tiny_configs(family)
    sd = {}
    for i, (p, info) in enumerate(linear_conv(family).items()):
        if any(s in p for s in skip):
            continue
        name = kohya_name(p, family, cfg["unet"], ldm=ldm)
        dtype = torch.float16 if i % 3 == 0 else torch.float32
        up, down = lora_pair(info.shape, rank, g, dtype)
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
        if not varied_alpha:
            sd[f"{name}.alpha"] = torch.tensor(1.5, dtype=torch.bfloat16)
        elif i % 4 == 1:
            sd[f"{name}.alpha"] = torch.tensor(1.0 + i % 3, dtype=torch.bfloat16)
        elif i % 4 != 3:  # i % 4 == 3: no alpha (= rank)
            sd[f"{name}.alpha"] = torch.tensor(float(1 + i % 5))
    save_file(sd, str(path), metadata=metadata)
    return sd


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_every_module_matches_diffusers(tmp_path, family):
    f = tmp_path / "k.safetensors"
    kohya_file(f, family)
    lf = read_lora(f, family=family, configs=tiny_configs(family))
    assert lf.format == "kohya" and lf.family == family and not lf.unmatched
    assert sum(lf.counts().values()) == len(lf.patches) == len(linear_conv(family))
    assert "locon" in lf.algorithms  # 3x3 convs of resnets/samplers
    assert_matches_diffusers(lf, family, f)


def assert_lora_formula(lf, sd, family, ldm=None):
    """Each patch's ΔW = up @ down · (alpha/rank, or 1 without alpha), from the file's tensors by kohya name."""
    cfg = tiny_configs(family)
    assert len(lf.patches) == sum(k.endswith(".lora_up.weight") for k in sd) and not lf.unmatched
    for p, ad in lf.patches.items():
        name = kohya_name(p, family, cfg["unet"], ldm=ldm)
        up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
        r = down.shape[0]
        scale = float(sd[f"{name}.alpha"].float()) / r if f"{name}.alpha" in sd else 1.0
        W = torch.zeros(linear_conv(family)[p].shape)
        ref = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(W.shape) * scale
        torch.testing.assert_close(ad.delta(W), ref, msg=p)


def test_per_module_and_missing_alpha_by_formula(tmp_path):
    """alpha/rank per module, missing alpha = rank (kohya, A1111). diffusers 0.42 is no reference here: it
    maps per-module alphas to PEFT alpha_pattern keys that match no module and ignores them (it warns)."""
    f = tmp_path / "k.safetensors"
    sd = kohya_file(f, "sd1", varied_alpha=True)
    assert_lora_formula(read_lora(f, family="sd1", configs=tiny_configs("sd1")), sd, "sd1")


def test_sd1_ldm_names(tmp_path):
    """SD1 files with LDM UNet names (converted from compvis). diffusers does not load these (it reports them as
    unexpected keys); the LDM<->diffusers map is checked against diffusers' checkpoint converter in test_families."""
    f = tmp_path / "k.safetensors"
    sd = kohya_file(f, "sd1", ldm=True, varied_alpha=True)
    assert "lora_unet_input_blocks_1_1_proj_in.lora_up.weight" in sd and "lora_unet_out_2.lora_up.weight" in sd
    lf = read_lora(f, configs=tiny_configs("sd1"))
    assert lf.family == "sd1"
    assert_lora_formula(lf, sd, "sd1", ldm=True)


def test_sdxl_diffusers_names_under_kohya_prefix(tmp_path):
    f = tmp_path / "k.safetensors"
    # diffusers 0.42 turns `lora_unet_add_embedding_linear_1` into "add.embedding.linear" and drops it, so
    # the reference file leaves add_embedding out (LDM `label_emb` names are checked in the test above)
    sd = kohya_file(f, "sdxl", ldm=False, skip=("add_embedding",))
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0") for k in sd)
    lf = read_lora(f, configs=tiny_configs("sdxl"))  # family detected from names
    assert lf.family == "sdxl"
    assert_matches_diffusers(lf, "sdxl", f)


def _lycoris_file(path, prefix_te="lora_te_"):
    """One module per LyCORIS algorithm, on the tiny SD1 model, by kohya name; returns {path: (parts, ref_fn)}."""
    T = table("sd1")
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd, refs = {}, {}
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"      # [32, 32]
    # LoHa plain, alpha 1, rank 2
    a1, b1, a2, b2 = r(32, 2), r(2, 32), r(32, 2), r(2, 32)
    sd.update({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q." + k: v for k, v in
               dict(hada_w1_a=a1, hada_w1_b=b1, hada_w2_a=a2, hada_w2_b=b2, alpha=torch.tensor(1.0)).items()})
    refs[q] = lambda W: (a1 @ b1) * (a2 @ b2) * 0.5
    # LoHa CP on a 3x3 conv
    c1 = "unet.down_blocks.0.resnets.0.conv1"
    out, inn = T[c1].shape[:2]
    t1, t2, wa1, wb1, wa2, wb2 = r(2, 2, 3, 3), r(2, 2, 3, 3), r(2, out), r(2, inn), r(2, out), r(2, inn)
    sd.update({"lora_unet_down_blocks_0_resnets_0_conv1." + k: v for k, v in dict(
        hada_t1=t1, hada_t2=t2, hada_w1_a=wa1, hada_w1_b=wb1, hada_w2_a=wa2, hada_w2_b=wb2).items()})
    refs[c1] = lambda W: (torch.einsum("ijhw,ip,jq->pqhw", t1, wa1, wb1)
                          * torch.einsum("ijhw,ip,jq->pqhw", t2, wa2, wb2))
    # LoKr full x full (alpha ignored) on ff.net.2 [32, 128]
    ff = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    k1, k2 = r(4, 8), r(8, 16)
    assert T[ff].shape == (32, 128)
    sd.update({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2." + k: v for k, v in
               dict(lokr_w1=k1, lokr_w2=k2, alpha=torch.tensor(9.0)).items()})
    refs[ff] = lambda W: torch.kron(k1, k2)
    # LoKr factorized w1 and w2 (rank 2, alpha 1) on attn2.to_k
    tk = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    o, i = T[tk].shape
    w1a, w1b, w2a, w2b = r(2, 2), r(2, 4), r(o // 2, 2), r(2, i // 4)
    sd.update({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k." + k: v for k, v in
               dict(lokr_w1_a=w1a, lokr_w1_b=w1b, lokr_w2_a=w2a, lokr_w2_b=w2b, alpha=torch.tensor(1.0)).items()})
    refs[tk] = lambda W: torch.kron(w1a @ w1b, w2a @ w2b) * 0.5
    # full diff + diff_b on to_out.0 (Linear with bias)
    to = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    d, db = r(*T[to].shape), r(T[to].shape[0])
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.diff"] = d
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.diff_b"] = db
    refs[to] = lambda W: d
    # norm on a GroupNorm and on the text encoder's final LayerNorm
    gn = "unet.down_blocks.0.resnets.0.norm1"
    wn, bn = r(T[gn].shape[0]), r(T[gn].shape[0])
    sd["lora_unet_down_blocks_0_resnets_0_norm1.w_norm"], sd["lora_unet_down_blocks_0_resnets_0_norm1.b_norm"] = wn, bn
    refs[gn] = lambda W: wn
    ln = "text_encoder.text_model.final_layer_norm"
    wl = r(T[ln].shape[0])
    sd[prefix_te + "text_model_final_layer_norm.w_norm"] = wl
    refs[ln] = lambda W: wl
    # IA3 on attn1.to_v (output rows)
    tv = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    iw = r(T[tv].shape[0])
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.weight"] = iw
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v.on_input"] = torch.tensor(False)
    refs[tv] = lambda W: W * iw[:, None]
    # OFT on attn1.to_k: 4 blocks of 8, no constraint
    tk1 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    blocks = r(4, 8, 8) * 0.05
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.oft_blocks"] = blocks

    def oft_ref(W):
        out = torch.empty_like(W)
        for k in range(4):
            q_ = blocks[k] - blocks[k].T
            R = (torch.eye(8) + q_) @ torch.linalg.inv(torch.eye(8) - q_)
            out[8 * k:8 * k + 8] = R.T @ W[8 * k:8 * k + 8]
        return out - W
    refs[tk1] = oft_ref
    # DoRA (kohya per-input dora_scale [1, in]) on a text-encoder LoRA
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    up, down = r(32, 2), r(2, 32)
    m = r(1, 32).abs() + 0.5
    sd.update({prefix_te + "text_model_encoder_layers_0_self_attn_q_proj." + k: v for k, v in dict(
        lora_up=None, lora_down=None).items() if v is not None})
    sd[prefix_te + "text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = up
    sd[prefix_te + "text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = down
    sd[prefix_te + "text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(1.0)
    sd[prefix_te + "text_model_encoder_layers_0_self_attn_q_proj.dora_scale"] = m

    def dora_ref(W):
        wc = W + up @ down * 0.5
        return wc * m / (wc.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps) - W
    refs[te] = dora_ref
    # LoHa with per-output dora_scale [out, 1] on mlp.fc1 (LyCORIS wd_on_out)
    fc = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    o, i = T[fc].shape
    h = [r(o, 2), r(2, i), r(o, 2), r(2, i)]
    mo = r(o, 1).abs() + 0.5
    for n, v in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), h):
        sd[f"{prefix_te}text_model_encoder_layers_0_mlp_fc1.{n}"] = v
    sd[f"{prefix_te}text_model_encoder_layers_0_mlp_fc1.dora_scale"] = mo

    def dora_out_ref(W):
        wc = W + (h[0] @ h[1]) * (h[2] @ h[3])
        return wc * mo / (wc.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps) - W
    refs[fc] = dora_out_ref
    save_file(sd, str(path))
    return refs, {"diff_b": (to, db), "b_norm": (gn, bn)}


@pytest.mark.parametrize("te_prefix", ["lora_te_", "lycoris_"])
def test_lycoris_algorithms_by_formula(tmp_path, te_prefix):
    f = tmp_path / "l.safetensors"
    refs, biases = _lycoris_file(f, te_prefix)
    lf = read_lora(f, family="sd1", configs=tiny_configs("sd1"))
    assert lf.format == "lycoris" and set(lf.patches) == set(refs) and not lf.unmatched
    assert set(lf.algorithms) == {"loha", "lokr", "full", "norm", "ia3", "oft", "dora"}
    gen = torch.Generator().manual_seed(5)
    for p, ref in refs.items():
        W = torch.randn(*table("sd1")[p].shape, generator=gen)
        torch.testing.assert_close(lf.patches[p].delta(W), ref(W), rtol=1e-4, atol=1e-4, msg=p)
    for p, b in biases.values():
        torch.testing.assert_close(lf.patches[p].bias_delta(torch.zeros_like(b)), b)


def test_lycoris_prefix_unet_and_text_projection(tmp_path):
    """`lycoris_` UNet names (SimpleTuner) and OneTrainer's `lora_te2_text_projection`."""
    T = table("sdxl")
    sd = {}
    for name, path in [("lycoris_down_blocks_1_attentions_0_proj_in", "unet.down_blocks.1.attentions.0.proj_in"),
                       ("lora_te2_text_projection", "text_encoder_2.text_projection")]:
        up, down = lora_pair(T[path].shape, 2, g)
        sd.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0)})
    f = tmp_path / "x.safetensors"
    save_file(sd, str(f))
    lf = read_lora(f, family="sdxl", configs=tiny_configs("sdxl"))
    assert set(lf.patches) == {"unet.down_blocks.1.attentions.0.proj_in", "text_encoder_2.text_projection"}
    W = torch.zeros(T["text_encoder_2.text_projection"].shape)
    up, down = sd["lora_te2_text_projection.lora_up.weight"], sd["lora_te2_text_projection.lora_down.weight"]
    torch.testing.assert_close(lf.patches["text_encoder_2.text_projection"].delta(W), up @ down * 0.5)


def test_a1111_bias_and_scale_modifiers(tmp_path):
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down = lora_pair((32, 32), 2, g)
    offset = torch.randn(32, 32, generator=g)
    f = tmp_path / "b.safetensors"
    save_file({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(1.0),
               f"{name}.bias": offset, f"{name}.scale": torch.tensor(0.25)}, str(f))
    lf = read_lora(f, family="sd1", configs=tiny_configs("sd1"))
    # A1111 network.py: updown += bias (reshaped), then × calc_scale() where `scale` overrides alpha/dim
    torch.testing.assert_close(lf.patches[path].delta(torch.zeros(32, 32)), (up @ down + offset) * 0.25)
