"""How a caller talks to a running training loop: callbacks out, commands in.

    from sdlora.training import train, TrainConfig, TrainingControl, TrainingCallbacks

    class Show(TrainingCallbacks):
        def on_progress(self, p):  print(p.step, p.total_steps, p.smoothed_loss, p.eta_s)
        def on_sample(self, step, images, paths):  ...

    control = TrainingControl()          # hand it to another thread (a UI button handler)
    result = train(TrainConfig(data_dir="imgs", output="out.safetensors"), callbacks=Show(), control=control)
    # elsewhere, while it runs:  control.request_stop()  control.request_save()  control.request_sample()

Callbacks are called on the training thread (in the main process only, under `accelerate launch`),
so keep them quick; every method is optional (the base class does nothing).
Commands are polled once per optimizer step and are thread-safe. `stop` saves a checkpoint and the
LoRA file of the current step, then `train` returns with status "stopped".

Statuses passed to `on_status(status, message)`, in order of a normal run:
    "scanning" (the folder) -> "loading" (base model) -> "generating" (class images, only with prior
    preservation; `on_plan` follows) -> "caching" (latents / text embeddings) -> ["resumed"] -> "training" ->
    "sampling" / "checkpoint" (as they happen) -> "saving" -> one of "done", "stopped",
    "interrupted" (Ctrl-C; a checkpoint was saved), "failed" (message says why).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Progress:
    step: int                 # optimizer steps done
    total_steps: int
    epoch: int                # 1-based epoch the last step belonged to
    total_epochs: int
    loss: float               # this step's loss (mean over processes and accumulation)
    smoothed_loss: float      # exponential moving average (the number to watch)
    lr: float                 # UNet learning rate now
    steps_per_s: float        # optimizer steps per second, averaged since the start (or resume)
    eta_s: float              # seconds left at that speed


class TrainingCallbacks:
    """Override what you need; every method is a no-op here."""

    def on_status(self, status: str, message: str) -> None: ...

    def on_plan(self, plan) -> None: ...          # a training.plan.Plan (has .describe())

    def on_progress(self, progress: Progress) -> None: ...

    def on_sample(self, step: int, images: list, paths: list[Path]) -> None: ...   # PIL images

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_resume(self, step: int, losses: list) -> None: ...   # the run so far: [(step, loss, smoothed)]

    def on_warning(self, message: str) -> None: ...


class TrainingControl:
    """Thread-safe commands for a running loop (stop, save now, sample now)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._stop = self._save = self._sample = False

    def request_stop(self) -> None:
        with self._lock:
            self._stop = True

    def request_save(self) -> None:
        with self._lock:
            self._save = True

    def request_sample(self) -> None:
        with self._lock:
            self._sample = True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    def poll(self) -> tuple[bool, bool, bool]:
        """(stop, save, sample) requested since the last poll; save/sample are consumed."""
        with self._lock:
            out = (self._stop, self._save, self._sample)
            self._save = self._sample = False
            return out


class CallbackList(TrainingCallbacks):
    """Fan one event out to several callback objects (any object with some of the methods)."""

    def __init__(self, *targets):
        self.targets = [t for t in targets if t is not None]

    def _emit(self, name, *args):
        for t in self.targets:
            fn = getattr(t, name, None)
            if fn is not None:
                fn(*args)

    def on_status(self, status, message):
        self._emit("on_status", status, message)

    def on_plan(self, plan):
        self._emit("on_plan", plan)

    def on_progress(self, progress):
        self._emit("on_progress", progress)

    def on_sample(self, step, images, paths):
        self._emit("on_sample", step, images, paths)

    def on_checkpoint(self, step, path):
        self._emit("on_checkpoint", step, path)

    def on_resume(self, step, losses):
        self._emit("on_resume", step, losses)

    def on_warning(self, message):
        self._emit("on_warning", message)
