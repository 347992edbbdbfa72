"""UI handlers without a browser: path confinement, upload checks, prompt tags, reuse parameters,
the device lock and jobs, generation/mix/library/train handlers on the tiny base model."""
import os
from pathlib import Path
import threading
import time

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
from sdlora.ui import paths
from sdlora.ui.jobs import DeviceLock, Job, JobError, JobManager
from sdlora.ui.paths import PathError, Roots, UploadError
from tiny import base_spec
from loras import lora_delta, write_lora, write_sdxl_lora

STYLES = os.path.join(os.path.dirname(__file__), "..", "sample_data", "styles")


# ---------------------------------------------------------------------------------------------
# path confinement

@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "secret").mkdir(parents=True)
    (outside / "secret.png").write_bytes(b"x")
    return root, outside


def test_confine_inside(tree):
    root, _ = tree
    roots = Roots.of(root)
    assert roots.confine("imgs") == (root / "imgs").resolve()                  # relative to the first root
    assert roots.confine(str(root / "imgs")) == (root / "imgs").resolve()      # absolute inside
    assert roots.confine("imgs/../imgs") == (root / "imgs").resolve()          # .. that stays inside
    assert roots.confine("new", must_exist=False) == (root / "new").resolve()


@pytest.mark.parametrize("bad", ["..", "../outside/secret", "imgs/../../outside", "/etc", "/", "~"])
def test_confine_refuses_escapes(tree, bad):
    root, _ = tree
    with pytest.raises(PathError, match="outside the allowed folders"):
        Roots.of(root).confine(bad)


def test_confine_refuses_symlink_escapes(tree):
    root, outside = tree
    (root / "link").symlink_to(outside / "secret")
    with pytest.raises(PathError, match="outside the allowed folders"):
        Roots.of(root).confine("link")
    with pytest.raises(PathError, match="outside the allowed folders"):
        Roots.of(root).confine("link/..")          # resolved through the link: outside
    (root / "inner").symlink_to(root / "imgs")     # a link that stays inside is fine
    assert Roots.of(root).confine("inner") == (root / "imgs").resolve()
    # a link inside an allowed folder pointing out: the folder is refused for training
    (root / "imgs" / "x.png").symlink_to(outside / "secret.png")
    with pytest.raises(PathError, match="x.png"):
        Roots.of(root).confine_tree(root / "imgs")


def test_confine_other_errors(tree):
    root, _ = tree
    roots = Roots.of(root)
    for bad, msg in [("", "no folder given"), ("a\0b", "NUL"), ("missing", "does not exist")]:
        with pytest.raises(PathError, match=msg):
            roots.confine(bad)
    (root / "f.txt").write_text("x")
    with pytest.raises(PathError, match="is a file"):
        roots.confine("f.txt")
    with pytest.raises(PathError, match="no folders are allowed"):
        Roots.of().confine("x")


# ---------------------------------------------------------------------------------------------
# uploads

def _image(path, fmt, size=(8, 8)):
    Image.new("RGB", size, (200, 30, 30)).save(path, format=fmt)
    return path


@pytest.mark.parametrize("fmt,ext", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp")])
def test_check_image_by_content(tmp_path, fmt, ext):
    assert paths.check_image(_image(tmp_path / "upload.bin", fmt)) == ext


def test_check_image_refusals(tmp_path, monkeypatch):
    fake = tmp_path / "fake.png"
    fake.write_text("<html>not an image</html>")
    with pytest.raises(UploadError, match="not a PNG, JPEG"):
        paths.check_image(fake)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(UploadError, match="not a readable PNG"):
        paths.check_image(broken)
    big = _image(tmp_path / "big.png", "PNG", (64, 64))
    with pytest.raises(UploadError, match="over the"):
        paths.check_image(big, max_bytes=10)
    monkeypatch.setattr(paths, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UploadError, match="pixels"):
        paths.check_image(big)


def test_check_caption(tmp_path):
    ok = tmp_path / "a.txt"
    ok.write_text("neonstyle, a red circle", encoding="utf-8")
    assert paths.check_caption(ok) == "neonstyle, a red circle"
    for data, msg in [(b"\x00\x01", "binary"), (b"\xff\xfe\xfa", "UTF-8"), (b"x" * (paths.MAX_CAPTION_BYTES + 1), "too long")]:
        (tmp_path / "b.txt").write_bytes(data)
        with pytest.raises(UploadError, match=msg):
            paths.check_caption(tmp_path / "b.txt")


def test_import_training_upload(tmp_path):
    up = tmp_path / "up"
    up.mkdir()
    a = _image(up / "a.png", "PNG")
    b = _image(up / "b.png", "JPEG")          # named .png, holds a JPEG: stored as b.jpg
    cap = up / "a.txt"
    cap.write_text("neonstyle")
    dest = tmp_path / "data" / "set"
    assert paths.import_training_upload([a, b, cap], dest) == (2, 1)
    assert sorted(p.name for p in dest.iterdir()) == ["a.png", "a.txt", "b.jpg"]
    # one bad file: nothing is written
    bad = up / "c.png"
    bad.write_text("nope")
    with pytest.raises(UploadError, match="c.png"):
        paths.import_training_upload([a, bad], tmp_path / "data" / "other")
    assert not (tmp_path / "data" / "other").exists()
    with pytest.raises(UploadError, match="no images"):
        paths.import_training_upload([cap], tmp_path / "data" / "x")
    with pytest.raises(UploadError, match="no files"):
        paths.import_training_upload([], tmp_path / "data" / "x")
    same = up / "sub"
    same.mkdir()
    with pytest.raises(UploadError, match="several uploaded files"):
        paths.import_training_upload([a, _image(same / "a.png", "PNG")], tmp_path / "data" / "y")


def test_safe_name():
    assert paths.safe_name("../../etc/passwd") == "passwd"
    assert paths.safe_name("..\\..\\win.ini") == "win.ini"
    assert paths.safe_name("my style<1>") == "my style_1_"
    for bad in ["", "..", "/", " . "]:
        with pytest.raises(PathError):
            paths.safe_name(bad)


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
    assert values == {"prompt": "a red circle <lora:style:0.5:0.8>", "negative": "blurry, lowres", "sampler": "Euler a",
                      "steps": 12, "cfg": 6.5, "seed": 1234, "width": 64, "height": 48}
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
# device lock and jobs

def test_device_lock_is_fifo_and_shared_between_steps():
    lock = DeviceLock()
    order = []
    lock.acquire("training")
    waiting = []

    def gen(name):
        lock.acquire(name, on_wait=lambda holder: waiting.append((name, holder)))
        order.append(name)
        lock.release()

    t1 = threading.Thread(target=gen, args=("gen1",))
    t1.start()
    while lock.waiting < 1:
        time.sleep(0.01)
    t2 = threading.Thread(target=gen, args=("gen2",))
    t2.start()
    while lock.waiting < 2:
        time.sleep(0.01)
    order.append("step 1")
    lock.share("training")          # between two training steps: both waiting generations go first
    order.append("step 2")
    lock.release()
    t1.join()
    t2.join()
    assert order == ["step 1", "gen1", "gen2", "step 2"]
    assert ("gen1", "training") in waiting
    lock.acquire("x")
    lock.share("x")                  # nobody waiting: keeps the device
    assert lock.holder == "x"
    lock.release()


def test_job_failure_and_exclusivity():
    jobs = JobManager()
    gate = threading.Event()

    def slow(job):
        gate.wait(30)

    j1 = jobs.start(Job("train", "one"), slow)
    with pytest.raises(JobError, match="already running"):
        jobs.start(Job("train", "two"), slow)
    gate.set()
    assert jobs.wait(j1, 30) and j1.status == "done"

    def boom(job):
        raise SdloraError("the folder has no images")

    j2 = jobs.start(Job("train", "bad"), boom)
    jobs.wait(j2, 30)
    snap = jobs.latest("train").snapshot()
    assert snap["status"] == "failed" and snap["error"] == "the folder has no images"
    j3 = jobs.start(Job("train", "bug"), lambda job: 1 / 0)
    jobs.wait(j3, 30)
    assert j3.error.startswith("ZeroDivisionError")
    from sdlora.ui.train_tab import progress_html
    shown = progress_html(j2.snapshot())                      # what the page shows of the failed job
    assert 'data-status="failed"' in shown and "sdl-error" in shown and "the folder has no images" in shown


# ---------------------------------------------------------------------------------------------
# handlers on the tiny base model

@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from sdlora.ui.context import UiContext
    root = tmp_path_factory.mktemp("ui")
    c = UiContext(base=base_spec(), loras=root / "loras", outputs=root / "outputs", data_roots=[STYLES, root / "data"],
                  device="cpu")
    configs = c.component_configs()
    write_lora(c.loras_dir / "style.safetensors", c.family, configs, seed=1,
               metadata={"modelspec.trigger_phrase": "neonstyle", "ss_sd_model_name": "<b>tiny</b>"})
    write_lora(c.loras_dir / "sub" / "style2.safetensors", c.family, configs, seed=2)
    write_sdxl_lora(c.loras_dir / "xl_style.safetensors")
    _image(c.loras_dir / "style.png", "PNG", (32, 32))
    (root / "data").mkdir()
    return c


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
                           steps=3, seed=21, cfg=5.5, sampler="Euler")
    s = reuse_settings(infotext_of_png(first.paths[0]))
    assert s["prompt"] == "a blue square <lora:style:0.8>" and s["sampler"] == "Euler" and s["cfg"] == 5.5
    second = run_generation(ctx, s["prompt"], negative=s["negative"], steps=s["steps"], cfg=s["cfg"],
                            sampler=s["sampler"], seed=s["seed"], width=s["width"], height=s["height"])
    assert np.array_equal(_pixels(first)[0], _pixels(second)[0])
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
    _image(ctx.loras_dir / "sub" / "style2.preview.png", "PNG")                  # A1111's other preview name
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


def test_train_form_is_derived_from_the_config():
    from sdlora.training.config import TrainConfig, fields
    from sdlora.ui.train_tab import MANAGED, form_specs, from_form, to_form
    names = {s["name"] for s in form_specs()}
    assert names == {f.name for f in fields()} - set(MANAGED)
    spec = {s["name"]: s for s in form_specs()}
    assert from_form(spec["sample_prompts"], to_form(spec["sample_prompts"], ["a, b", "c"])) == ["a, b", "c"]
    assert from_form(spec["caption_extensions"], to_form(spec["caption_extensions"], [".txt", ".cap"])) == [".txt", ".cap"]
    assert from_form(spec["rank"], 8.0) == 8 and TrainConfig().rank == spec["rank"]["default"]


def test_start_training_refuses_bad_input(ctx, tmp_path):
    from sdlora.ui.train_tab import start_training
    for folder, msg in [("../../etc", "outside"), ("/tmp", "outside"), ("", "no training folder")]:
        with pytest.raises(PathError, match=msg):
            start_training(ctx, name="x", source="folder", folder=folder)
    with pytest.raises(SdloraError, match="already exists"):
        start_training(ctx, name="style", source="folder", folder=os.path.join(STYLES, "neon"))
    with pytest.raises(PathError, match="class_data_dir"):
        start_training(ctx, name="x", source="folder", folder=os.path.join(STYLES, "neon"),
                       values={"class_data_dir": "/etc"})
    with pytest.raises(SdloraError, match="no images uploaded"):
        start_training(ctx, name="x", source="upload", uploads=[])
    with pytest.raises(SdloraError, match="no checkpoint"):
        start_training(ctx, name="never-trained", source="folder", folder=os.path.join(STYLES, "neon"), resume=True)
    assert ctx.jobs.latest("train") is None                       # nothing was started


@pytest.mark.filterwarnings("ignore:resuming with other settings")
def test_training_job_shared_state_stop_resume(ctx):
    """A training runs in the background; generation runs between its steps; every page (session)
    sees the same job; stop saves a checkpoint and the LoRA; resume continues to the end."""
    from sdlora.ui.generate_tab import run_generation
    from sdlora.ui.library_tab import card_html, cards_html
    from sdlora.ui.train_tab import form_values, start_training, stop_training, view
    values = {"steps": 1000, "batch_size": 2, "lr_warmup_steps": 0, "trigger": "neonstyle"}
    job = start_training(ctx, name="bg", source="folder", folder=os.path.join(STYLES, "neon"), values=values,
                         preset="tiny-cpu-demo")
    deadline = time.time() + 120
    while job.step < 2 and job.active and time.time() < deadline:
        time.sleep(0.05)
    assert job.active and job.step >= 2, job.snapshot()
    res = run_generation(ctx, "a red circle", steps=2, seed=1)         # waits at most one training step
    assert res.paths and job.active and job.step < 1000
    page_a, page_b = view(ctx, None), view(ctx, None)                   # two tabs / a reopened page
    for page in (page_a, page_b):
        assert "<b>bg</b>" in page[0] and 'data-status="running"' in page[0] and "step " in page[0]
    stop_training(ctx)
    assert ctx.jobs.wait(job, 120) and job.status == "stopped", job.snapshot()
    stopped_at = job.step
    assert (ctx.loras_dir / "bg.safetensors").is_file() and job.checkpoint
    assert "bg" in ctx.catalog.names(ctx.family)                          # in the pickers, no restart
    with pytest.raises(SdloraError, match="no training is running"):
        stop_training(ctx)
    job2 = start_training(ctx, name="bg", source="folder", folder=os.path.join(STYLES, "neon"),
                          values={**values, "steps": stopped_at + 2}, preset="tiny-cpu-demo", resume=True)
    assert ctx.jobs.wait(job2, 120) and job2.status == "done", job2.snapshot()
    assert job2.resumed_from == stopped_at and job2.step == stopped_at + 2
    assert [s for s, _, _ in job2.losses] == list(range(1, job2.step + 1))   # the whole run, from the checkpoint
    assert any("warning: resuming with other settings (total steps)" in line for line in job2.log)  # shown in the page
    done = view(ctx, None)
    assert 'data-status="done"' in done[0] and "bg.safetensors" in done[0]
    assert len(done[1]) == 2 * job2.step and len(done[2]) == 0     # loss + smoothed per step; no samples asked
    assert set(done[1]["series"]) == {"loss per step", "smoothed loss (EMA 0.9)"}      # the legend says which is which
    # the LoRA's card image: the end of training wrote NAME.preview.png (no samples: one was rendered)
    assert (ctx.loras_dir / "bg.preview.png").is_file() and ctx.catalog.get("bg").preview.name == "bg.preview.png"
    assert 'data-lora="bg"' in cards_html(ctx) and "no preview" not in card_html(
        ctx.catalog.get("bg"), ctx.family, ctx.catalog.thumbnail(ctx.catalog.get("bg").preview))
    # a reloaded page refills the form from the job (name, folder, options), so Resume works as is
    vals = form_values(ctx, job2.snapshot())
    assert (vals["name"], vals["source"]) == ("bg", "folder") and Path(vals["folder"]) == Path(STYLES, "neon").resolve()
    assert vals["steps"] == stopped_at + 2 and vals["trigger"] == "neonstyle" and vals["class_data_dir"] == ""
    assert form_values(ctx, None) is None
    skip = type(__import__("gradio").skip())
    assert all(isinstance(x, skip) for x in view(ctx, done[-1])[:-1])  # unchanged job: the poll sends nothing
    job3 = start_training(ctx, name="", source="folder", folder=vals["folder"], values={**values, "steps": vals["steps"]},
                          preset="tiny-cpu-demo", resume=True)          # an empty name: the last run's
    assert job3.title == "bg" and ctx.jobs.wait(job3, 120) and job3.status == "done", job3.snapshot()


def test_several_folders_train_in_one_job_with_a_loss_curve_each(ctx):
    """Train tab, source "several folders": one LoRA per folder (named after it), one background
    job running training.multi.train_many, the bar summing the LoRAs' steps, one curve per LoRA."""
    from sdlora.ui.train_tab import start_training, view
    values = {"steps": 3, "batch_size": 2, "lr_warmup_steps": 0}
    folders = [os.path.join(STYLES, s) for s in ("neon", "toon")]
    kw = dict(name="", source="several folders", values=values, preset="tiny-cpu-demo")
    with pytest.raises(SdloraError, match="at least two"):
        start_training(ctx, folders=folders[:1], **kw)
    with pytest.raises(SdloraError, match="resumed from the command line"):
        start_training(ctx, folders=folders, resume=True, **kw)
    job = start_training(ctx, folders=folders, **kw)
    assert job.title == "neon + toon"
    assert ctx.jobs.wait(job, 300) and job.status == "done", job.snapshot()
    for n in ("neon", "toon"):
        assert (ctx.loras_dir / f"{n}.safetensors").is_file() and n in job.output
        assert [s for s, _, _ in job.curves[n]] == [1, 2, 3]
    assert job.step == job.total == 6 and job.losses == []
    done = view(ctx, None)
    assert set(done[1]["series"]) == {"neon: smoothed loss (EMA 0.9)", "toon: smoothed loss (EMA 0.9)"}
    assert len(done[1]) == 6 and 'data-status="done"' in done[0]
    with pytest.raises(SdloraError, match="already exist"):
        start_training(ctx, folders=folders, **kw)


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
