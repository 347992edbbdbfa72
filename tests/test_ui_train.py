"""UI background work and the Train tab: the device lock, jobs, training handlers on the tiny base."""
import os
from pathlib import Path
import threading
import time

import pytest

from sdlora.errors import SdloraError
from sdlora.ui.jobs import DeviceLock, Job, JobError, JobManager
from sdlora.ui.paths import PathError

STYLES = os.path.join(os.path.dirname(__file__), "..", "sample_data", "styles")



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
# Train tab handlers

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
