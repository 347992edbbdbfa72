"""`sdlora inspect`: what it reports about a file, as text and as JSON."""
import hashlib
import json

import torch
from safetensors.torch import save_file

from sdlora.cli import main
from sdlora.inspect import inspect_lora, trigger_words

K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"   # real SD1.5 shapes: [320, 768]
T = "lora_te_text_model_encoder_layers_0_mlp_fc1"                            # [3072, 768]


def sd15_file(tmp_path, metadata):
    g = torch.Generator().manual_seed(0)
    sd = {f"{K}.lora_down.weight": torch.randn(4, 768, generator=g).half(),
          f"{K}.lora_up.weight": torch.randn(320, 4, generator=g).half(), f"{K}.alpha": torch.tensor(2.0),
          f"{T}.lora_down.weight": torch.randn(8, 768, generator=g).half(),
          f"{T}.lora_up.weight": torch.randn(3072, 8, generator=g).half(), f"{T}.alpha": torch.tensor(8.0),
          "bundle_emb.mytok.string_to_param.*": torch.randn(1, 768, generator=g)}
    f = tmp_path / "style.safetensors"
    save_file(sd, str(f), metadata=metadata)
    return f


def test_inspect_json_cli(tmp_path, capsys):
    md = {"ss_network_module": "networks.lora", "ss_output_name": "mystyle", "ss_v2": "False",
          "ss_tag_frequency": json.dumps({"10_mystyle": {"mystyle": 20, "1girl": 12, "red": 3},
                                          "5_extra": {"1girl": 10, "blue": 4}}),
          "ssmd_cover_images": json.dumps(["x" * 5000]), "modelspec.title": "My Style"}
    f = sd15_file(tmp_path, md)
    assert main(["inspect", str(f), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd1" and "cross-attention input width 768" in info["family_evidence"]
    assert info["format"] == "kohya" and info["algorithms"] == ["lora"]
    assert info["modules"] == {"unet": 1, "text_encoder": 1} and info["shape_misfits"] == []
    assert info["rank"] == {"min": 4, "max": 8, "counts": {"4": 1, "8": 1}}
    assert info["alpha"]["counts"] == {"2.0": 1, "8.0": 1}
    assert info["name"] == "My Style"
    assert info["trigger_words"][:3] == ["1girl", "mystyle", "blue"] and info["trigger_source"] == "ss_tag_frequency"
    assert info["embeddings"] == ["mytok"]
    assert info["metadata"]["ssmd_cover_images"].startswith("<") and "x" * 100 not in json.dumps(info)
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert info["hashes"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["hashes"]["addnet_short"] == hashlib.sha256(data[8 + n:]).hexdigest()[:12]
    assert info["dtypes"] == {"F16": 4, "F32": 3}


def test_inspect_text_and_errors(tmp_path, capsys):
    f = sd15_file(tmp_path, {})
    assert main(["inspect", str(f)]) == 0
    out = capsys.readouterr().out
    assert "SD1.x" in out and "rank        4..8" in out and "A1111 'Lora hashes'" in out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense" * 4)
    assert main(["inspect", str(bad)]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    assert main(["inspect", str(f), "--family", "sdxl"]) == 2
    assert "but the model is SDXL" in capsys.readouterr().err


def test_trigger_word_order(tmp_path):
    freq = json.dumps({"3_a": {"tag": 1}})
    md = {"ssmd_keywords": "kw1, kw2", "modelspec.trigger_phrase": "phrase", "ss_tag_frequency": freq,
          "ss_dataset_dirs": json.dumps({"10_mystyle": {"n_repeats": 10}})}
    assert trigger_words(md) == (["kw1", "kw2"], "ssmd_keywords")
    del md["ssmd_keywords"]
    assert trigger_words(md) == (["phrase"], "modelspec.trigger_phrase")
    del md["modelspec.trigger_phrase"]
    lora = tmp_path / "s.safetensors"
    (tmp_path / "s.civitai.info").write_text(json.dumps({"trainedWords": ["civ word"]}))
    assert trigger_words(md, lora) == (["civ word"], "s.civitai.info")
    assert trigger_words(md) == (["tag"], "ss_tag_frequency")
    del md["ss_tag_frequency"]
    assert trigger_words(md) == (["mystyle"], "ss_dataset_dirs")
    assert trigger_words({}, None, {"tok": None}) == (["tok"], "bundle_emb")


def test_inspect_library_on_tiny_file_lists_misfits(tmp_path):
    sd = {f"{K}.lora_down.weight": torch.randn(2, 32), f"{K}.lora_up.weight": torch.randn(32, 2)}
    f = tmp_path / "tiny.safetensors"
    save_file(sd, str(f))
    info = inspect_lora(f)
    assert info["total_modules"] == 1 and len(info["shape_misfits"]) == 1
    assert "family_evidence" in info and info["family"] == "sd1"
