"""Grids as routed batches (sdlora.xy) through the UI handlers: the Mix tab's XY grid and the
Generate tab's "compare LoRA mixes", each cell checked against the same cell generated alone with
its mix patched into the weights (the old per-cell way), on the tiny base model."""
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.errors import FamilyMismatchError, SdloraError
from sdlora.extra_networks import LoraRef
from sdlora.generate import generate_batches, generate_prompts
from sdlora.hashes import addnet_hash
from sdlora.infotext import read_png
from sdlora.mixing import mixer_for
from sdlora.mixplan import components_of
from loras import write_lora, write_sdxl_lora
from tiny import base_spec

STYLES = os.path.join(os.path.dirname(__file__), "..", "sample_data", "styles")
STEPS = 3


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from sdlora.ui.context import UiContext
    root = tmp_path_factory.mktemp("ui-grids")
    c = UiContext(base=base_spec(), loras=root / "loras", outputs=root / "outputs", data_roots=[STYLES], device="cpu")
    configs = c.component_configs()
    write_lora(c.loras_dir / "style.safetensors", c.family, configs, seed=1)
    write_lora(c.loras_dir / "sub" / "style2.safetensors", c.family, configs, seed=2)
    return c


def _px(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _patched_alone(ctx, prompt, refs, seed):
    """The reference: one image, its mix patched into the weights (mode="patch")."""
    (r,) = generate_prompts(ctx.base, [prompt], loras=refs, seed=seed, steps=STEPS, lora_dir=ctx.loras_dir,
                            progress=False, mode="patch")
    assert r.mode == "patched"
    return _px(r.image)


def _state(pipe) -> dict:
    return {f"{c}.{k}": v.detach().clone() for c, m in components_of(pipe).items() for k, v in m.state_dict().items()}


def _hooks(pipe) -> dict:
    return {(c, n): (tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values()))
            for c, model in components_of(pipe).items() for n, m in model.named_modules()}


def _new_pngs(folder, before):
    """PNGs written since `before` (a set of names), in the order they were numbered."""
    made = [p for p in folder.glob("*.png") if p.name not in before]
    return sorted(made, key=lambda p: int(re.match(r"(\d+)-", p.name)[1]))


def _refs(ctx, a, b):
    from sdlora.ui.generate_tab import picked_refs
    return picked_refs(ctx, [("style", a, a), ("style2", b, b)])


def test_chunk_size_and_split():
    from sdlora.xy import CHUNK_PIXEL_BUDGET, MAX_CHUNK_IMAGES, chunk_size, split
    assert chunk_size(64, 64) == MAX_CHUNK_IMAGES == 9                # the tiny model's 3×3 in one run
    assert chunk_size(512, 512) == CHUNK_PIXEL_BUDGET // (512 * 512) == 8
    assert chunk_size(1024, 1024) == 2 and chunk_size(4096, 4096) == 1   # SDXL: never the whole grid at once
    assert chunk_size(64, 64, max_images=4) == 4
    assert [len(r) for r in split(9, 4)] == [3, 3, 3] and [len(r) for r in split(10, 9)] == [5, 5]
    assert [list(r) for r in split(5, 9)] == [[0, 1, 2, 3, 4]] and split(0, 3) == []


def test_xy_grid_is_one_routed_batch_equal_to_patched_cells(ctx):
    from sdlora.ui.generate_tab import run_generation
    from sdlora.ui.mix_tab import xy_plot
    pipe = ctx.base.pipe
    run_generation(ctx, "a red circle <lora:style:0.5>", steps=STEPS, seed=1)   # a mix left patched in
    mixer_for(pipe).restore()
    before, hooks_before = _state(pipe), _hooks(pipe)
    run_generation(ctx, "a red circle <lora:style:0.5>", steps=STEPS, seed=1)   # patched again: routing restores it
    folder = ctx.outputs_dir / "xy"
    seen = {p.name for p in folder.rglob("*.png")}
    calls = []
    xs, ys = [-1.0, 0.0, 1.0], [-0.5, 0.0, 1.5]
    path, n, info = xy_plot(ctx, [("style", 1.0, None), (None, 1.0, None), ("style2", 1.0, None)], 0, "-1, 0, 1",
                            2, "-0.5, 0, 1.5", "a red circle", seed=7, steps=STEPS,
                            progress=lambda f, d: calls.append((f, d)))
    # nothing left behind: the weights are the base's bit for bit, no hook of sdlora's remains
    after = _state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert _hooks(pipe) == hooks_before
    assert n == 9 and "X = style weight -1, 0, 1; Y = style2 weight -0.5, 0, 1.5" in info
    assert calls[-1][0] == 1.0 and all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    made = _new_pngs(path.parent, seen)
    assert len(made) == 10 and made[-1] == path            # 9 cells with their infotext, then the grid
    with Image.open(path) as grid:
        assert grid.width > 3 * 128 and grid.height > 3 * 128
    cells = [_px(Image.open(p)) for p in made[:9]]
    for k, p in enumerate(made[:9]):
        y, x = ys[k // 3], xs[k % 3]
        info_k = read_png(p)
        assert info_k.params["Seed"] == "7"                             # one seed for every cell
        assert info_k.prompt == f"a red circle <lora:style:{x:g}> <lora:style2:{y:g}>"
        ref = _patched_alone(ctx, "a red circle", _refs(ctx, x, y), 7)
        assert np.abs(cells[k] - ref).max() <= 1, (x, y)
    assert np.abs(cells[0] - cells[8]).max() > 10 and np.abs(cells[3] - cells[5]).max() > 10   # the LoRAs show


def test_weight_grid_in_chunks_equals_patched_cells(ctx):
    """The library function with a small chunk: 3 runs of 3 images, the same cells as patched."""
    from sdlora.xy import weight_grid
    refs = _refs(ctx, 1.0, 1.0)
    xs, ys = [0.0, 0.6, 1.2], [-1.0, 0.0, 1.0]
    g = weight_grid(ctx.base, "a blue square", refs, x=1, xs=xs, y=0, ys=ys, seed=4, steps=STEPS, chunk=4,
                    lora_dir=ctx.loras_dir, progress=False)
    assert g.chunks == [3, 3, 3] and {c.mode for c in g.cells} == {"routed"} and {c.seed for c in g.cells} == {4}
    assert g.x_title == "style2" and g.y_labels == ["-1", "0", "1"] and len(g.rows) == 3
    for k, cell in enumerate(g.cells):
        a, b = ys[k // 3], xs[k % 3]
        assert np.abs(_px(cell.image) - _patched_alone(ctx, "a blue square", _refs(ctx, a, b), 4)).max() <= 1, (a, b)
    with pytest.raises(SdloraError, match="same LoRA"):
        weight_grid(ctx.base, "x", refs, x=0, xs=[0], y=0, ys=[1], steps=1)
    with pytest.raises(SdloraError, match="not in the mix"):
        weight_grid(ctx.base, "x", refs, x=0, xs=[0], y=5, ys=[1], steps=1)


def test_compare_mixes_side_by_side(ctx):
    from sdlora.ui.generate_tab import compare_mixes, picked_refs
    style, style2 = ctx.loras_dir / "style.safetensors", ctx.loras_dir / "sub" / "style2.safetensors"
    text = "<lora:style:0.8> <lora:style2:-0.5>\n\n<lora:style:1:0.4>\n\n"      # trailing empty lines ignored
    res = compare_mixes(ctx, "a red circle", text, loras=picked_refs(ctx, [("style2", 0.3, 0.3)]), seed=5,
                        steps=STEPS)
    assert len(res.paths) == 3 and res.seeds == [5, 5, 5] and res.grid_path.is_file()
    assert res.grid.x_labels == ["<lora:style:0.8> <lora:style2:-0.5>", "(no LoRA)", "<lora:style:1:0.4>"]
    assert {c.mode for c in res.grid.cells} == {"routed"}
    infos = [read_png(p) for p in res.paths]
    assert [i.prompt for i in infos] == ["a red circle <lora:style2:0.3> <lora:style:0.8> <lora:style2:-0.5>",
                                         "a red circle <lora:style2:0.3>",
                                         "a red circle <lora:style2:0.3> <lora:style:1:0.4>"]
    h1, h2 = addnet_hash(style)[:12], addnet_hash(style2)[:12]
    assert [i.lora_hashes for i in infos] == [{"style2": h2, "style": h1}, {"style2": h2}, {"style2": h2, "style": h1}]
    mixes = [[LoraRef("style2", 0.3, 0.3, style2), LoraRef("style", 0.8, 0.8, style), LoraRef("style2", -0.5, -0.5, style2)],
             [LoraRef("style2", 0.3, 0.3, style2)],
             [LoraRef("style2", 0.3, 0.3, style2), LoraRef("style", 1.0, 0.4, style)]]
    for p, mix in zip(res.paths, mixes):
        with Image.open(p) as im:
            assert np.abs(_px(im) - _patched_alone(ctx, "a red circle", mix, 5)).max() <= 1, mix
    with Image.open(res.grid_path) as grid:
        assert grid.width > 3 * 128 and "Compare 3 LoRA mixes" in read_png(res.grid_path).prompt
    # a prompt tag applies to every cell, as the picked LoRAs do
    tagged = compare_mixes(ctx, "a red circle <lora:style2:0.3>", "\n<lora:style:1:0.4>", seed=5, steps=STEPS)
    assert np.abs(_px(tagged.images[0]) - _px(res.images[1])).max() <= 1
    assert np.abs(_px(tagged.images[1]) - _px(res.images[2])).max() <= 1


@pytest.mark.parametrize("text,match", [("", "no mixes"), ("\n\n", "no mixes"), ("neon <lora:style:1>", "no <lora"),
                                        ("<lora:style:abc>", "line 1.*not a number"),
                                        ("\n".join(["<lora:style:1>"] * 17), "at most 16")])
def test_compare_refuses_bad_mixes(ctx, text, match):
    from sdlora.ui.generate_tab import compare_mixes
    with pytest.raises(SdloraError, match=match):
        compare_mixes(ctx, "a red circle", text, steps=1)


def test_compare_missing_or_misfit_lora_fails_before_generating(ctx):
    from sdlora.ui.generate_tab import compare_mixes
    folder = ctx.outputs_dir / "compare"
    before = set(folder.rglob("*.png")) if folder.exists() else set()
    with pytest.raises(SdloraError, match="line 2: <lora:missing>"):
        compare_mixes(ctx, "a red circle", "<lora:style:1>\n<lora:missing:1>", steps=1)
    write_sdxl_lora(ctx.loras_dir / "xl_style.safetensors")
    with pytest.raises(FamilyMismatchError, match="SDXL"):
        compare_mixes(ctx, "a red circle", "<lora:style:1>\n<lora:xl_style:1>", steps=1)
    assert (set(folder.rglob("*.png")) if folder.exists() else set()) == before


def test_batches_run_on_from_one_seed(ctx):
    """generate_batches: the batch-count loop; seed -1 picks one start that all batches run on from."""
    runs = list(generate_batches(ctx.base, "a red circle", count=3, batch=2, seed=-1, steps=1, progress=False))
    seeds = [r.seed for run in runs for r in run]
    assert len(runs) == 3 and seeds == list(range(seeds[0], seeds[0] + 6))
    (again,) = generate_prompts(ctx.base, ["a red circle"], seeds=[seeds[2]], steps=1, progress=False)
    assert np.abs(_px(again.image) - _px(runs[1][0].image)).max() <= 1
