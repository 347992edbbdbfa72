"""Background work for the UI: one lock for the device, and jobs that outlive the page.

Model:
* `DeviceLock` is the one accelerator's queue (FIFO). Whatever runs a model holds it: a generation
  request for its whole duration, a training run for its whole duration *except* that it hands the
  device to whoever is waiting after every optimizer step (`SharingControl.poll`, which the trainer
  calls once per step). So a generation started during training waits at most one step, runs, and
  training continues; two generations from two browser tabs run one after the other.
* A `Job` is a training run in its own thread, not inside an HTTP event: closing or reloading the
  page does not stop it. Its state (status, progress, loss curve, samples, log, error) lives in
  the server and is shared by every browser tab; the page polls `snapshot()` and shows it again
  when reopened. Per-tab things (prompts, pickers, galleries) live in the tab's own components.
* A job that raises ends "failed" with the error message in its state, so the page shows it.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sdlora.errors import SdloraError, describe
from sdlora.training.control import Progress, TrainingCallbacks, TrainingControl

log = logging.getLogger("sdlora.ui")

FINAL = ("done", "stopped", "interrupted", "failed")


class JobError(SdloraError):
    """A job cannot start (another one is running, nothing to resume, ...)."""


# ---------------------------------------------------------------------------------------------
# the device

class DeviceLock:
    """A first-come-first-served lock for the device, with the holder's name for "waiting for ..."."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._holder: str | None = None

    @property
    def holder(self) -> str | None:
        return self._holder

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def acquire(self, who: str, on_wait: Callable[[str], None] | None = None, poll_s: float = 0.5) -> None:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._holder is not None or self._queue[0] is not ticket:
                    if on_wait is not None and self._holder is not None:
                        on_wait(self._holder)
                    self._cond.wait(poll_s)
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._holder = who

    def release(self) -> None:
        with self._cond:
            self._holder = None
            self._cond.notify_all()

    def share(self, who: str) -> None:
        """Called by the holder between two units of work: let everyone already waiting go first."""
        with self._cond:
            if not self._queue:
                return
            self._holder = None
            self._cond.notify_all()
        self.acquire(who)

    @contextmanager
    def hold(self, who: str, on_wait: Callable[[str], None] | None = None):
        self.acquire(who, on_wait)
        try:
            yield
        finally:
            self.release()


class SharingControl(TrainingControl):
    """The trainer's command channel; polling it (once per step) also lets waiting generations run."""

    def __init__(self, device: DeviceLock, who: str):
        super().__init__()
        self.device, self.who = device, who

    def poll(self):
        self.device.share(self.who)
        return super().poll()


# ---------------------------------------------------------------------------------------------
# jobs

_ids = itertools.count(1)


@dataclass
class Job:
    kind: str
    title: str
    id: int = field(default_factory=lambda: next(_ids))
    status: str = "queued"        # queued | running | done | stopped | interrupted | failed
    phase: str = ""               # the trainer's latest status: scanning, loading, caching, training, ...
    message: str = ""
    step: int = 0
    total: int = 0
    steps_per_s: float = 0.0
    eta_s: float = 0.0
    losses: list = field(default_factory=list)    # (step, loss, smoothed loss)
    curves: dict = field(default_factory=dict)    # several LoRAs in one run: LoRA name -> its losses
    parts: dict = field(default_factory=dict)     # LoRA name -> [step, total, eta_s] (the bar sums them)
    samples: list = field(default_factory=list)   # (step, path)
    log: list = field(default_factory=list)
    error: str | None = None
    output: str | None = None
    checkpoint: str | None = None
    config: dict = field(default_factory=dict)    # the run's options: the Train form is refilled from it
    resumed_from: int = 0         # the checkpoint's step when this job continues a run
    started: float | None = None
    finished: float | None = None
    version: int = 0              # bumped on every change: a page redraws only when it moved
    control: TrainingControl | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self, k, v)
            self.version += 1

    def note(self, line: str) -> None:
        with self._lock:
            self.log.append(f"{time.strftime('%H:%M:%S')} {line}")
            del self.log[:-200]
            self.version += 1

    @property
    def active(self) -> bool:
        return self.status not in FINAL

    def snapshot(self) -> dict:
        """A consistent copy for one page update (lists copied)."""
        with self._lock:
            return {"id": self.id, "kind": self.kind, "title": self.title, "status": self.status,
                    "phase": self.phase, "message": self.message, "step": self.step, "total": self.total,
                    "steps_per_s": self.steps_per_s, "eta_s": self.eta_s, "losses": list(self.losses),
                    "curves": {k: list(v) for k, v in self.curves.items()},
                    "samples": list(self.samples), "log": list(self.log), "error": self.error,
                    "output": self.output, "checkpoint": self.checkpoint, "config": dict(self.config),
                    "resumed_from": self.resumed_from,
                    "started": self.started, "finished": self.finished, "version": self.version,
                    "active": self.active}


class JobManager:
    """The server's jobs, shared by every page; one of each kind runs at a time."""

    def __init__(self, device: DeviceLock | None = None):
        self.device = device or DeviceLock()
        self._jobs: list[Job] = []
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()

    def latest(self, kind: str) -> Job | None:
        with self._lock:
            return next((j for j in reversed(self._jobs) if j.kind == kind), None)

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return next((j for j in self._jobs if j.id == job_id), None)

    def start(self, job: Job, work: Callable[[Job], None], on_end: Callable[[Job], None] | None = None) -> Job:
        """Run `work(job)` in a background thread; it sets the final status (or raises: "failed")."""
        with self._lock:
            running = next((j for j in self._jobs if j.kind == job.kind and j.active), None)
            if running is not None:
                raise JobError(f"a {job.kind} job is already running ({running.title}, {running.status}); "
                               "stop it or wait for it to finish")
            self._jobs.append(job)
            del self._jobs[:-50]
            t = threading.Thread(target=self._run, args=(job, work, on_end), name=f"sdlora-{job.kind}-{job.id}",
                                 daemon=True)
            self._threads[job.id] = t
        t.start()
        return job

    def _run(self, job: Job, work, on_end) -> None:
        job.update(status="running", started=time.time())
        try:
            work(job)
            if job.active:                  # the work returned without saying how it ended
                job.update(status="done")
        except BaseException as e:  # noqa: BLE001 - a worker thread must record every failure
            log.error("job %s (%s) failed:\n%s", job.id, job.title, traceback.format_exc())
            job.note(f"failed: {describe(e)}")
            job.update(status="failed", error=describe(e))
        finally:
            job.update(finished=time.time())
            if on_end is not None:
                try:
                    on_end(job)
                except Exception:  # noqa: BLE001
                    log.exception("after job %s", job.id)

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        t = self._threads.get(job.id)
        if t is not None:
            t.join(timeout)
        return not job.active

    def shutdown(self, timeout: float = 60.0) -> None:
        """Ask running trainings to stop (they save a checkpoint) and wait for them a while."""
        with self._lock:
            running = [j for j in self._jobs if j.active]
        for j in running:
            if j.control is not None:
                j.control.request_stop()
        for j in running:
            self.wait(j, timeout)


# ---------------------------------------------------------------------------------------------
# training as a job

class JobCallbacks(TrainingCallbacks):
    """The trainer's events written into a Job (called on the training thread). With `part` (one
    LoRA of a multi-LoRA run) the losses go to that LoRA's curve and the bar sums the parts."""

    def __init__(self, job: Job, part: str | None = None):
        self.job, self.part = job, part

    def _tag(self, text: str) -> str:
        return f"{self.part}: {text}" if self.part else text

    def on_status(self, status: str, message: str) -> None:
        self.job.update(phase=status, message=self._tag(message) if message else message)
        self.job.note(self._tag(f"[{status}] {message}" if message else f"[{status}]"))

    def on_plan(self, plan) -> None:
        if self.part:
            with self.job._lock:
                self.job.parts[self.part] = [0, plan.total_steps, 0.0]
            self.job.update(total=sum(t for _, t, _ in self.job.parts.values()))
        else:
            self.job.update(total=plan.total_steps)
        self.job.note(self._tag(plan.describe()))

    def on_progress(self, p: Progress) -> None:
        if not self.part:
            with self.job._lock:
                self.job.losses.append((p.step, p.loss, p.smoothed_loss))
            self.job.update(step=p.step, total=p.total_steps, steps_per_s=p.steps_per_s, eta_s=p.eta_s)
            return
        with self.job._lock:
            self.job.curves.setdefault(self.part, []).append((p.step, p.loss, p.smoothed_loss))
            self.job.parts[self.part] = [p.step, p.total_steps, p.eta_s if p.step < p.total_steps else 0.0]
            done, total, eta = (f(v[i] for v in self.job.parts.values()) for i, f in ((0, sum), (1, sum), (2, max)))
        # the LoRAs train side by side: the run ends with the one that has the longest left
        self.job.update(step=done, total=total, steps_per_s=p.steps_per_s, eta_s=eta)

    def on_sample(self, step: int, images, paths) -> None:
        with self.job._lock:
            self.job.samples.extend((step, str(p)) for p in paths)
        self.job.update()

    def on_checkpoint(self, step: int, path) -> None:
        self.job.update(checkpoint=str(path))

    def on_resume(self, step: int, losses) -> None:
        if self.part:
            with self.job._lock:
                self.job.curves[self.part] = list(losses)
            self.job.update()
        else:
            self.job.update(losses=list(losses))     # the plot shows the whole run, not just this part

    def on_warning(self, message: str) -> None:
        self.job.note(self._tag(f"warning: {message}"))


def run_training(job: Job, cfg, *, device: DeviceLock, load_base: Callable[[], object]) -> None:
    """Train `cfg` (a validated TrainConfig, or a list of them: several LoRAs in one run on one
    base, training.multi.train_many) on the device, reporting into `job`.

    `load_base()` gives the trainer its own copy of the base model: the trainer injects its LoRA
    layers into the model it trains, so it never gets the pipeline the page generates with.
    """
    from sdlora.training import train
    from sdlora.training.multi import train_many
    job.update(phase="waiting", message="waiting for the device")

    def waiting(holder: str) -> None:
        if job.message != f"waiting for the device ({holder})":
            job.update(message=f"waiting for the device ({holder})")

    with device.hold(f"training {job.title}", on_wait=waiting):
        job.update(phase="loading", message="loading a copy of the base model for training")
        base = load_base()
        if isinstance(cfg, list):
            callbacks = [JobCallbacks(job, Path(c.output).stem) for c in cfg]
            results = train_many(cfg, callbacks=callbacks, control=job.control, base=base)
        else:
            results = [train(cfg, callbacks=JobCallbacks(job), control=job.control, base=base)]
    # the run's status: the worst of its LoRAs' (all done, or the first that was not)
    status = next((r.status for r in results if r.status != "done"), "done")
    outputs = [str(r.output) for r in results if r.output]
    last = next((r.checkpoint for r in reversed(results) if r.checkpoint), None)
    job.update(status=status, output=", ".join(outputs) or None,
               checkpoint=str(last) if last else job.checkpoint)
