"""The Train tab: a folder (inside the allowed roots) or uploaded images + captions, a preset, the
main options, an advanced section, start / stop / resume, live progress, loss plot and samples.

The form is derived from `training.config.form_fields()` (the one declaration of every option), so
a new trainer option appears here without touching this file. Training runs as a background job
(`ui/jobs.py`): the page only starts it and polls its state.
"""
from __future__ import annotations

import html
import json
import math
from functools import partial
from pathlib import Path

import gradio as gr

from sdlora.errors import SdloraError
from sdlora.training.config import GROUPS, build_config, form_fields, load_preset, option_names, presets
from sdlora.ui.common import error_html, status_html
from sdlora.ui.jobs import Job, SharingControl, run_training
from sdlora.ui.paths import import_training_upload, safe_name, unique_folder

# where each option goes is declared with the option (training/config.py: ui=, path=): "main" ones at
# the top, every other one in "Advanced", grouped as in the config; "managed" ones are set by the tab
# from the folders it controls (the page never names these paths); other paths are confined to the
# allowed roots
MAIN = option_names(ui="main")
MANAGED = option_names(ui="managed")
PATH_FIELDS = tuple(n for n in option_names(path=True) if n not in MANAGED)
LOSS, SMOOTHED = "loss per step", "smoothed loss (EMA 0.9)"      # the plot's legend
# keeps the log's newest line in view (a value update alone leaves the textarea scrolled up)
SCROLL_LOG_JS = "() => { const t = document.querySelector('#train-log textarea'); if (t) t.scrollTop = t.scrollHeight; }"
SOURCES = ("folder", "upload", "several folders")   # several: one LoRA per folder, trained in one run


def form_specs() -> list[dict]:
    return [f for f in form_fields() if f["name"] not in MANAGED]


def to_form(spec: dict, value):
    return "\n".join(map(str, value)) if spec["type"] == "list" and not spec["choices"] else value


def from_form(spec: dict, value):
    """A form value as the config wants it (list textboxes: one item per line or comma)."""
    if spec["type"] == "list" and not spec["choices"]:
        text = value or ""
        sep = "\n" if "\n" in text or spec["name"] == "sample_prompts" else ","
        return [v.strip() for v in text.split(sep) if v.strip()]
    if spec["type"] == "int" and value is not None:
        return int(value)
    return value


def default_preset(ctx) -> str:
    """tiny-cpu-demo for a tiny base model, the family's style preset otherwise."""
    from sdlora.generate import native_size
    if native_size(ctx.base.pipe) <= 128:
        return "tiny-cpu-demo"
    return "style-sdxl" if ctx.family == "sdxl" else "style-sd15"


def preset_values(name: str | None) -> dict:
    """Every form field's value under a preset (defaults < preset)."""
    cfg = build_config(preset=name or None)
    return cfg.to_dict()


def work_folder(ctx, name: str) -> Path:
    return ctx.outputs_dir / "train" / name


def _lora_name(name: str) -> str:
    name = safe_name(name, what="LoRA name")
    return name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name


def _job_config(ctx, name: str, data: Path, values: dict, preset: str | None, checkpoint: Path | None):
    """The TrainConfig of one LoRA: the form's values, the tab's own folders for it, checked paths."""
    out, work = ctx.lora_path(name), work_folder(ctx, name)
    ctx.data_roots.confine_tree(data)
    values = dict(values)
    for key in PATH_FIELDS:
        if values.get(key):
            values[key] = str(ctx.data_roots.confine(values[key], kind=key, must_exist=False))
    if not values.get("class_data_dir"):
        values["class_data_dir"] = str(work / "class-images")
    overrides = {**values, "data_dir": str(data), "output": str(out), "base": ctx.base_spec or "",
                 "checkpoint_dir": str(work / "checkpoints"), "cache_dir": str(work / "cache"),
                 "resume": str(checkpoint) if checkpoint else ""}
    return build_config(preset=preset or None, overrides=overrides)


def start_training(ctx, *, name: str, source: str, folder: str | None = None, uploads=None,
                   values: dict | None = None, preset: str | None = None, overwrite: bool = False,
                   resume: bool = False, folders=None) -> Job:
    """Check everything, then start the trainer in the background; returns the job."""
    from sdlora.training.checkpoint import find_checkpoint
    if source == "several folders":
        if resume:
            raise SdloraError("Resume continues a one-folder run; a run of several folders is resumed from the "
                              "command line: sdlora train --resume CHECKPOINT for each LoRA")
        return start_multi_training(ctx, folders or [], values=values, preset=preset, overwrite=overwrite)
    latest = ctx.jobs.latest("train")
    if resume and not (name or "").strip() and latest is not None:
        name = latest.title             # Resume continues the last run even before the form is refilled
    name = _lora_name(name)
    out, work = ctx.lora_path(name), work_folder(ctx, name)
    checkpoint, state = None, {}
    if resume:
        checkpoint = find_checkpoint(work / "checkpoints")
        state = json.loads((checkpoint / "state.json").read_text())
    elif out.exists() and not overwrite:
        raise SdloraError(f"{out.name} already exists in {ctx.loras_dir}: choose another name, tick overwrite, "
                          "or press Resume to continue its training")
    if source == "upload" and uploads:
        data = unique_folder(ctx.outputs_dir / "train-data", name)
        import_training_upload(uploads, data)
    elif source == "upload" and resume:
        data = ctx.data_roots.confine(state["config"].get("data_dir", ""), kind="training folder of the checkpoint")
    elif source == "upload":
        raise SdloraError("no images uploaded: add image files (and optional .txt captions), or choose a folder")
    else:
        data = ctx.data_roots.confine(folder or "", kind="training folder")
    cfg = _job_config(ctx, name, data, values or {}, preset, checkpoint)
    job = Job("train", name, config=cfg.to_dict(), control=SharingControl(ctx.device_lock, f"training {name}"),
              resumed_from=int(state.get("step", 0)))
    job.note(f"{'resuming from ' + str(checkpoint) if checkpoint else 'starting'}: {data} -> {out}")
    return ctx.jobs.start(job, partial(run_training, cfg=cfg, device=ctx.device_lock, load_base=ctx.training_base))


def start_multi_training(ctx, folders, *, values: dict | None = None, preset: str | None = None,
                         overwrite: bool = False) -> Job:
    """One LoRA per folder (named after it), all trained in one run on one base (train_many)."""
    folders = [f for f in (folders or []) if f]
    if len(folders) < 2:
        raise SdloraError(f"several folders: choose at least two training folders (got {len(folders)}); "
                          "for one, choose the source 'folder'")
    datas = [ctx.data_roots.confine(f, kind="training folder") for f in folders]
    names = [_lora_name(d.name) for d in datas]
    if len(set(names)) < len(names):
        raise SdloraError(f"two folders have the same name ({', '.join(names)}): each LoRA is named after its "
                          "folder, so rename one")
    taken = [ctx.lora_path(n).name for n in names if ctx.lora_path(n).exists()]
    if taken and not overwrite:
        raise SdloraError(f"{', '.join(taken)} already exist in {ctx.loras_dir}: rename the folders or tick overwrite")
    cfgs = [_job_config(ctx, n, d, values or {}, preset, None) for n, d in zip(names, datas)]
    title = " + ".join(names)
    job = Job("train", title, config=cfgs[0].to_dict(), control=SharingControl(ctx.device_lock, f"training {title}"))
    for d, n in zip(datas, names):
        job.note(f"starting: {d} -> {ctx.lora_path(n)}")
    return ctx.jobs.start(job, partial(run_training, cfg=cfgs, device=ctx.device_lock, load_base=ctx.training_base))


def stop_training(ctx) -> str:
    job = ctx.jobs.latest("train")
    if job is None or not job.active:
        raise SdloraError("no training is running")
    job.control.request_stop()
    job.note("stop requested: the current step finishes, then a checkpoint and the LoRA are saved")
    return f"stopping {job.title}: a checkpoint and the LoRA of the current step will be saved"


# ---------------------------------------------------------------------------------------------
# what the page shows of a job

def _duration(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_html(snap: dict | None) -> str:
    if snap is None:
        return '<div class="sdl-train-idle">No training yet. Choose images, a name and press Start.</div>'
    total = snap["total"] or 0
    frac = snap["step"] / total if total else 0.0
    state = snap["status"] if not snap["active"] else (snap["phase"] or snap["status"])
    parts = [f"<b>{html.escape(snap['title'])}</b>", html.escape(state)]
    if total:
        parts.append(f"step {snap['step']}/{total}")
    if snap["losses"]:
        parts.append(f"loss {snap['losses'][-1][2]:.4f}")
    if snap["active"] and snap["steps_per_s"] and snap["step"]:
        parts.append(f"{snap['steps_per_s']:.2f} steps/s, {_duration(snap['eta_s'])} left")
    cls = {"failed": "sdl-bad", "done": "sdl-good", "stopped": "sdl-warn"}.get(snap["status"], "")
    return (f'<div class="sdl-train {cls}" data-status="{html.escape(snap["status"])}">'
            f'<div class="sdl-bar"><div class="sdl-fill" style="width:{100 * frac:.1f}%"></div></div>'
            f'<div class="sdl-train-text">{" · ".join(parts)}</div>{status_of(snap)}</div>')


def status_of(snap: dict | None) -> str:
    if snap is None:
        return ""
    if snap["status"] == "failed":
        return status_html(f"Training {snap['title']} failed: {snap['error']}", "error")
    if snap["active"]:   # the bar says it all while steps run; other phases (loading, caching, ...) say what they do
        return "" if snap["phase"] == "training" else status_html(snap["message"] or snap["status"], "busy")
    if snap["output"]:
        return status_html(f"{snap['status']}: LoRA written to {snap['output']} — it is in the Generate and "
                           "Mix pickers now", "ok")
    return status_html(snap["status"], "info")


def loss_frame(snap: dict | None):
    """The loss curve as the plot wants it; None before the first step (an empty frame would leave
    gradio's plot without series, so later updates drew no lines)."""
    import pandas as pd
    rows = []
    curves = {"": (snap or {}).get("losses", []), **(snap or {}).get("curves", {})}   # name -> losses
    for name, losses in curves.items():
        for step, loss, smooth in losses:   # one LoRA: the raw and smoothed loss; several: smoothed per LoRA
            if math.isfinite(loss) and len(curves) == 1:
                rows.append({"step": step, "loss": loss, "series": LOSS})
            if math.isfinite(smooth):
                rows.append({"step": step, "loss": smooth, "series": f"{name}: {SMOOTHED}" if name else SMOOTHED})
    if not rows:
        return None
    return pd.DataFrame({"step": pd.Series([r["step"] for r in rows], dtype="int64"),
                         "loss": pd.Series([r["loss"] for r in rows], dtype="float64"),
                         "series": pd.Series([r["series"] for r in rows], dtype="str")})


def form_values(ctx, snap: dict | None) -> dict | None:
    """The Train form as the job was started ({field: form value}, plus name/source/folder), so a
    reloaded page can Resume or restart it; None without a job."""
    if not snap or not snap["config"]:
        return None
    cfg = snap["config"]
    values = {s["name"]: to_form(s, cfg[s["name"]]) for s in form_specs() if s["name"] in cfg}
    if values.get("class_data_dir") == str(work_folder(ctx, snap["title"]) / "class-images"):
        values["class_data_dir"] = ""           # the tab's own default, not a user's folder
    data = cfg.get("data_dir", "")
    uploaded = Path(data).is_relative_to(ctx.outputs_dir / "train-data") if data else False
    return {**values, "name": snap["title"], "source": "upload" if uploaded else "folder",
            "folder": None if uploaded else data}


def view(ctx, seen):
    """(outputs..., new `seen`) for the poll: nothing is sent while the job has not changed."""
    job = ctx.jobs.latest("train")
    snap = job.snapshot() if job else None
    key = (snap["id"], snap["version"]) if snap else None
    if seen is not None and key == seen.get("key"):
        return [gr.skip()] * 6 + [seen]
    n_losses = len(snap["losses"]) + sum(map(len, snap["curves"].values())) if snap else 0
    new_seen = {"key": key, "losses": n_losses, "samples": len(snap["samples"]) if snap else 0}
    same = seen is not None and key is not None and seen.get("key") and seen["key"][0] == key[0]
    plot = gr.skip() if same and seen.get("losses") == new_seen["losses"] else loss_frame(snap)
    samples = gr.skip() if same and seen.get("samples") == new_seen["samples"] else \
        [(p, f"step {s}") for s, p in (snap or {}).get("samples", [])]
    active = bool(snap and snap["active"])
    return [progress_html(snap), plot, samples, "\n".join((snap or {}).get("log", [])[-60:]),
            gr.update(interactive=not active), gr.update(interactive=active), new_seen]


# ---------------------------------------------------------------------------------------------
# the page

def field_component(spec: dict, value):
    name, help_, choices = spec["name"], spec["help"], spec["choices"]
    label = name.replace("_", " ")
    kw = dict(label=label, info=help_, elem_id=f"train-{name.replace('_', '-')}")
    t = spec["type"]
    if t == "bool":
        return gr.Checkbox(value, **kw)
    if t == "list" and choices:
        return gr.CheckboxGroup(choices, value=value, **kw)
    if choices:
        return gr.Dropdown(choices, value=value, **kw)
    if t in ("int", "float"):
        return gr.Number(value, precision=0 if t == "int" else None, minimum=spec["low"], maximum=spec["high"],
                         step=1 if t == "int" else 1e-9, **kw)
    if t == "list":
        kw["info"] = help_ + (" (one per line)" if name == "sample_prompts" else " (comma-separated)")
        return gr.Textbox(to_form(spec, value), lines=2 if name == "sample_prompts" else 1, **kw)
    return gr.Textbox(value, **kw)


def _form(ctx, specs: list[dict], values0: dict, preset0: str) -> dict:
    """The left column: name, preset, images, the options (main, then advanced) and the buttons."""
    by_name = {s["name"]: s for s in specs}
    c: dict = {"fields": {}}
    with gr.Row():
        c["name"] = gr.Textbox(label="LoRA name", placeholder="mystyle", elem_id="train-name", scale=2)
        c["preset"] = gr.Dropdown(sorted({p.stem for p in presets().values()}), value=preset0, label="Preset",
                                  elem_id="train-preset", scale=2)
        c["overwrite"] = gr.Checkbox(False, label="overwrite an existing LoRA", elem_id="train-overwrite", scale=1)
    c["source"] = gr.Radio(list(SOURCES), value="folder", label="Training images", elem_id="train-source")
    c["folder"] = gr.Dropdown(ctx.data_roots.folders_with_images(), value=None, allow_custom_value=True,
                              label=f"Folder (inside {ctx.data_roots.describe()})", elem_id="train-folder")
    c["folders"] = gr.Dropdown(ctx.data_roots.folders_with_images(), value=[], multiselect=True,
                               allow_custom_value=True, visible=False, elem_id="train-folders",
                               label="Folders: one LoRA per folder, named after it, all trained in one run "
                                     "on one base (the options below apply to each)")
    c["uploads"] = gr.File(file_count="multiple", file_types=["image", ".txt", ".caption"], type="filepath",
                           label="Upload images (+ .txt captions with the same names)", elem_id="train-upload",
                           visible=False)
    for row in (MAIN[:4], MAIN[4:8], MAIN[8:]):
        with gr.Row():
            for key in row:
                c["fields"][key] = field_component(by_name[key], values0[key])
    with gr.Accordion("Advanced (every option of `sdlora train`)", open=False, elem_id="train-advanced"):
        for group in GROUPS:
            group_specs = [s for s in specs if s["group"] == group and s["name"] not in MAIN]
            if group_specs:
                gr.Markdown(f"**{group}**")
            for i in range(0, len(group_specs), 3):
                with gr.Row():
                    for s in group_specs[i:i + 3]:
                        c["fields"][s["name"]] = field_component(s, values0[s["name"]])
    with gr.Row():
        c["start"] = gr.Button("Start training", variant="primary", elem_id="train-start")
        c["stop"] = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="train-stop", interactive=False)
        c["resume"] = gr.Button("Resume", elem_id="train-resume")
    return c


def _monitor() -> dict:
    """The right column: status, progress bar, loss plot, samples, log."""
    return dict(status=gr.HTML(elem_id="train-status", js_on_load=None),
                progress=gr.HTML(progress_html(None), elem_id="train-progress", js_on_load=None),
                plot=gr.LinePlot(None, x="step", y="loss", color="series", title="Training loss",
                                 color_map={LOSS: "#9ca3af", SMOOTHED: "#2563eb"}, color_title="",
                                 elem_id="train-loss", height=260),
                samples=gr.Gallery(label="Samples", columns=4, height=220, elem_id="train-samples", interactive=False),
                log=gr.Textbox(label="Log", lines=8, max_lines=8, elem_id="train-log", autoscroll=True))


def build(ctx, timer: gr.Timer):
    specs = form_specs()
    preset0 = default_preset(ctx)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            c = _form(ctx, specs, preset_values(preset0), preset0)
        with gr.Column(scale=2, min_width=320):
            c.update(_monitor())
    return _wire(ctx, c, specs, timer)


def _wire(ctx, c: dict, specs: list[dict], timer: gr.Timer) -> dict:
    """Events: every handler gets its inputs by component (a dict), never by position."""
    by_name = {s["name"]: s for s in specs}
    fields = [s["name"] for s in specs if s["name"] in c["fields"]]
    field_comps = [c["fields"][k] for k in fields]
    status, seen = c["status"], gr.State(None)
    c["source"].change(lambda s: tuple(gr.update(visible=s == v) for v in SOURCES), c["source"],
                       [c["folder"], c["uploads"], c["folders"]], show_progress="hidden")

    def on_preset(p):
        try:
            vals = {**preset_values(None), **load_preset(p)} if p else preset_values(None)
        except Exception as e:  # noqa: BLE001
            return [gr.skip()] * len(fields) + [error_html(e, "Loading the preset")]
        return [to_form(by_name[k], vals[k]) for k in fields] + [status_html(f"preset {p} loaded", "ok")]

    c["preset"].change(on_preset, c["preset"], field_comps + [status], show_progress="hidden")

    def launch(resume_: bool, form: dict):
        try:
            values = {k: from_form(by_name[k], form[c["fields"][k]]) for k in fields}
            job = start_training(ctx, name=form[c["name"]], source=form[c["source"]], folder=form[c["folder"]],
                                 uploads=form[c["uploads"]], folders=form[c["folders"]], values=values,
                                 preset=form[c["preset"]], overwrite=form[c["overwrite"]], resume=resume_)
        except Exception as e:  # noqa: BLE001
            return error_html(e, "Starting the training")
        what = f"resumed from step {job.resumed_from}" if job.resumed_from else "started"
        return status_html(f"training {job.title} {what}", "busy")

    inputs = {*(c[k] for k in ("name", "preset", "overwrite", "source", "folder", "uploads", "folders")), *field_comps}
    c["start"].click(partial(launch, False), inputs, [status], show_progress="hidden")
    c["resume"].click(partial(launch, True), inputs, [status], show_progress="hidden")

    def on_stop():
        try:
            return status_html(stop_training(ctx), "busy")
        except Exception as e:  # noqa: BLE001
            return error_html(e, "Stop")

    c["stop"].click(on_stop, None, [status], show_progress="hidden")
    outs = [c["progress"], c["plot"], c["samples"], c["log"], c["start"], c["stop"], seen]
    timer.tick(partial(view, ctx), [seen], outs, show_progress="hidden", concurrency_limit=None)
    c["log"].change(None, None, None, js=SCROLL_LOG_JS, show_progress="hidden")
    form = [c["name"], c["source"], c["folder"], *field_comps]

    def refill():
        job = ctx.jobs.latest("train")
        vals = form_values(ctx, job.snapshot() if job else None)
        if vals is None:
            return [gr.skip()] * len(form)
        folder_ = gr.update(value=vals["folder"], visible=vals["source"] == "folder")
        return [vals["name"], vals["source"], folder_] + [vals.get(k, gr.skip()) for k in fields]

    return dict(status=status, outs=outs, seen=seen, view=partial(view, ctx), refill=refill, form=form)
