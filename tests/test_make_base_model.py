"""tools/make_base_model.py end to end at smoke size (--quick): both stages write a loadable
pipeline folder with SD1.5 module names, the second stage keeps the first one's VAE and text
encoder and starts from its UNet."""
import json

import torch
from safetensors.torch import load_file

from sdlora.pipelines import load_base
from tools import make_base_model as M


def _weights(folder, part):
    name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(str(folder / part / name))


def test_two_stages_quick(tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "tiny-sd"
    threads = torch.get_num_threads()
    try:                                           # the script sets torch's thread count (--threads)
        assert M.main(["--out", str(stage1), "--quick", "--eval-every", "0", "--decoder-steps", "2"]) == 0
        assert M.main(["--out", str(stage2), "--quick", "--eval-every", "0", "--init-unet", str(stage1),
                       "--unet-lr", "3e-4"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "trained from scratch" in (stage1 / "README.md").read_text()
    assert f"its UNet continued from {stage1}" in (stage2 / "README.md").read_text()
    base = load_base(stage2)
    assert base.family == "sd1" and base.pipe.unet.config.layers_per_block == 1
    assert base.pipe.tokenizer.vocab_size == 49408
    for part in ("vae", "text_encoder"):           # the same VAE and text encoder in both stages
        a, b = _weights(stage1, part), _weights(stage2, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    u1, u2 = _weights(stage1, "unet"), _weights(stage2, "unet")
    assert u1.keys() == u2.keys() and any(not torch.equal(u1[k], u2[k]) for k in u1)   # trained on
    assert all(t.dtype == torch.float16 for t in u2.values())
    assert all(t.dtype == torch.float32 for t in _weights(stage2, "text_encoder").values())  # see M.save
    assert json.loads((stage2 / "vae" / "config.json").read_text())["scaling_factor"] == \
        json.loads((stage1 / "vae" / "config.json").read_text())["scaling_factor"]
    out = base.pipe("a red circle", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and out.std() > 0


def test_plain_diffusers_loads_the_shipped_model_with_one_dtype():
    """`StableDiffusionPipeline.from_pretrained(path)` with no dtype argument: diffusers upcasts
    fp16-stored models to fp32, transformers 5 keeps the stored dtype, so every component must end up
    in the same dtype or the first call fails ("mat1 and mat2 must have the same dtype")."""
    from diffusers import StableDiffusionPipeline
    from sdlora.pipelines import EMBEDDED_MODEL
    pipe = StableDiffusionPipeline.from_pretrained(str(EMBEDDED_MODEL), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    out = pipe("a red circle", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and out.std() > 0


def test_prefixes_put_unknown_words_in_front_of_a_fraction_of_captions():
    import numpy as np
    from tools import scenes as S
    tok = M.load_tokenizer()
    prefixes = M.Prefixes(tok, np.random.default_rng(2), 0.5, n=300)
    again = M.Prefixes(tok, np.random.default_rng(2), 0.5, n=300)
    assert prefixes.texts == again.texts                                       # seeded
    for text in prefixes.texts:                # 1-3 words that no caption uses, then ", " or " "
        words = text.rstrip(", ").split()
        assert 1 <= len(words) <= 3 and not set(words) & S.caption_words()
    captions = [s.caption for s in S.scenes(np.random.default_rng(0), 400)[1]]
    ids = M.token_ids(tok, captions)
    out = prefixes.apply(ids, torch.Generator().manual_seed(0))
    led = 0
    for row, caption in zip(out.tolist(), captions):
        text = tok.decode(row, skip_special_tokens=True)
        if text != caption:
            led += 1
            assert text.endswith(caption) and text[:-len(caption)].strip(" ,") and len(row) == 77
    assert 140 <= led <= 260                 # binomial(400, 0.5): 6 standard deviations either side


def test_shape_focus_weights_the_latent_pixels_around_the_shape():
    import numpy as np
    from tools import scenes as S
    images, specs = S.scenes(np.random.default_rng(4), 40)
    focus = M.shape_focus(images, specs, 3.0)
    assert focus.shape == (40, 1, 16, 16) and set(focus.unique().tolist()) == {1.0, 4.0}
    for f, s in zip(focus[:, 0], specs):
        cx, cy = (int(v) // 4 for v in s.center)
        assert f[cy, cx] == 4.0                              # the shape's centre
        r = int(s.radius * 1.15 / 4) + 3                     # beyond the shape's extent plus one pixel
        far = [(y, x) for y in range(16) for x in range(16) if max(abs(y - cy), abs(x - cx)) > r]
        assert all(f[y, x] == 1.0 for y, x in far)


def test_every_unet_resnet_sees_the_timestep():
    """A ResnetBlock2D adds the time embedding per channel and then GroupNorms: with one channel per
    group (SD1.5's 32 groups at this model's width 32) the norm subtracts that constant again and the
    block's output does not depend on the timestep at all. unet_config's groups keep >= 4 channels
    per group, so every resnet's output changes with the timestep; 32 groups would not."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.resnet import ResnetBlock2D

    def blind_resnets(cfg):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(cfg).eval()
        temb = [unet.time_embedding(unet.time_proj(torch.tensor([t])).float()) for t in (50, 900)]
        blind = []
        for name, m in unet.named_modules():
            if isinstance(m, ResnetBlock2D):
                h = torch.randn(1, m.in_channels, 4, 4)
                with torch.no_grad():
                    d = (m(h, temb[0]) - m(h, temb[1])).abs().max().item()
                if d < 1e-4:
                    blind.append(name)
        return blind

    assert blind_resnets(M.unet_config()) == []
    assert "down_blocks.0.resnets.0" in blind_resnets(M.unet_config(norm_groups=32))   # the old config


def test_norm_groups_that_do_not_divide_the_widths_fail_before_any_work(tmp_path, capsys):
    import pytest
    with pytest.raises(SystemExit) as e:
        M.main(["--out", str(tmp_path / "m"), "--norm-groups", "5", "--quick"])
    assert e.value.code == 2 and "--norm-groups must divide every UNet width" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
