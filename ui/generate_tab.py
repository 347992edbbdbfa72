"""The Generate tab: prompt (A1111 `<lora:...>` tags), LoRA picker with per-LoRA weights, sampler
settings, a gallery with infotexts, "reuse parameters", PNGs saved with A1111 infotext.

`run_generation` is the whole action without Gradio: it calls `sdlora.generate.generate_batches`
and `save_png` (what `sdlora generate` calls) under the device lock. The Mix tab uses it too.
`compare_mixes` (the "compare LoRA mixes" box) and the Mix tab's XY grid run one routed batch of
per-image mixes through `run_grid` (-> `sdlora.xy`).
"""
from __future__ import annotations

import datetime
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from sdlora.errors import FamilyMismatchError, SdloraError
from sdlora.extra_networks import LoraRef, parse_prompt
from sdlora.generate import DEFAULT_CFG, DEFAULT_STEPS, Generated, generate_batches, native_size, save_png
from sdlora.guidance import check_s_min_uncond
from sdlora.infotext import parse as parse_infotext
from sdlora.infotext import read_png
from sdlora.samplers import DEFAULT_SAMPLER, SAMPLERS
from sdlora.ui.common import GradioProgress, error_html, status_html
from sdlora.ui.paths import check_image
from sdlora.xy import compare_grid, parse_mixes

MAX_SLOTS = 6           # LoRAs chosen in the picker (any number more can go in the prompt as tags)
MAX_BATCH, MAX_COUNT = 8, 16


@dataclass
class GenerationResult:
    paths: list[Path] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    images: list = field(default_factory=list)       # PIL images, in order
    seconds: float = 0.0
    grid: object = None                              # run_grid: the sdlora.xy.MixGrid
    grid_path: Path | None = None                    # run_grid: its labelled PNG


def picked_refs(ctx, picked) -> list[LoraRef]:
    """LoraRefs for the picker's (name, unet weight, te weight) rows; a LoRA that is gone or does not
    fit the loaded base model is refused with the reason."""
    refs = []
    for name, unet, te, *rest in picked:
        entry = ctx.catalog.get(name)
        if entry is None:
            raise SdloraError(f"LoRA {name!r} is not in {ctx.loras_dir}; pick one from the list")
        why = entry.misfit_reason(ctx.family)
        if why:
            raise FamilyMismatchError(why)
        refs.append(LoraRef(name, float(te), float(unet), entry.path, blocks=(rest[0] if rest else None) or None))
    return refs


def output_folder(ctx, kind: str = "txt2img") -> Path:
    return ctx.outputs_dir / kind / datetime.date.today().isoformat()


def gen_options(ctx, *, negative: str = "", sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
                cfg: float = DEFAULT_CFG, width: int | None = None, height: int | None = None,
                s_min_uncond: float = 0.0) -> dict:
    """The generate_prompts options every UI generation passes (LoRA tags looked up in the LoRA folder),
    checked here so a bad value fails before waiting for the device."""
    s_min_uncond = float(s_min_uncond or 0)
    check_s_min_uncond(s_min_uncond)
    return dict(negative=negative or "", sampler=sampler, steps=int(steps), cfg=float(cfg),
                width=int(width) if width else None, height=int(height) if height else None,
                s_min_uncond=s_min_uncond, lora_dir=ctx.loras_dir, progress=False)


@contextmanager
def on_device(ctx, who: str, progress):
    """Hold the device lock (FIFO between sessions), saying so in the progress bar while queued."""
    progress(0.0, "waiting for the device")
    with ctx.device_lock.hold(who, on_wait=lambda holder: progress(0.0, f"queued: the device is busy ({holder})")):
        yield ctx.base


def _keep(out: GenerationResult, results, folder: Path) -> None:
    for r in results:
        out.paths.append(save_png(r, folder))
        out.infotexts.append(r.infotext)
        out.seeds.append(r.seed)
        out.images.append(r.image)


def run_generation(ctx, prompt: str, *, negative: str = "", loras=(), sampler: str = DEFAULT_SAMPLER,
                   steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, seed: int = -1, width: int | None = None,
                   height: int | None = None, s_min_uncond: float = 0.0, batch_size: int = 1, batch_count: int = 1,
                   progress=None, save_to: Path | None = None, who: str = "generation") -> GenerationResult:
    """Generate `batch_count` batches of `batch_size` images (seeds seed, seed+1, ... across all of
    them, as A1111: sdlora.generate.generate_batches), save each as a PNG with its infotext; returns
    paths, infotexts and seeds."""
    progress = progress or GradioProgress()
    batch_size, batch_count = int(batch_size), int(batch_count)
    if not 1 <= batch_size <= MAX_BATCH or not 1 <= batch_count <= MAX_COUNT:
        raise SdloraError(f"batch size must be 1-{MAX_BATCH} and batch count 1-{MAX_COUNT}")
    parse_prompt(prompt)                         # a malformed tag fails before waiting for the device
    opts = gen_options(ctx, negative=negative, sampler=sampler, steps=steps, cfg=cfg, width=width, height=height,
                       s_min_uncond=s_min_uncond)
    out, folder = GenerationResult(), save_to or output_folder(ctx)

    def on_step(n, done, total):
        progress((n + done / total) / batch_count, f"batch {n + 1}/{batch_count}: step {done}/{total}")

    with on_device(ctx, who, progress) as base:
        t0 = time.time()
        for results in generate_batches(base, prompt, count=batch_count, batch=batch_size,
                                        seed=int(seed) if seed is not None else -1, loras=list(loras),
                                        on_step=on_step, **opts):
            _keep(out, results, folder)
        out.seconds = time.time() - t0
    progress(1.0, "done")
    return out


def run_grid(ctx, make, *, progress=None, save_to: Path | None = None, who: str = "grid") -> GenerationResult:
    """`make(base, on_step)` -> an sdlora.xy.MixGrid, run under the device lock; every cell is saved
    with its infotext, then the labelled grid (its text: the grid's description)."""
    progress = progress or GradioProgress()
    out, folder = GenerationResult(), save_to or output_folder(ctx)

    def on_step(done, total):
        progress(done / total, f"{who}: step {done}/{total}")

    with on_device(ctx, who, progress) as base:
        t0 = time.time()
        out.grid = make(base, on_step)
        out.seconds = time.time() - t0
    _keep(out, out.grid.cells, folder)
    out.grid_path = save_png(Generated(out.grid.image, out.grid.cells[0].seed, out.grid.info), folder)
    progress(1.0, "done")
    return out


def compare_mixes(ctx, prompt: str, mixes_text: str, *, loras=(), seed: int = -1, progress=None,
                  save_to: Path | None = None, **options) -> GenerationResult:
    """The "compare" grid: `prompt` with each mix of `mixes_text` (one per line, `<lora:a:0.8>
    <lora:b:-0.5>`; an empty line: no LoRA) on top of `loras` and the prompt's tags, same seed, one
    routed batch (sdlora.xy.compare_grid). `options`: gen_options'."""
    parse_prompt(prompt)
    labels, mixes = parse_mixes(mixes_text, ctx.loras_dir)
    opts = gen_options(ctx, **options)
    seed = int(seed) if seed is not None else -1
    return run_grid(ctx, lambda base, step: compare_grid(base, prompt, mixes, labels, loras=list(loras), seed=seed,
                                                         on_step=step, **opts),
                    progress=progress, save_to=save_to or output_folder(ctx, "compare"), who="compare grid")


def reuse_settings(text: str) -> dict:
    """The generation settings in an infotext (A1111/Forge/Civitai/sdlora), for "reuse parameters"."""
    if not (text or "").strip():
        raise SdloraError("no parameters to reuse: paste an infotext or drop a PNG made by A1111, ComfyUI "
                          "(A1111 format) or sdlora")
    return parse_infotext(text).settings()


def infotext_of_png(path) -> str:
    """The `parameters` text of an uploaded PNG (checked to be an image first)."""
    check_image(path)
    info = read_png(path)
    if info is None:
        raise SdloraError(f"{Path(path).name} has no generation parameters (no A1111 `parameters` text chunk)")
    return info.build()


# ---------------------------------------------------------------------------------------------
# the page

REUSE_FIELDS = ("prompt", "negative", "sampler", "steps", "cfg", "seed", "width", "height", "s_min_uncond")


def reuse_updates(text: str) -> list:
    """Outputs of "reuse parameters": the REUSE_FIELDS (unchanged where the infotext lacks them), the
    LoRA picker (emptied: the LoRAs are tags in the reused prompt) and a status line."""
    try:
        s = reuse_settings(text)
    except Exception as e:  # noqa: BLE001
        return [gr.skip()] * (len(REUSE_FIELDS) + 1) + [error_html(e, "Reuse parameters")]
    note = ""
    if s.get("sampler") is not None and s["sampler"] not in SAMPLERS:
        note = f" (sampler {s.pop('sampler')!r} is not available here; kept the current one)"
    s.setdefault("negative", "")
    values = [s[k] if k in s else gr.skip() for k in REUSE_FIELDS]
    return values + [[], status_html("parameters reused" + note, "ok")]


def slot_updates(picked, prev_names, unet_values, te_values):
    """Show one row of sliders per picked LoRA, keeping each LoRA's weights when the choice changes."""
    picked = list(picked or [])[:MAX_SLOTS]
    prev = {n: (u, t) for n, u, t in zip(prev_names or [], unet_values, te_values)}
    rows, unets, tes = [], [], []
    for i in range(MAX_SLOTS):
        if i < len(picked):
            u, t = prev.get(picked[i], (1.0, 1.0))
            rows.append(gr.update(visible=True))
            unets.append(gr.update(value=u, label=f"{picked[i]}: weight (UNet)"))
            tes.append(gr.update(value=t, label="text-encoder weight"))
        else:
            rows.append(gr.update(visible=False))
            unets.append(gr.update(value=1.0))
            tes.append(gr.update(value=1.0))
    return [*rows, *unets, *tes, picked]


def _settings(side: int) -> dict:
    """The sampler / size / batch / seed rows."""
    c = {}
    with gr.Row():
        c["sampler"] = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler", elem_id="gen-sampler")
        c["steps"] = gr.Slider(1, 150, value=DEFAULT_STEPS, step=1, label="Steps", elem_id="gen-steps")
        c["cfg"] = gr.Slider(1, 30, value=DEFAULT_CFG, step=0.5, label="CFG scale", elem_id="gen-cfg")
        # A1111's "Negative Guidance minimum sigma" (Settings > Optimizations), here next to the CFG scale
        c["s_min_uncond"] = gr.Slider(0, 15, value=0, step=0.1, elem_id="gen-ngms",
                                      label="No CFG below sigma (NGMS; 0: off)")
    with gr.Row():
        c["width"] = gr.Slider(32, 2048, value=side, step=8, label="Width", elem_id="gen-width")
        c["height"] = gr.Slider(32, 2048, value=side, step=8, label="Height", elem_id="gen-height")
    with gr.Row():
        c["batch_size"] = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch size", elem_id="gen-batch-size")
        c["batch_count"] = gr.Slider(1, MAX_COUNT, value=1, step=1, label="Batch count", elem_id="gen-batch-count")
    with gr.Row():
        c["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id="gen-seed", scale=3)
        c["random_seed"] = gr.Button("random", size="sm", scale=1, elem_id="gen-seed-random")
        c["last_seed"] = gr.Button("last seed", size="sm", scale=1, elem_id="gen-seed-last")
    return c


def _layout(ctx) -> dict:
    """The tab's components by name (unet_sliders, te_sliders, slot_rows: one per picker slot)."""
    base = ctx.base
    c = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            c["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id="gen-prompt",
                                     placeholder="a red circle on a blue background <lora:NAME:0.8>  "
                                                 "(<lora:NAME:TE:UNET> sets the text-encoder weight first, as in A1111)")
            c["negative"] = gr.Textbox(label="Negative prompt", lines=2, elem_id="gen-negative")
        with gr.Column(scale=1, min_width=220):
            c["go"] = gr.Button("Generate", variant="primary", elem_id="gen-go", size="lg")
            c["status"] = gr.HTML(elem_id="gen-status", js_on_load=None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            c["picker"] = gr.Dropdown(choices=ctx.catalog.names(ctx.family), value=[], multiselect=True,
                                      max_choices=MAX_SLOTS, elem_id="gen-loras",
                                      label=f"LoRAs (from {ctx.loras_dir}; only those that fit {base.name})")
            c["slot_rows"], c["unet_sliders"], c["te_sliders"] = [], [], []
            for i in range(MAX_SLOTS):
                with gr.Row(visible=False, elem_id=f"gen-slot-{i}") as row:
                    c["unet_sliders"].append(gr.Slider(-2, 2, value=1.0, step=0.05, label="weight (UNet)",
                                                       elem_id=f"gen-slot-{i}-unet", scale=2))
                    c["te_sliders"].append(gr.Slider(-2, 2, value=1.0, step=0.05, label="text-encoder weight",
                                                     elem_id=f"gen-slot-{i}-te", scale=2))
                c["slot_rows"].append(row)
            c.update(_settings(native_size(base.pipe)))
            with gr.Accordion("Compare LoRA mixes (same prompt and seed, one image per mix)", open=False,
                              elem_id="gen-compare-box"):
                c["compare_text"] = gr.Textbox(label="Mixes, one per line (an empty line: no LoRA)", lines=4,
                                               elem_id="gen-compare-mixes",
                                               placeholder="<lora:a:0.8> <lora:b:-0.5>\n\n<lora:a:1>")
                c["compare"] = gr.Button("Compare", elem_id="gen-compare")
            with gr.Accordion("Reuse parameters (paste an infotext or drop a PNG)", open=False, elem_id="gen-reuse-box"):
                c["paste"] = gr.Textbox(label="Infotext", lines=4, elem_id="gen-paste",
                                        placeholder="a red circle <lora:neon:0.8>\nNegative prompt: ...\nSteps: 20, Sampler: ...")
                c["png"] = gr.File(label="PNG with parameters", file_types=[".png"], type="filepath", elem_id="gen-png")
                c["reuse"] = gr.Button("Reuse parameters", elem_id="gen-reuse")
        with gr.Column(scale=2, min_width=320):
            c["gallery"] = gr.Gallery(label="Results", columns=3, height=420, object_fit="contain",
                                      elem_id="gen-gallery", format="png", interactive=False)
            c["infotext"] = gr.Textbox(label="Infotext of the selected image", lines=5, elem_id="gen-infotext",
                                       buttons=["copy"])
            c["reuse_shown"] = gr.Button("Reuse this image's parameters", size="sm", elem_id="gen-reuse-shown")
    return c


OPTION_FIELDS = ("negative", "sampler", "steps", "cfg", "width", "height", "s_min_uncond")   # gen_options' keywords


def _picked(ctx, c, v) -> list[LoraRef]:
    """The picker's LoRAs with their sliders' weights, from the event's values `v` (by component)."""
    names = (v[c["picker"]] or [])[:MAX_SLOTS]
    return picked_refs(ctx, [(name, v[c["unet_sliders"][i]], v[c["te_sliders"][i]]) for i, name in enumerate(names)])


def _shown(res: GenerationResult, what: str) -> list:
    """Outputs of a finished generation: gallery items, first infotext, status, infotexts, seed used."""
    paths, texts, seeds = list(res.paths), list(res.infotexts), list(res.seeds)
    items = [(str(p), f"seed {s}") for p, s in zip(paths, seeds)]
    if res.grid_path is not None:                 # the labelled grid first, then its cells
        items.insert(0, (str(res.grid_path), "grid"))
        texts.insert(0, res.grid.info)
    note = (f"{what + ': ' if what else ''}{len(paths)} image(s) in {res.seconds:.1f} s · seed used: {seeds[0]}"
            f"{f'..{seeds[-1]}' if len(set(seeds)) > 1 else ''} · saved in {paths[0].parent}")
    return [items, texts[0], status_html(note, "ok"), texts, seeds[0]]


def _wire_generate(ctx, c, infotexts, used_seed) -> None:
    """Generate and Compare: inputs by component (a dict of values), same outputs."""
    fields = ["prompt", *OPTION_FIELDS, "seed", "picker"]
    common = {c[k] for k in fields} | set(c["unet_sliders"]) | set(c["te_sliders"])
    outputs = [c["gallery"], c["infotext"], c["status"], infotexts, used_seed]

    def on_generate(v, progress=gr.Progress()):
        try:
            res = run_generation(ctx, v[c["prompt"]], loras=_picked(ctx, c, v), seed=v[c["seed"]],
                                 batch_size=v[c["batch_size"]], batch_count=v[c["batch_count"]],
                                 progress=GradioProgress(progress), **{k: v[c[k]] for k in OPTION_FIELDS})
        except Exception as e:  # noqa: BLE001 - every failure is shown in the page
            return {c["status"]: error_html(e, "Generation")}   # the other outputs stay as they are
        return _shown(res, "")

    def on_compare(v, progress=gr.Progress()):
        try:
            res = compare_mixes(ctx, v[c["prompt"]], v[c["compare_text"]], loras=_picked(ctx, c, v),
                                seed=v[c["seed"]], progress=GradioProgress(progress),
                                **{k: v[c[k]] for k in OPTION_FIELDS})
        except Exception as e:  # noqa: BLE001
            return {c["status"]: error_html(e, "Compare")}   # the other outputs stay as they are
        return _shown(res, f"compared {len(res.paths)} mixes")

    c["go"].click(on_generate, common | {c["batch_size"], c["batch_count"]}, outputs, concurrency_limit=None,
                  show_progress_on=[c["gallery"]])
    c["compare"].click(on_compare, common | {c["compare_text"]}, outputs, concurrency_limit=None,
                       show_progress_on=[c["gallery"]])


def _wire_reuse(c, infotexts, used_seed) -> None:
    """Gallery selection, seed buttons, PNG upload and "reuse parameters"."""
    def on_select(texts, evt: gr.SelectData):
        return texts[evt.index] if texts and evt.index is not None and evt.index < len(texts) else gr.skip()

    c["gallery"].select(on_select, [infotexts], [c["infotext"]], show_progress="hidden")
    c["random_seed"].click(lambda: -1, None, c["seed"], show_progress="hidden")
    c["last_seed"].click(lambda s: s if s is not None else gr.skip(), used_seed, c["seed"], show_progress="hidden")

    def on_png(path):
        if not path:
            return gr.skip(), gr.skip()
        try:
            return infotext_of_png(path), status_html(f"read the parameters of {Path(path).name}", "ok")
        except Exception as e:  # noqa: BLE001
            return gr.skip(), error_html(e, "Reading the PNG")

    c["png"].upload(on_png, c["png"], [c["paste"], c["status"]], show_progress="hidden")
    settings_out = [c[k] for k in REUSE_FIELDS] + [c["picker"], c["status"]]
    c["reuse"].click(reuse_updates, c["paste"], settings_out, show_progress="hidden")
    c["reuse_shown"].click(reuse_updates, c["infotext"], settings_out, show_progress="hidden")


def build(ctx):
    """The tab's components (returned, so the app can wire other tabs to them) and events."""
    c = _layout(ctx)
    picked_names = gr.State([])        # per browser tab
    infotexts = gr.State([])
    used_seed = gr.State(None)
    c["picker"].change(lambda p, prev, *v: slot_updates(p, prev, v[:MAX_SLOTS], v[MAX_SLOTS:]),
                       [c["picker"], picked_names, *c["unet_sliders"], *c["te_sliders"]],
                       [*c["slot_rows"], *c["unet_sliders"], *c["te_sliders"], picked_names], show_progress="hidden")
    _wire_generate(ctx, c, infotexts, used_seed)
    _wire_reuse(c, infotexts, used_seed)
    return {k: c[k] for k in ("prompt", "negative", "picker", "status", "gallery", "infotext", "seed", "sampler",
                              "steps", "cfg", "width", "height")}
