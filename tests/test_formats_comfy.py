"""ComfyUI's own LoRA layout, LyCORIS' sparse residual, and the tensors (not the metadata) deciding the family.

Files are built on the tiny models with their real module names. Expected ΔW come from formulas on the
file's tensors written out here (ComfyUI: no alpha, scale 1; `diff`/`diff_b` added as they are; LoHa
(w1a@w1b)⊙(w2a@w2b)·alpha/r; PEFT B@A; sparse residual: its dense matrix), never from sdlora's adapters.
The ComfyUI UNet names are LDM names whose meaning is taken from diffusers' own checkpoint converter.
"""
import functools
import warnings

import pytest
import torch
from safetensors.torch import save_file

from loras import lora_pair, table
from loras import attention_paths, components, modules, pipeline_folder, weight
from sdlora.errors import LoraFormatError
from sdlora.families import build_unet, kohya_name, ldm_unet_name, live_path
from sdlora.formats import read_lora
from sdlora.inspect import format_text, inspect_lora
from sdlora.merge import fuse, mix_loras
from sdlora.mixing import LoraCache, MixEntry, Mixer
from tiny import tiny_configs

# ComfyUI sd1_clip/sd2_clip/sdxl_clip: which CLIP is which diffusers text encoder
CLIP = {"sd1": {"text_encoder": "clip_l"}, "sd2": {"text_encoder": "clip_h"},
        "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}


def close(got, ref, msg=""):
    """Equal up to float rounding, relative to the size of the values (no thread-count dependence)."""
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-5 * scale, msg=msg)


@functools.lru_cache(maxsize=None)
def comfy_names(family):
    """canonical path -> ComfyUI module name. UNet: `diffusion_model.<LDM name>`, each LDM name checked to
    mean that diffusers module by diffusers' convert_ldm_unet_checkpoint; CLIP: ComfyUI's state-dict names."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    cfg = tiny_configs(family)["unet"]
    state = build_unet(cfg).state_dict()
    ldm, tag = {}, {}
    for i, name in enumerate(state):
        module, _, param = name.rpartition(".")
        ldm["model.diffusion_model." + ldm_unet_name(module, cfg) + "." + param] = torch.full((1,), float(i))
        tag[float(i)] = ldm_unet_name(module, cfg)
    converted = convert_ldm_unet_checkpoint(ldm, cfg)
    out = {}
    for name, t in converted.items():
        module = name.rpartition(".")[0]
        out["unet." + module] = "diffusion_model." + tag[float(t[0])]
    for p in table(family):
        comp, _, name = p.partition(".")
        if comp != "unet":
            out[p] = f"text_encoders.{CLIP[family][comp]}.transformer.{name}"
    return out


def comfy_file(path, family, paths=None, seed=0, biases=True):
    """What ComfyUI LoraSave writes (bias_diff=True): fp16 lora_up/lora_down for ≥2-D weights, `.diff` for
    1-D ones (norms), `.diff_b` for biases, no alpha; plus CLIP-L/H's identity text_projection LoRA."""
    g = torch.Generator().manual_seed(seed)
    T, names = table(family), comfy_names(family)
    sd = {}
    for p in (paths or T):
        info, n = T[p], names[p]
        if len(info.shape) >= 2:
            up, down = lora_pair(info.shape, 2, g, torch.float16)
            sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"] = up, down
        else:
            sd[f"{n}.diff"] = (torch.randn(*info.shape, generator=g) * 0.1).half()
        if info.has_bias and biases:
            sd[f"{n}.diff_b"] = (torch.randn(info.shape[0], generator=g) * 0.1).half()
    if paths is None:
        clip = CLIP[family]["text_encoder"]  # ComfyUI's CLIP-L/H has an identity projection: zero diff
        sd[f"text_encoders.{clip}.transformer.text_projection.lora_up.weight"] = torch.zeros(32, 2).half()
        sd[f"text_encoders.{clip}.transformer.text_projection.lora_down.weight"] = torch.zeros(2, 32).half()
    save_file(sd, str(path))
    return sd


def comfy_delta(sd, n, shape):
    if f"{n}.lora_up.weight" in sd:
        up, down = sd[f"{n}.lora_up.weight"].float(), sd[f"{n}.lora_down.weight"].float()
        return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)  # scale 1
    return sd[f"{n}.diff"].float()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_comfy_layout_every_module_by_formula(tmp_path, family):
    f = tmp_path / "ComfyUI_extracted_lora_00001_.safetensors"
    sd = comfy_file(f, family)
    assert "diffusion_model.input_blocks.1.0.in_layers.2.lora_up.weight" in sd
    for caller in (family, None):  # given, and detected from the keys alone
        lf = read_lora(f, family=caller, configs=tiny_configs(family))
        assert lf.family == family and lf.format == "comfyui" and not lf.unmatched
    T, names = table(family), comfy_names(family)
    assert set(lf.patches) == set(T)  # every Linear/Conv2d/norm/embedding, the no-op projection skipped
    assert any("text_projection skipped" in n for n in lf.notes)
    for p, ad in lf.patches.items():
        close(ad.delta(torch.zeros(T[p].shape)), comfy_delta(sd, names[p], T[p].shape), p)
        if f"{names[p]}.diff_b" in sd:
            close(ad.bias_delta(torch.zeros(T[p].shape[0])), sd[f"{names[p]}.diff_b"], p)
    if family == "sdxl":
        assert "text_encoders.clip_g.transformer.text_projection.lora_up.weight" in sd
        assert "text_encoder_2.text_projection" in lf.patches


def test_comfy_layout_inspect(tmp_path):
    f = tmp_path / "c.safetensors"
    comfy_file(f, "sdxl", paths=[p for p in table("sdxl") if ".encoder.layers.0." in p])  # text encoders only
    info = inspect_lora(f)  # a real-size SDXL model: names place, tiny shapes are listed as misfits
    assert info["format"] == "comfyui" and info["family"] == "sdxl" and "clip_g" in info["family_evidence"]
    assert info["modules"]["text_encoder"] > 0 and info["modules"]["text_encoder_2"] > 0 and not info["unmatched"]


# ---------------------------------------------------------------------------------------------
# LyCORIS extraction's sparse residual

def _sparse(shape, g, keep=0.1):
    dense = torch.randn(*shape, generator=g)
    mask = torch.rand(*shape, generator=g) < keep
    s = (dense * mask).to_sparse().coalesce()  # as lycoris extract_diff: indices int16, values fp16, size int16
    return s.indices().to(torch.int16), s.values().half(), torch.tensor(shape).to(torch.int16)


def test_lycoris_sparse_residual_by_formula(tmp_path):
    T = table("sd1")
    g = torch.Generator().manual_seed(3)
    mods = {"unet.down_blocks.0.resnets.0.conv1": 2.0,                                   # alpha = rank: scale 1
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 1.0}      # scale 0.5
    sd, refs = {}, {}
    for p, alpha in mods.items():
        shape = T[p].shape
        name = kohya_name(p, "sd1")
        up, down = lora_pair(shape, 2, g, torch.float16)
        idx, val, size = _sparse((shape[0], torch.Size(shape[1:]).numel()), g)
        sd.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                   f"{name}.alpha": torch.tensor([alpha]).half(),
                   f"{name}.bias_indices": idx, f"{name}.bias_values": val, f"{name}.bias_size": size})
        resid = torch.zeros(*[int(n) for n in size])
        resid[idx[0].long(), idx[1].long()] = val.float()   # the dense form of the COO matrix
        ref = (up.float().reshape(shape[0], 2) @ down.float().reshape(2, -1) + resid) * (alpha / 2)
        refs[p] = ref.reshape(shape)
    f = tmp_path / "extracted.safetensors"
    save_file(sd, str(f))
    lf = read_lora(f, family="sd1", configs=tiny_configs("sd1"))
    assert set(lf.patches) == set(refs) and not lf.unmatched
    for p, ref in refs.items():
        close(lf.patches[p].delta(torch.zeros(T[p].shape)), ref, p)
    # applied live through the mixer (its cache sizes the file) at a negative strength
    comps = components("sd1")
    w0 = {p: weight(comps, p).detach().clone() for p in refs}
    Mixer(comps, cache=LoraCache()).apply([MixEntry(str(f), unet=-0.7)])
    for p, ref in refs.items():
        close(weight(comps, p), w0[p] - 0.7 * ref, p)
    notes = inspect_lora(f)["notes"]
    assert any("sparse residual" in n and "2 modules" in n for n in notes), notes
    bad = dict(sd)
    bad["lora_unet_down_blocks_0_resnets_0_conv1.bias_size"] = torch.tensor([4, 4]).to(torch.int16)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraFormatError, match="damaged sparse residual"):
        read_lora(tmp_path / "bad.safetensors", family="sd1", configs=tiny_configs("sd1"))


# ---------------------------------------------------------------------------------------------
# the tensors decide the family; metadata is a hint

K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"   # real SD1.5 shapes: [320, 768]


def test_metadata_contradicting_the_tensors_warns_and_loads(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"{K}.lora_down.weight": torch.randn(4, 768, generator=g),
          f"{K}.lora_up.weight": torch.randn(320, 4, generator=g)}
    f = tmp_path / "mislabelled.safetensors"
    save_file(sd, str(f), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.warns(UserWarning) as caught:
        lf = read_lora(f, family="sd1")  # an SD1.5 base: loads
    msg = " ".join(str(w.message) for w in caught)
    assert "SDXL" in msg and "SD1.x" in msg and "ss_base_model_version" in msg, msg
    assert lf.family == "sd1"
    assert list(lf.patches) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert "cross-attention input width 768" in lf.family_evidence
    with pytest.warns(UserWarning):
        assert read_lora(f).family == "sd1"  # detected: the tensors, not the metadata
    info = inspect_lora(f)
    assert any("SDXL" in n and "SD1.x" in n for n in info["notes"]) and "note" in format_text(info)
    # tiny shapes (no width that decides): SD1/SD2 block names still rule SDXL out
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tiny = {f"{q}.lora_down.weight": torch.randn(4, 32, generator=g),
            f"{q}.lora_up.weight": torch.randn(32, 4, generator=g)}
    f2 = tmp_path / "tiny.safetensors"
    save_file(tiny, str(f2), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.warns(UserWarning, match=r"SDXL .* SD1.x or SD2.x"):
        assert read_lora(f2, family="sd1", configs=tiny_configs("sd1")).family == "sd1"


def _top_level_file(path, metadata=None):
    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_conv_in.lora_down.weight": torch.randn(4, 4, 3, 3, generator=g),
          "lora_unet_conv_in.lora_up.weight": torch.randn(320, 4, 1, 1, generator=g),
          "lora_unet_time_embedding_linear_1.lora_down.weight": torch.randn(4, 320, generator=g),
          "lora_unet_time_embedding_linear_1.lora_up.weight": torch.randn(1280, 4, generator=g)}
    save_file(sd, str(path), metadata=metadata)
    return path


def test_inspect_explains_top_level_only_files(tmp_path):
    info = inspect_lora(_top_level_file(tmp_path / "top.safetensors"))
    assert info["family"] == "sd1" and info["shape_misfits"] == [] and info["total_modules"] == 2
    ev = info["family_evidence"]
    assert ev.startswith("assumed SD1.x: SD1.x, SD2.x or SDXL fit: only top-level UNet modules"), ev
    assert "same names and shapes" in ev and ev in format_text(info)
    # metadata that the tensors leave open picks the family, without a warning
    f = _top_level_file(tmp_path / "top2.safetensors", {"ss_base_model_version": "sd_v2"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf = read_lora(f)
    assert lf.family == "sd2" and lf.family_evidence.startswith("ss_base_model_version=sd_v2; keys and shapes fit")


# ---------------------------------------------------------------------------------------------
# mixing, fusing and merging with ComfyUI files

def _loha_file(path, family, paths, g):
    """kohya-named LoHa, rank 2, alpha 1 (scale 0.5); returns {path: ΔW formula}."""
    sd, refs, T = {}, {}, table(family)
    for p in paths:
        out, inn = T[p].shape[0], torch.Size(T[p].shape[1:]).numel()
        a1, b1, a2, b2 = (torch.randn(*s, generator=g) * 0.3 for s in ((out, 2), (2, inn), (out, 2), (2, inn)))
        name = kohya_name(p, family, tiny_configs(family)["unet"])
        sd.update({f"{name}.hada_w1_a": a1, f"{name}.hada_w1_b": b1, f"{name}.hada_w2_a": a2,
                   f"{name}.hada_w2_b": b2, f"{name}.alpha": torch.tensor(1.0)})
        refs[p] = ((a1 @ b1) * (a2 @ b2) * 0.5).reshape(T[p].shape)
    save_file(sd, str(path))
    return refs


def _peft_file(path, family, paths, g):
    """diffusers/PEFT keys (`unet.<path>.lora_A.weight`), no alpha: scale 1; returns {path: ΔW formula}."""
    sd, refs, T = {}, {}, table(family)
    for p in paths:
        up, down = lora_pair(T[p].shape, 3, g)
        sd[f"{p}.lora_A.weight"], sd[f"{p}.lora_B.weight"] = down, up
        refs[p] = (up @ down).reshape(T[p].shape)
    save_file(sd, str(path))
    return refs


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_mix_loha_peft_comfy_negative_weights(tmp_path, family):
    comps = components(family)
    paths = attention_paths(comps)
    g = torch.Generator().manual_seed(7)
    f1, f2, f3 = (str(tmp_path / n) for n in ("loha.safetensors", "peft.safetensors", "comfy.safetensors"))
    loha, peft = _loha_file(f1, family, paths, g), _peft_file(f2, family, paths[::2], g)
    sd = comfy_file(f3, family, paths=paths[1:], seed=8)
    names = comfy_names(family)
    w = [(0.8, -0.6), (-1.1, 0.5), (-0.7, -1.3)]  # (unet, text encoders) per file
    mods = modules(comps)
    w0 = {p: weight(comps, p).detach().clone() for p in paths}
    b0 = {p: mods[p].bias.detach().clone() for p in paths if mods[p].bias is not None}
    mixer = Mixer(comps, cache=LoraCache())
    mixer.apply([MixEntry(f, unet=u, text_encoder=t) for f, (u, t) in zip((f1, f2, f3), w)])
    for p in paths:
        s = [u if p.startswith("unet.") else t for u, t in w]
        want = w0[p] + s[0] * loha[p]
        if p in peft:
            want = want + s[1] * peft[p]
        if f"{names[p]}.lora_up.weight" in sd:
            want = want + s[2] * comfy_delta(sd, names[p], w0[p].shape)
        close(weight(comps, p), want, p)
        if p in b0:
            db = sd.get(f"{names[p]}.diff_b")
            close(mods[p].bias, b0[p] + (s[2] * db.float() if db is not None else 0), p)
    mixer.restore()
    assert all(torch.equal(weight(comps, p), w0[p]) for p in paths)


def test_fuse_and_mix_a_comfy_file(tmp_path):
    comps = components("sd1")
    paths = attention_paths(comps)
    sd = comfy_file(tmp_path / "c.safetensors", "sd1", paths=paths, seed=4)
    names = comfy_names("sd1")
    base = pipeline_folder("sd1", tmp_path / "base")
    counts = fuse(base, tmp_path / "out", [MixEntry(str(tmp_path / "c.safetensors"), unet=-0.5, text_encoder=0.7)],
                  log=lambda *a: None)
    assert counts["unet"] > 0 and counts["text_encoder"] > 0
    from diffusers import UNet2DConditionModel
    new = UNet2DConditionModel.from_pretrained(tmp_path / "out" / "unet")
    for p in (q for q in paths if q.startswith("unet.")):
        mod = comps["unet"].get_submodule(live_path(comps["unet"], p))
        got = new.get_submodule(live_path(new, p))
        close(got.weight, mod.weight - 0.5 * comfy_delta(sd, names[p], mod.weight.shape), p)
        if f"{names[p]}.diff_b" in sd:
            close(got.bias, mod.bias - 0.5 * sd[f"{names[p]}.diff_b"].float(), p)
    # `sdlora mix`: a ComfyUI file without biases concatenates exactly with a PEFT file
    nb = comfy_file(tmp_path / "nb.safetensors", "sd1", paths=paths, seed=5, biases=False)
    peft = _peft_file(tmp_path / "p.safetensors", "sd1", paths, torch.Generator().manual_seed(6))
    mixed = mix_loras([MixEntry(str(tmp_path / "nb.safetensors"), unet=-1.5, text_encoder=0.4),
                       MixEntry(str(tmp_path / "p.safetensors"), unet=0.6, text_encoder=-0.9)],
                      family="sd1", configs=tiny_configs("sd1"))
    for p in paths:
        s = (-1.5, 0.6) if p.startswith("unet.") else (0.4, -0.9)
        shape = table("sd1")[p].shape
        close(mixed.patches[p].delta(torch.zeros(shape)), s[0] * comfy_delta(nb, names[p], shape) + s[1] * peft[p], p)
