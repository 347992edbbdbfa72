"""UI handlers without a browser: prompt tags and reuse parameters, the Generate, Mix and Library
handlers on the tiny base model, app arguments."""
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdlora.errors import FamilyMismatchError, SdloraError
from sdlora.extra_networks import LoraRef, parse_prompt
from sdlora.formats import read_lora
from sdlora.hashes import addnet_hash
from sdlora.infotext import build as build_infotext
from sdlora.infotext import read_png
from sdlora.ui.paths import UploadError
from tiny import write_image
from loras import lora_delta, write_lora

STYLES = os.path.join(os.path.dirname(__file__), "..", "sample_data", "styles")



# ---------------------------------------------------------------------------------------------
# prompt tags and "reuse parameters"

def test_prompt_tags_te_first_and_block_weights():
    text, refs = parse_prompt("a circle <lora:a:0.25:0.75>, <lora:b:-0.5:lbw=OUTD> <lora:c:te=0:unet=1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0>")
    assert text == "a circle"
    assert refs[0] == LoraRef("a", te=0.25, unet=0.75)                # A1111: text-encoder weight first
    assert refs[1] == LoraRef("b", te=-0.5, unet=-0.5, blocks="OUTD")
    assert refs[2].te == 0 and refs[2].unet == 1 and refs[2].blocks.startswith("1,0,0")
    for r in refs:                                                     # tags written back read the same
        assert parse_prompt(r.tag)[1] == [r]
    with pytest.raises(SdloraError, match=r"<lora:x:1:lbw=NOPE>.*preset"):
        parse_prompt("<lora:x:1:lbw=NOPE>")


def test_reuse_updates_round_trip():
    import gradio as gr
    from sdlora.ui.generate_tab import REUSE_FIELDS, reuse_updates
    text = build_infotext("a red circle <lora:style:0.5:0.8>", "blurry, lowres",
                          {"Steps": 12, "Sampler": "Euler a", "CFG scale": "6.5", "Seed": 1234, "Size": "64x48",
                           "Lora hashes": "style: 0123456789ab"})
    out = reuse_updates(text)
    values = dict(zip(REUSE_FIELDS, out))
    assert isinstance(values.pop("s_min_uncond"), type(gr.skip()))   # no NGMS in the text: the slider stays
    assert values == {"prompt": "a red circle <lora:style:0.5:0.8>", "negative": "blurry, lowres", "sampler": "Euler a",
                      "steps": 12, "cfg": 6.5, "seed": 1234, "width": 64, "height": 48}
    ngms = reuse_updates("x\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, NGMS: 2.5")
    assert ngms[REUSE_FIELDS.index("s_min_uncond")] == 2.5
    assert out[len(REUSE_FIELDS)] == []                       # picker cleared: the LoRAs are in the prompt
    assert "parameters reused" in out[-1]
    # A1111 >= 1.9 splits the schedule; an unknown sampler keeps the current one and says so
    a19 = reuse_updates("x\nSteps: 5, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64")
    assert a19[REUSE_FIELDS.index("sampler")] == "DPM++ 2M Karras"
    odd = reuse_updates("x\nSteps: 5, Sampler: Restart, CFG scale: 7, Seed: 1, Size: 64x64")
    assert isinstance(odd[REUSE_FIELDS.index("sampler")], type(gr.skip())) and "Restart" in odd[-1]
    bad = reuse_updates("   ")
    assert "sdl-error" in bad[-1] and "no parameters" in bad[-1]


def test_slot_updates_keep_weights_per_lora():
    from sdlora.ui.generate_tab import MAX_SLOTS, slot_updates
    unets = [0.5, -1.0] + [1.0] * (MAX_SLOTS - 2)
    tes = [0.2, 0.3] + [1.0] * (MAX_SLOTS - 2)
    out = slot_updates(["b"], ["a", "b"], unets, tes)          # "a" removed: b's weights move up
    rows, u, t, names = out[:MAX_SLOTS], out[MAX_SLOTS:2 * MAX_SLOTS], out[2 * MAX_SLOTS:3 * MAX_SLOTS], out[-1]
    assert names == ["b"]
    assert rows[0]["visible"] and not rows[1]["visible"]
    assert u[0]["value"] == -1.0 and t[0]["value"] == 0.3 and u[0]["label"].startswith("b:")


# ---------------------------------------------------------------------------------------------
# handlers on the tiny base model

def _pixels(result):
    return [np.asarray(im, dtype=np.int16) for im in result.images]


def test_generation_with_picked_lora(ctx):
    from sdlora.ui.generate_tab import picked_refs, run_generation
    calls = []
    refs = picked_refs(ctx, [("style", 0.7, 0.4)])
    res = run_generation(ctx, "a red circle", loras=refs, steps=3, seed=11, batch_size=2, batch_count=2,
                         progress=lambda f, d: calls.append(f))
    assert res.seeds == [11, 12, 13, 14]                     # seeds run on across batches, as in A1111
    assert len(res.paths) == 4 and all(p.is_file() for p in res.paths)
    info = read_png(res.paths[0])
    assert info.prompt == "a red circle <lora:style:0.4:0.7>"          # TE weight first
    assert info.lora_hashes == {"style": addnet_hash(ctx.loras_dir / "style.safetensors")[:12]}
    assert info.params["Seed"] == "11" and info.params["Steps"] == "3"
    assert calls[-1] == 1.0 and all(a <= b for a, b in zip(calls, calls[1:]))
    # the LoRA changes the picture; the same request again reproduces it exactly
    plain = run_generation(ctx, "a red circle", steps=3, seed=11)
    again = run_generation(ctx, "a red circle", loras=refs, steps=3, seed=11, batch_size=2, batch_count=2)
    assert np.abs(_pixels(plain)[0] - _pixels(res)[0]).max() > 0
    assert np.array_equal(_pixels(again)[0], _pixels(res)[0])


def test_two_sessions_generate_at_once(ctx):
    """Two browser tabs with different LoRA mixes generating at the same moment each get their own
    mix: the device lock serialises them and the mixer switches between them."""
    from sdlora.ui.generate_tab import picked_refs, run_generation
    requests = {"a": [("style", 1.0, 1.0)], "b": [("style2", -1.0, 0.5)]}
    alone = {k: run_generation(ctx, "a red circle", loras=picked_refs(ctx, v), steps=3, seed=5)
             for k, v in requests.items()}
    together, errors = {}, []

    def session(k):
        try:
            together[k] = run_generation(ctx, "a red circle", loras=picked_refs(ctx, requests[k]), steps=3, seed=5)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=session, args=(k,)) for k in ("a", "b", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for k in requests:
        assert np.array_equal(_pixels(together[k])[0], _pixels(alone[k])[0])
        assert together[k].infotexts[0] == alone[k].infotexts[0]
    assert not np.array_equal(_pixels(alone["a"])[0], _pixels(alone["b"])[0])


def test_reuse_from_png_reproduces_the_image(ctx):
    from sdlora.ui.generate_tab import infotext_of_png, picked_refs, reuse_settings, run_generation
    first = run_generation(ctx, "a blue square", negative="blurry", loras=picked_refs(ctx, [("style", 0.8, 0.8)]),
                           steps=3, seed=21, cfg=5.5, sampler="Euler", s_min_uncond=3.0)
    s = reuse_settings(infotext_of_png(first.paths[0]))
    assert s["prompt"] == "a blue square <lora:style:0.8>" and s["sampler"] == "Euler" and s["cfg"] == 5.5
    assert s["s_min_uncond"] == 3.0
    second = run_generation(ctx, s["prompt"], negative=s["negative"], steps=s["steps"], cfg=s["cfg"],
                            sampler=s["sampler"], seed=s["seed"], width=s["width"], height=s["height"],
                            s_min_uncond=s["s_min_uncond"])
    assert np.array_equal(_pixels(first)[0], _pixels(second)[0])
    # the NGMS setting took effect: without it the same seed gives another image
    plain = run_generation(ctx, s["prompt"], negative=s["negative"], steps=s["steps"], cfg=s["cfg"],
                           sampler=s["sampler"], seed=s["seed"], width=s["width"], height=s["height"])
    assert not np.array_equal(_pixels(first)[0], _pixels(plain)[0])
    with pytest.raises(ValueError, match="s_min_uncond"):
        run_generation(ctx, "a blue square", steps=2, seed=1, s_min_uncond=-1)
    fake = ctx.outputs_dir / "fake.png"
    fake.write_text("no")
    with pytest.raises(UploadError):
        infotext_of_png(fake)


def test_wrong_family_is_refused(ctx):
    from sdlora.ui.generate_tab import picked_refs, run_generation
    from sdlora.ui.library_tab import add_to_prompt, cards_html
    assert "xl_style" not in ctx.catalog.names(ctx.family) and "style" in ctx.catalog.names(ctx.family)
    with pytest.raises(FamilyMismatchError, match="SDXL.*SD1"):
        picked_refs(ctx, [("xl_style", 1, 1)])
    with pytest.raises(FamilyMismatchError, match="SDXL"):
        run_generation(ctx, "x <lora:xl_style:1>", steps=2, seed=1)
    prompt, msg = add_to_prompt(ctx, "xl_style", "a cat", 1.0)
    assert prompt == "a cat" and "sdl-error" in msg and "SDXL" in msg
    assert "does not fit the loaded" in cards_html(ctx)
    # after a refused mix the model still generates what it did before
    from sdlora.ui.generate_tab import run_generation as gen
    assert gen(ctx, "a red circle", steps=2, seed=3).paths


def test_library_cards_and_prompt_tags(ctx):
    from sdlora.ui.library_tab import add_to_prompt, cards_html, inspect_view
    page = cards_html(ctx)
    assert page.count('data-lora="') == 3
    assert "&lt;b&gt;tiny&lt;/b&gt;" in page and "<b>tiny</b>" not in page        # metadata is escaped
    assert "data:image/jpeg;base64," in page                                       # style.png preview
    assert addnet_hash(ctx.loras_dir / "style.safetensors")[:12] in page
    prompt, msg = add_to_prompt(ctx, "style", "a cat", 0.6)
    assert prompt == "a cat, <lora:style:0.6>, neonstyle" and "sdl-ok" in msg
    assert "style2" in cards_html(ctx, "style2") and 'data-lora="style"' not in cards_html(ctx, "style2")
    assert inspect_view(ctx, "style")["family"] == ctx.family
    from sdlora.ui.catalog import find_preview
    assert find_preview(ctx.loras_dir / "sub" / "style2.safetensors") is None
    write_image(ctx.loras_dir / "sub" / "style2.preview.png", "PNG")                  # A1111's other preview name
    assert find_preview(ctx.loras_dir / "sub" / "style2.safetensors") == ctx.loras_dir / "sub" / "style2.preview.png"
    assert cards_html(ctx).count("data:image/jpeg;base64,") == 2


def test_lora_folder_lists_only_loras(tmp_path):
    """Checkpoint folders (old ones were written beside the LoRA), optimizer/state files and other
    extensions are no LoRAs: not in the pickers, not as cards, not found by <lora:NAME>."""
    from sdlora.extra_networks import find_lora
    from sdlora.ui.catalog import Catalog
    from tiny import tiny_configs
    configs = tiny_configs("sd1")
    loras = tmp_path / "loras"
    write_lora(loras / "neon.safetensors", "sd1", configs, seed=1)
    step = loras / "neon-checkpoints" / "step-000300"
    write_lora(step / "neon-step000300.safetensors", "sd1", configs, seed=1)
    for f in ("optimizer.pt", "training_state.pt", "state.json"):
        (step / f).write_text("{}")
    other = loras / "runs" / "step-000001"                    # a checkpoint folder under any name
    write_lora(other / "x-step000001.safetensors", "sd1", configs, seed=1)
    (other / "state.json").write_text("{}")
    (loras / "notes.pt").write_bytes(b"not a LoRA")
    catalog = Catalog(loras)
    assert [p.name for p, _ in catalog.files()] == ["neon.safetensors"]
    assert [e.name for e in catalog.entries()] == ["neon"] and catalog.entries()[0].error is None
    assert find_lora("neon", loras) == loras / "neon.safetensors"
    for name in ("neon-step000300", "optimizer", "training_state", "x-step000001", "notes"):
        with pytest.raises(FileNotFoundError):
            find_lora(name, loras)


def test_mix_save_exact_and_svd(ctx):
    from sdlora.families import kohya_name
    from sdlora.ui.mix_tab import save_mixed
    rows = [("style", 0.75, None), ("style2", -0.5, None), (None, 1.0, None)]
    out, mixed = save_mixed(ctx, rows, "mix-exact", None)
    assert out == ctx.loras_dir / "mix-exact.safetensors" and mixed.method == "concat"
    assert read_lora(out, family=ctx.family, configs=ctx.component_configs()).family == ctx.family
    a, b = load_file(ctx.loras_dir / "style.safetensors"), load_file(ctx.loras_dir / "sub" / "style2.safetensors")
    m = load_file(out)
    name = kohya_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", ctx.family,
                      ctx.component_configs()["unet"])
    torch.testing.assert_close(lora_delta(m, name), 0.75 * lora_delta(a, name) - 0.5 * lora_delta(b, name),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(SdloraError, match="already exists"):
        save_mixed(ctx, rows, "mix-exact", None)
    out2, mixed2 = save_mixed(ctx, rows, "../mix-svd", 2)          # the name cannot leave the LoRA folder
    assert out2 == ctx.loras_dir / "mix-svd.safetensors" and mixed2.method == "svd"
    assert load_file(out2)[f"{name}.lora_down.weight"].shape[0] == 2
    with pytest.raises(SdloraError, match="empty"):
        save_mixed(ctx, [(None, 1, None)], "nothing", None)


def test_mix_block_preset_and_xy_grid(ctx):
    from sdlora.families import kohya_name
    from sdlora.ui.mix_tab import preview, save_mixed, xy_plot
    out, _ = save_mixed(ctx, [("style", 1.0, "OUTD")], "mix-outd", None)
    unet_cfg = ctx.component_configs()["unet"]
    keys = load_file(out)
    down_block = kohya_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", ctx.family, unet_cfg)
    assert f"{down_block}.lora_up.weight" not in keys              # OUTD switches the input blocks off
    res = preview(ctx, [("style", 1.0, "OUTD")], "a red circle", seed=3, steps=2)
    assert "<lora:style:1:lbw=OUTD>" in read_png(res.paths[0]).prompt
    path, n, info = xy_plot(ctx, [("style", 1.0, None), ("style2", 1.0, None)], 0, "0, 1", 1, "-1:1:3", "a red circle",
                      seed=3, steps=2)
    assert n == 6 and "X = style weight 0, 1; Y = style2 weight -1, 0, 1" in info
    with Image.open(path) as grid:
        cell = 128                                                  # 64 px cells scaled up for the labels
        assert grid.width > 2 * cell and grid.height > 3 * cell
    with pytest.raises(SdloraError, match="same LoRA"):
        xy_plot(ctx, [("style", 1.0, None), ("style2", 1.0, None)], 0, "0, 1", 0, "0, 1", "x", steps=2)


def test_app_arguments():
    import argparse
    from sdlora.ui.app import add_arguments, parse_auth, server_name
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args([])
    assert (a.port, a.listen, a.base, a.auth) == (7860, False, None, None)
    assert server_name(a.listen) == "127.0.0.1" and server_name(True) == "0.0.0.0"
    assert parse_auth("me:se:cret") == ("me", "se:cret") and parse_auth(None) is None
    for bad in ["me", ":x", "me:"]:
        with pytest.raises(ValueError, match="USER:PASS"):
            parse_auth(bad)


def test_grid_values():
    from sdlora.grid import MAX_VALUES, parse_values
    assert parse_values("0, 0.5,1") == [0.0, 0.5, 1.0]
    assert parse_values("-1:1:5") == [-1.0, -0.5, 0.0, 0.5, 1.0] and parse_values("0.3:9:1") == [0.3]
    for bad, msg in [("", "empty"), ("a, b", "not a list"), ("0:1:0", "not a list"), ("1, inf", "finite"),
                     (",".join(["1"] * (MAX_VALUES + 1)), "at most")]:
        with pytest.raises(SdloraError, match=msg):
            parse_values(bad)
