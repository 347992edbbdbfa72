"""load_base: the embedded tiny model, single-file LDM checkpoints of every family (offline, checked
tensor by tensor against the modules they were written from), .ckpt safety, clear errors."""
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm import config_root, tiny_model, to_ldm
from sdlora.families import build_unet, canonical_modules, load_config, module_table
from sdlora.pipelines import EMBEDDED_MODEL, CheckpointError, load_base, sd2_is_v_prediction


def _save(sd, path, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def _same_weights(module, reference):
    live, ref = module.state_dict(), reference.state_dict()
    assert live.keys() == ref.keys()
    bad = [k for k in ref if not torch.equal(live[k], ref[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def embedded():
    return load_base()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Loading anything here must not open a connection."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access during a local load")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------
# the embedded model

def test_embedded_model_is_sd15_shaped(embedded):
    assert embedded.family == "sd1" and embedded.name == "tiny-sd"
    unet = embedded.pipe.unet.config
    real = build_unet(load_config("sd1", "unet")).config  # defaults filled in
    for key in ("down_block_types", "up_block_types", "mid_block_type", "use_linear_projection",
                "transformer_layers_per_block", "in_channels", "out_channels"):
        assert unet.get(key) == real.get(key), key
    assert unet.cross_attention_dim == embedded.pipe.text_encoder.config.hidden_size
    # SD1.5's module names (hence kohya LoRA keys): every block of SD1.5's, with fewer layers per block
    real_unet = {p for p in module_table("sd1") if p.startswith("unet.")}
    tiny_unet = set(canonical_modules("unet", embedded.pipe.unet))
    assert tiny_unet <= real_unet
    blocks = lambda names: {".".join(n.split(".")[1:3]) for n in names}  # noqa: E731 ("down_blocks.0", ...)
    assert blocks(tiny_unet) == blocks(real_unet)
    assert embedded.pipe.tokenizer.vocab_size == 49408
    total = sum(f.stat().st_size for f in EMBEDDED_MODEL.rglob("*.safetensors"))
    assert total <= 30 * 2**20


def test_embedded_model_generates_offline(embedded):
    out = embedded.pipe("a red circle on a blue background", num_inference_steps=4,
                        generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert out.shape == (64, 64, 3)
    assert np.isfinite(out).all() and out.std() > 0.05


def test_folder_hash_is_stable(embedded, tmp_path):
    assert len(embedded.hash) == 10 and embedded.hash == load_base(EMBEDDED_MODEL).hash


# ---------------------------------------------------------------------------------------------
# single files (tiny models of each family in the original LDM/SGM layout)

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_loads_every_tensor(family, tmp_path):
    configs, modules = tiny_model(family)
    sd = to_ldm(family, modules)
    if family == "sd1":  # what real SD1.x files also carry
        sd.update({"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
                   "model_ema.decay": torch.tensor(0.9999), "alphas_cumprod": torch.linspace(1, 0, 1000)})
    path = _save(sd, tmp_path / f"tiny-{family}.safetensors")
    base = load_base(path, config_root=config_root(tmp_path, family, configs))
    assert base.family == family and base.name == f"tiny-{family}"
    assert type(base.pipe).__name__ == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    for comp, module in modules.items():
        _same_weights(getattr(base.pipe, comp), module)
    assert base.hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]  # A1111 short hash (AutoV2)
    if family != "sd1":  # OpenCLIP tokenizers pad with "!"
        tok = base.pipe.tokenizer if family == "sd2" else base.pipe.tokenizer_2
        assert tok.pad_token == "!"


def test_ckpt_loads_weights_only(tmp_path):
    configs, modules = tiny_model("sd1")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": to_ldm("sd1", modules), "global_step": 1}, path)
    base = load_base(path, config_root=config_root(tmp_path, "sd1", configs))
    _same_weights(base.pipe.unet, modules["unet"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file when unpickled


def test_malicious_ckpt_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _Evil(str(marker))}}, path)
    with pytest.raises(CheckpointError, match="never runs code"):
        load_base(path)
    assert not marker.exists()
    # a plain (non-zip) pickle as well
    legacy = tmp_path / "evil2.ckpt"
    legacy.write_bytes(pickle.dumps({"state_dict": _Evil(str(marker))}))
    with pytest.raises(CheckpointError):
        load_base(legacy)
    assert not marker.exists()


def test_broken_and_unknown_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        load_base(junk)
    configs, modules = tiny_model("sd1")
    good = _save(to_ldm("sd1", modules), tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="incomplete"):
        load_base(cut)
    other = _save({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="model.diffusion_model"):
        load_base(other)
    lora = _save({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
                 tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="LoRA"):
        load_base(lora)
    diffusers_keys = _save(modules["unet"].state_dict(), tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="diffusers-style"):
        load_base(diffusers_keys)
    sd = to_ldm("sd1", modules)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3)
    with pytest.raises(CheckpointError, match="inpainting"):
        load_base(_save(sd, tmp_path / "inpaint.safetensors"))
    no_te = {k: v for k, v in to_ldm("sd1", modules).items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(CheckpointError, match="no text encoder"):
        load_base(_save(no_te, tmp_path / "unet-only.safetensors"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_base(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):  # a typo is not a hub id: no network
        load_base("models/missing.safetensors")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_base(tmp_path / "empty-folder")


def test_wrong_shapes_for_family_are_reported(tmp_path):
    configs, modules = tiny_model("sd1")
    path = _save(to_ldm("sd1", modules), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="does not match its architecture"):
        load_base(path)  # tiny tensors against the real-size SD1.5 configs


def test_sd2_prediction_type(tmp_path):
    configs, modules = tiny_model("sd2")
    root = config_root(tmp_path, "sd2", configs)
    sd = to_ldm("sd2", modules)
    v = load_base(_save(sd, tmp_path / "v.safetensors", {"modelspec.prediction_type": "v"}), config_root=root)
    assert v.prediction_type == "v_prediction" == v.pipe.scheduler.config.prediction_type
    eps = load_base(_save(sd, tmp_path / "e.safetensors", {"modelspec.prediction_type": "epsilon"}), config_root=root)
    assert eps.prediction_type == "epsilon" == eps.pipe.scheduler.config.prediction_type
    _save(sd, tmp_path / "y.safetensors")
    (tmp_path / "y.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert load_base(tmp_path / "y.safetensors", config_root=root).prediction_type == "v_prediction"


def test_sd2_v_prediction_probe():
    """A1111's rule: at t=999 on a constant 0.5 input, mean(output - input) < -1 means v-prediction.
    A UNet whose conv_out is zeroed outputs exactly its conv_out bias, so the rule's outcome is known."""
    _, modules = tiny_model("sd2")
    unet = modules["unet"]
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(-3.0)      # output - input = -3.5 -> v
        assert sd2_is_v_prediction(unet, {}, _nowhere())
        unet.conv_out.bias.fill_(0.0)       # output - input = -0.5 -> epsilon
        assert not sd2_is_v_prediction(unet, {}, _nowhere())


def _nowhere():
    from pathlib import Path
    return Path("/nonexistent/model.safetensors")


# ---------------------------------------------------------------------------------------------
# real sizes (slow): random weights in the real SD1.5 / SDXL layouts, loaded with the shipped configs

def _real_model(family):
    """Real-size components with random fp16 weights (built on the meta device, then filled)."""
    from diffusers import AutoencoderKL
    from sdlora.families import build_component
    comps = ("unet", "text_encoder", "text_encoder_2") if family == "sdxl" else ("unet", "text_encoder")
    modules = {comp: build_component(family, comp) for comp in comps}
    with torch.device("meta"):
        modules["vae"] = AutoencoderKL.from_config(load_config(family, "vae"))
    gen = torch.Generator().manual_seed(0)
    for m in modules.values():
        m.to(torch.float16).to_empty(device="cpu").eval().requires_grad_(False)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).mul_(0.02))
    return modules


def _check_real(family, tmp_path):
    modules = _real_model(family)
    path = _save(to_ldm(family, modules), tmp_path / f"real-{family}.safetensors")
    expected = {c: {k: tuple(v.shape) for k, v in m.state_dict().items()} for c, m in modules.items()}
    samples = {c: {k: v.clone() for k, v in sorted(m.state_dict().items())[::40]} for c, m in modules.items()}
    del modules
    base = load_base(path, dtype=torch.float16)  # the shipped configs, no network
    assert base.family == family
    for comp, shapes in expected.items():
        live = getattr(base.pipe, comp).state_dict()
        assert {k: tuple(v.shape) for k, v in live.items()} == shapes, comp
        assert all(torch.equal(live[k], v) for k, v in samples[comp].items()), comp
        if comp != "vae":  # every LoRA-patchable module has the shape the family table says
            table = module_table(family)
            for p, m in canonical_modules(comp, getattr(base.pipe, comp)).items():
                assert table[p].shape == tuple(m.weight.shape), p


@pytest.mark.slow
def test_real_size_sd15_single_file(tmp_path):
    _check_real("sd1", tmp_path)


@pytest.mark.slow
def test_real_size_sdxl_single_file(tmp_path):
    _check_real("sdxl", tmp_path)
