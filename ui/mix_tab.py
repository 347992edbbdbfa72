"""The Mix tab: several LoRAs with weights (negative too) and block-weight presets, a fixed-seed
preview, an XY grid over two LoRAs' weights, and "save mix as one LoRA" (exact or reduced rank).

The preview goes through `run_generation` (-> `sdlora.generate`, block weights as A1111 `lbw=`
tags), the XY grid through `run_grid` (-> `sdlora.xy.weight_grid`: all cells as routed batches,
one seed for all); saving calls `sdlora.merge.mix_loras` / `save_mix`, the functions of `sdlora mix`.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from sdlora.blocks import PRESETS
from sdlora.errors import SdloraError
from sdlora.extra_networks import parse_prompt
from sdlora.generate import native_size
from sdlora.grid import parse_values
from sdlora.merge import mix_loras, save_mix
from sdlora.mixing import MixEntry
from sdlora.samplers import DEFAULT_SAMPLER, SAMPLERS
from sdlora.ui.common import GradioProgress, error_html, status_html
from sdlora.ui.generate_tab import gen_options, output_folder, picked_refs, run_generation, run_grid
from sdlora.xy import weight_grid
from sdlora.ui.paths import safe_name

MIX_SLOTS = 4
ALL_BLOCKS = "(all blocks)"


def mix_refs(ctx, rows):
    """LoraRefs of the filled rows (name, weight, block preset or list); at least one."""
    picked = []
    for name, weight, blocks in rows:
        if name:
            spec = None if not blocks or blocks == ALL_BLOCKS else str(blocks).strip()
            picked.append((name, weight, weight, spec))
    if not picked:
        raise SdloraError("the mix is empty: choose at least one LoRA")
    return picked_refs(ctx, picked)


def preview(ctx, rows, prompt, *, negative="", seed=1, steps=20, cfg=7.0, sampler=DEFAULT_SAMPLER, width=None,
            height=None, progress=None):
    refs = mix_refs(ctx, rows)
    return run_generation(ctx, prompt, negative=negative, loras=refs, seed=seed, steps=steps, cfg=cfg,
                          sampler=sampler, width=width, height=height, progress=progress,
                          save_to=output_folder(ctx, "mix"), who="mix preview")


def xy_plot(ctx, rows, x_slot: int, x_text: str, y_slot: int, y_text: str, prompt, *, negative="", seed=1,
            steps=20, cfg=7.0, sampler=DEFAULT_SAMPLER, width=None, height=None, progress=None, chunk=None):
    """A grid of images: LoRA `x_slot`'s weight along X, `y_slot`'s along Y, everything else fixed,
    every cell with the same seed; all cells in routed batches of at most `chunk` images (default:
    sdlora.xy.chunk_size) by sdlora.xy.weight_grid. Each cell and the grid are saved.
    Returns (grid PNG path, number of cells, its description)."""
    xs, ys = parse_values(x_text, "X values"), parse_values(y_text, "Y values")
    names = [r[0] for r in rows]
    for slot in (x_slot, y_slot):
        if not 0 <= slot < len(rows) or not names[slot]:
            raise SdloraError(f"LoRA {slot + 1} is empty: choose a LoRA in that row or another axis")
    if x_slot == y_slot:
        raise SdloraError("X and Y are the same LoRA; pick two different rows")
    refs = mix_refs(ctx, rows)
    parse_prompt(prompt)
    filled = [i for i, r in enumerate(rows) if r[0]]             # rows index -> refs index
    ix, iy = filled.index(x_slot), filled.index(y_slot)
    opts = gen_options(ctx, negative=negative, sampler=sampler, steps=steps, cfg=cfg, width=width, height=height)
    seed = int(seed) if seed is not None else -1

    def make(base, on_step):
        return weight_grid(base, prompt, refs, x=ix, xs=xs, y=iy, ys=ys, seed=seed, chunk=chunk, on_step=on_step,
                           **opts)

    res = run_grid(ctx, make, progress=progress, save_to=output_folder(ctx, "xy"), who="XY grid")
    return res.grid_path, len(res.grid.cells), res.grid.info


def save_mixed(ctx, rows, name: str, rank: int | None, overwrite: bool = False):
    """Write the mix as one LoRA into the LoRA folder (exact when rank is None). Returns (path, MixedLora)."""
    refs = mix_refs(ctx, rows)
    stem = safe_name(name, what="mix name")
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    out = ctx.lora_path(stem)
    if out.exists() and not overwrite:
        raise SdloraError(f"{out.name} already exists in {ctx.loras_dir}; choose another name or tick overwrite")
    entries = [MixEntry.of(r) for r in refs]
    configs = ctx.component_configs()
    mixed = mix_loras(entries, rank=int(rank) if rank else None, family=ctx.family, configs=configs)
    save_mix(out, mixed, entries, configs=configs)
    return out, mixed


def describe_mix(path: Path, mixed) -> str:
    total = sum(mixed.modules.values())
    if mixed.method == "concat":
        return f"saved {path.name}: exact merge (ranks concatenated), {total} modules"
    errs = ", ".join(f"{c} {e:.3g}" for c, e in mixed.errors.items())
    return f"saved {path.name}: rank {mixed.rank} by SVD, {total} modules; relative error {errs}"


# ---------------------------------------------------------------------------------------------
# the page

def build(ctx):
    side = native_size(ctx.base.pipe)
    names = ctx.catalog.names(ctx.family)
    blocks = [ALL_BLOCKS, *PRESETS]
    pickers, weights, presets = [], [], []
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gr.Markdown("Choose LoRAs and their weights (negative weights subtract a style). A block preset "
                        "restricts a LoRA to some UNet blocks (A1111 LoRA Block Weight names, or type 17 numbers).")
            for i in range(MIX_SLOTS):
                with gr.Row(elem_id=f"mix-row-{i}"):
                    pickers.append(gr.Dropdown(names, value=None, label=f"LoRA {i + 1}", elem_id=f"mix-lora-{i}",
                                               scale=3))
                    weights.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="weight", elem_id=f"mix-weight-{i}",
                                             scale=3))
                    presets.append(gr.Dropdown(blocks, value=ALL_BLOCKS, allow_custom_value=True, label="blocks",
                                               elem_id=f"mix-blocks-{i}", scale=2))
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="mix-prompt",
                                placeholder="the LoRAs above are applied; tags in the prompt add more")
            negative = gr.Textbox(label="Negative prompt", elem_id="mix-negative")
            with gr.Row():
                seed = gr.Number(value=1, precision=0, label="Seed (fixed)", elem_id="mix-seed")
                steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="mix-steps")
                cfg = gr.Slider(1, 30, value=7.0, step=0.5, label="CFG scale", elem_id="mix-cfg")
                sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler", elem_id="mix-sampler")
            preview_btn = gr.Button("Preview", variant="primary", elem_id="mix-preview")
            with gr.Accordion("XY grid over two LoRAs' weights", open=True):
                with gr.Row():
                    x_slot = gr.Dropdown([(f"LoRA {i + 1}", i) for i in range(MIX_SLOTS)], value=0, label="X: LoRA",
                                         elem_id="mix-x-slot")
                    x_values = gr.Textbox("0, 0.5, 1", label="X weights", elem_id="mix-x-values")
                    y_slot = gr.Dropdown([(f"LoRA {i + 1}", i) for i in range(MIX_SLOTS)], value=1, label="Y: LoRA",
                                         elem_id="mix-y-slot")
                    y_values = gr.Textbox("0, 1", label="Y weights", elem_id="mix-y-values")
                grid_btn = gr.Button("Make XY grid", elem_id="mix-grid")
            with gr.Accordion("Save the mix as one LoRA", open=True):
                with gr.Row():
                    mix_name = gr.Textbox(label="Name", placeholder="my-mix", elem_id="mix-name")
                    method = gr.Radio(["exact (ranks concatenated)", "reduced rank (SVD)"],
                                      value="exact (ranks concatenated)", label="Method", elem_id="mix-method")
                    rank = gr.Number(value=16, precision=0, minimum=1, label="rank (SVD)", elem_id="mix-rank")
                    overwrite = gr.Checkbox(False, label="overwrite", elem_id="mix-overwrite")
                save_btn = gr.Button("Save mix", elem_id="mix-save")
        with gr.Column(scale=2, min_width=320):
            status = gr.HTML(elem_id="mix-status", js_on_load=None)
            image = gr.Image(label="Preview / grid", type="filepath", interactive=False, elem_id="mix-image",
                             format="png", height=480)
            infotext = gr.Textbox(label="Infotext", lines=4, elem_id="mix-infotext")

    c = dict(pickers=pickers, weights=weights, presets=presets, prompt=prompt, negative=negative, seed=seed,
             steps=steps, cfg=cfg, sampler=sampler, x_slot=x_slot, x_values=x_values, y_slot=y_slot,
             y_values=y_values, mix_name=mix_name, method=method, rank=rank, overwrite=overwrite, status=status,
             image=image, infotext=infotext)
    _wire(ctx, c, side, preview_btn=preview_btn, grid_btn=grid_btn, save_btn=save_btn)
    return dict(pickers=pickers, status=status, image=image)


def _wire(ctx, c, side: int, *, preview_btn, grid_btn, save_btn) -> None:
    """Preview, XY grid and save: each handler gets its inputs as a dict of values by component."""
    slots = set(c["pickers"]) | set(c["weights"]) | set(c["presets"])
    gen = {c[k] for k in ("prompt", "negative", "seed", "steps", "cfg", "sampler")}
    shown = [c["image"], c["infotext"], c["status"]]

    def rows_of(v):
        return list(zip(*([v[x] for x in c[col]] for col in ("pickers", "weights", "presets"))))

    def gen_kwargs(v):
        s = v[c["seed"]]
        return dict(negative=v[c["negative"]], seed=int(s if s is not None else 1), steps=v[c["steps"]],
                    cfg=v[c["cfg"]], sampler=v[c["sampler"]], width=side, height=side)

    def on_preview(v, progress=gr.Progress()):
        try:
            res = preview(ctx, rows_of(v), v[c["prompt"]], progress=GradioProgress(progress), **gen_kwargs(v))
        except Exception as e:  # noqa: BLE001
            return gr.skip(), gr.skip(), error_html(e, "Preview")
        return str(res.paths[0]), res.infotexts[0], status_html(f"preview with seed {res.seeds[0]} "
                                                                 f"({res.seconds:.1f} s)", "ok")

    def on_grid(v, progress=gr.Progress()):
        try:
            path, n, info = xy_plot(ctx, rows_of(v), int(v[c["x_slot"]]), v[c["x_values"]], int(v[c["y_slot"]]),
                                    v[c["y_values"]], v[c["prompt"]], progress=GradioProgress(progress),
                                    **gen_kwargs(v))
        except Exception as e:  # noqa: BLE001
            return gr.skip(), gr.skip(), error_html(e, "XY grid")
        return str(path), info, status_html(f"XY grid of {n} images: {path.name}", "ok")

    def on_save(v):
        try:
            how, r = v[c["method"]], v[c["rank"]]
            if not how.startswith("exact") and not r:
                raise SdloraError("reduced rank: enter the rank to keep (e.g. 16)")
            path, mixed = save_mixed(ctx, rows_of(v), v[c["mix_name"]], None if how.startswith("exact") else r,
                                     bool(v[c["overwrite"]]))
        except Exception as e:  # noqa: BLE001
            return error_html(e, "Saving the mix")
        return status_html(describe_mix(path, mixed), "ok")

    preview_btn.click(on_preview, slots | gen, shown, concurrency_limit=None)
    grid_btn.click(on_grid, slots | gen | {c[k] for k in ("x_slot", "x_values", "y_slot", "y_values")}, shown,
                   concurrency_limit=None)
    save_btn.click(on_save, slots | {c[k] for k in ("mix_name", "method", "rank", "overwrite")}, [c["status"]])
