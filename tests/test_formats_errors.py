"""Bad input gets one clear error: broken files, non-LoRAs, wrong family, unplaceable keys, pickles."""
import hashlib
import os
import pickle
import struct
import warnings

import pytest
import torch
from safetensors.torch import save_file

from sdlora.errors import FamilyMismatchError, LoraFormatError, UnmatchedKeysError
from sdlora.formats import read_header, read_lora
from sdlora.hashes import addnet_hash, lora_hashes
from tiny import tiny_configs

SD1 = tiny_configs("sd1")
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def good_state(rank=2):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in (Q, TE):
        sd[f"{name}.lora_up.weight"] = torch.randn(32, rank, generator=g)
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, 32, generator=g)
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    return sd


def write(tmp_path, sd, name="x.safetensors", metadata=None):
    f = tmp_path / name
    save_file(sd, str(f), metadata=metadata)
    return f


def test_truncated_and_not_safetensors(tmp_path):
    f = write(tmp_path, good_state())
    data = f.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(LoraFormatError, match="truncated safetensors file.*Re-download"):
        read_lora(cut, family="sd1", configs=SD1)
    head_cut = tmp_path / "head.safetensors"
    head_cut.write_bytes(data[:20])
    with pytest.raises(LoraFormatError, match="truncated safetensors file: the header needs"):
        read_header(head_cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(LoraFormatError, match="not a safetensors file"):
        read_lora(junk)
    bad_json = tmp_path / "json.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(LoraFormatError, match="header is not valid JSON"):
        read_header(bad_json)
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        read_lora(tmp_path / "missing.safetensors")


def test_nan_and_inf_refused(tmp_path):
    sd = good_state()
    sd[f"{Q}.lora_up.weight"][0, 0] = float("nan")
    sd[f"{TE}.lora_down.weight"][1, 1] = float("inf")
    with pytest.raises(LoraFormatError, match=r"2 tensors hold NaN or infinite values .*lora_up.weight"):
        read_lora(write(tmp_path, sd), family="sd1", configs=SD1)


def test_shape_that_does_not_fit(tmp_path):
    sd = good_state()
    sd[f"{Q}.lora_down.weight"] = torch.randn(2, 48)
    with pytest.raises(LoraFormatError, match=r"1 modules do not fit .*attn1_to_q \(up \[32, 2\], down \[2, 48\]\) "
                                              r"does not fit unet.down_blocks.0.*weight \[32, 32\]"):
        read_lora(write(tmp_path, sd), family="sd1", configs=SD1)


def test_family_mismatch_names_both(tmp_path):
    # (metadata alone no longer refuses a file: test_formats_comfy.py checks the warning instead)
    sd = {k.replace("lora_te_", "lora_te1_"): v for k, v in good_state().items()}
    with pytest.raises(FamilyMismatchError, match=r"SDXL .*lora_te1_.* but the model is SD2.x"):
        read_lora(write(tmp_path, sd, "xl.safetensors"), family="sd2", configs=tiny_configs("sd2"))
    # SD1 (conv proj_in) vs SD2 model; and real-size widths (SD2 cross-attention 1024) vs SD1
    sd1 = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32, 1, 1),
           "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2, 1, 1)}
    with pytest.raises(FamilyMismatchError, match=r"for SD1.x \(conv proj_in LoRA.*model is SD2.x"):
        read_lora(write(tmp_path, sd1, "p.safetensors"), family="sd2", configs=tiny_configs("sd2"))
    sd2 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(2, 1024),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(320, 2)}
    with pytest.raises(FamilyMismatchError, match=r"SD2.x \(cross-attention input width 1024"):
        read_lora(write(tmp_path, sd2, "k.safetensors"), family="sd1")


def test_unmatched_keys_listed_and_allow_partial(tmp_path):
    sd = good_state()
    sd["lora_unet_down_blocks_9_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight"] = torch.randn(32, 2)
    sd["lora_unet_down_blocks_9_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight"] = torch.randn(2, 32)
    sd[f"{Q}.hada_w9_x"] = torch.randn(2)
    f = write(tmp_path, sd)
    with pytest.raises(UnmatchedKeysError, match=r"3 keys could not be placed on the SD1.x model: .*hada_w9_x.*down_blocks_9.*"
                                                 r"Nothing was loaded; pass allow_partial=True"):
        read_lora(f, family="sd1", configs=SD1)
    with pytest.warns(UserWarning, match=r"3 keys could not be placed.*loaded the other 2 modules"):
        lf = read_lora(f, family="sd1", configs=SD1, allow_partial=True)
    assert sorted(lf.unmatched) == sorted(["lora_unet_down_blocks_9_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight",
                                           "lora_unet_down_blocks_9_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight",
                                           f"{Q}.hada_w9_x"])
    assert lf.counts() == {"unet": 1, "text_encoder": 1}


def test_incomplete_module(tmp_path):
    sd = good_state()
    del sd[f"{Q}.lora_down.weight"]
    with pytest.raises(LoraFormatError, match=r"incomplete LoRA module: has \['alpha', 'up'\] but lacks \['down'\]"):
        read_lora(write(tmp_path, sd), family="sd1", configs=SD1)


@pytest.mark.parametrize("keys,metadata,message", [
    ({"unet:0:up": (4, 2), "unet:0:down": (2, 4)}, {"unet": '["CrossAttention"]'}, "cloneofsimo/lora 'safeloras'"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (4, 4)}, None, "full model checkpoint, not a LoRA"),
    ({"down_blocks.0.resnets.0.conv1.weight": (4, 4), "conv_in.bias": (4,)}, None, "full model weights, not a LoRA"),
    ({"emb_params": (2, 8)}, None, "textual-inversion embedding"),
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (4, 2)}, None, "LoRA for Flux, not for SD1.x"),
    ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (2, 4)}, None, "LoRA for Flux"),
    ({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": (4, 2)}, None, "LoRA for SD3"),
    ({Q + ".lora_up.weight": (32, 2)}, {"ss_base_model_version": "flux1"}, "trained for 'flux1'"),
    ({Q + ".lora_up.weight": (32, 2)}, {"modelspec.architecture": "stable-diffusion-3-medium/lora"},
     "for 'stable-diffusion-3-medium/lora'"),
    ({"foo": (3,)}, None, "none of its 1 keys"),
])
def test_not_an_sd_lora(tmp_path, keys, metadata, message):
    f = write(tmp_path, {k: torch.zeros(s) for k, s in keys.items()}, metadata=metadata)
    with pytest.raises(LoraFormatError, match=message):
        read_lora(f)


def test_bundled_embeddings_reported(tmp_path):
    sd = good_state()
    sd["bundle_emb.mystyle.string_to_param.*"] = torch.randn(2, 32)
    lf = read_lora(write(tmp_path, sd), family="sd1", configs=SD1)
    assert list(lf.embeddings) == ["mystyle"] and lf.embeddings["mystyle"]["string_to_param.*"].shape == (2, 32)
    assert not lf.unmatched and "embeddings mystyle" in lf.summary()


def test_pt_with_weights_only_and_malicious_pickle_refused(tmp_path):
    sd = good_state()
    pt = tmp_path / "x.pt"
    torch.save(sd, pt)
    lf = read_lora(pt, family="sd1", configs=SD1)
    assert lf.container == "pickle" and set(lf.patches) and not lf.unmatched
    torch.testing.assert_close(lf.patches["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"].tensors["up"],
                               sd[f"{TE}.lora_up.weight"])
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    bad = tmp_path / "evil.ckpt"
    with open(bad, "wb") as fh:
        pickle.dump({"state_dict": {"a": Evil()}}, fh)
    with pytest.raises(LoraFormatError, match=r"refused to load this pickle file.*weights_only=True"):
        read_lora(bad)
    assert not marker.exists()


def test_header_only_reading(tmp_path):
    sd = good_state()
    sd[f"{Q}.lora_up.weight"] = sd[f"{Q}.lora_up.weight"].half()
    sd[f"{Q}.lora_up.weight"][0, 0] = float("nan")  # tensor data is never looked at
    f = write(tmp_path, sd, metadata={"ss_network_dim": "2"})
    h = read_header(f)
    assert h.tensors[f"{Q}.lora_up.weight"].dtype == "F16" and h.tensors[f"{Q}.lora_up.weight"].shape == (32, 2)
    assert h.metadata == {"ss_network_dim": "2"} and set(h.names) == set(sd)
    n = struct.unpack("<Q", f.read_bytes()[:8])[0]
    assert h.header_size == n and h.file_size == f.stat().st_size


def test_hashes_against_hashlib(tmp_path):
    f = write(tmp_path, good_state(), metadata={"ss_output_name": "x"})
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    after = hashlib.sha256(data[8 + n:]).hexdigest()
    full = hashlib.sha256(data).hexdigest()
    assert addnet_hash(f) == after
    assert lora_hashes(f) == {"sha256": full, "autov2": full[:10], "addnet": after, "addnet_short": after[:12]}
    # editing metadata changes the file hash but not the addnet hash
    g = write(tmp_path, good_state(), "y.safetensors", metadata={"ss_output_name": "renamed", "ssmd_author": "me"})
    assert addnet_hash(g) == after and lora_hashes(g)["sha256"] != full


def test_state_dict_source_and_bad_values():
    lf = read_lora(good_state(), family="sd1", configs=SD1)
    assert lf.path is None and lf.container == "state_dict" and len(lf.patches) == 2
    with pytest.raises(LoraFormatError, match="not a tensor"):
        read_lora({f"{Q}.alpha": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_lora(good_state(), configs=SD1)  # family undetectable here: assumed SD1, no warning
