"""Several LoRAs trained in one process on one base model in memory.

    from sdlora.training.multi import train_many
    results = train_many([cfg_a, cfg_b, cfg_c], callbacks=[ui_a, ui_b, ui_c], control=control)

Each job is a normal `Trainer` (its own data order, noise/timestep streams, optimizer, LR schedule,
checkpoints, samples and output file, exactly as a solo run with that config draws them); only the
base model is shared, frozen, and every job's LoRA network is hooked onto the same modules. A step
concatenates the micro-batch of every job still running on the batch axis and runs the text
encoders and the UNet once; each job's network adds its low-rank update only on its own rows
(`LoRANetwork.set_rows`). The loss is the sum over jobs of each job's own mean loss, so each job's
gradient is its solo gradient (up to float rounding of the bigger batched kernels). Jobs whose
latents differ in shape at a step (other buckets or resolutions) run in separate forward passes.

A job that reaches its step count writes its file at once and drops out of the batch. One control
stops all jobs; Ctrl-C checkpoints every unfinished job. LoRA dropout draws from the global torch RNG,
which the jobs share within a step: with `dropout` > 0 the results equal solo runs in expectation,
not bit for bit.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from sdlora.errors import SdloraError
from sdlora.training import loss as L
from sdlora.training.config import TrainConfig, flag
from sdlora.training.control import TrainingControl
from sdlora.training.trainer import MicroInputs, Trainer, TrainResult

# options of the shared base model and its computation: every job must have the same value
SHARED_KEYS = ("base", "family", "device", "mixed_precision", "base_precision", "gradient_checkpointing",
               "clip_skip", "base_lora")


def check_jobs(cfgs: list[TrainConfig]) -> None:
    """One clear error for job lists that cannot train together."""
    if not cfgs:
        raise SdloraError("train_many: no jobs given; pass one TrainConfig per LoRA")
    first = cfgs[0]
    for i, cfg in enumerate(cfgs[1:], 2):
        for k in SHARED_KEYS:
            if getattr(cfg, k) != getattr(first, k):
                raise SdloraError(f"jobs share one base model, but {flag(k)} differs: job 1 has "
                                  f"{getattr(first, k)!r}, job {i} ({Path(cfg.data_dir).name}) has "
                                  f"{getattr(cfg, k)!r}; set the same value for every job (top level of the "
                                  "TOML file), or train that job in a separate run")
    if len(cfgs) > 1 and first.gradient_checkpointing:
        raise SdloraError("--gradient-checkpointing cannot be used when several jobs train together: it reruns "
                          "the forward pass during backward, after the rows of each job's LoRA have changed; "
                          "train without it (a smaller --batch-size saves memory too) or one job per run")
    for key, what in (("output", "output file"), ("checkpoint_dir", "checkpoint folder")):
        seen = {}
        for i, cfg in enumerate(cfgs, 1):
            value = getattr(cfg, key) and str(Path(getattr(cfg, key)).expanduser().resolve())
            if value and value in seen:
                raise SdloraError(f"jobs {seen[value]} and {i} both write the {what} {value}; give each job "
                                  f"its own {flag(key)} (or folders with different names)")
            seen[value] = i
    for i, cfg in enumerate(cfgs, 1):        # a wrong folder should not wait for the model to load
        if not Path(cfg.data_dir).expanduser().is_dir():
            raise SdloraError(f"job {i}: training folder {cfg.data_dir!r} does not exist; check the path")


class MultiTrainer:
    """`Trainer`s of several jobs driven by one loop over one shared base (see the module docstring)."""

    def __init__(self, cfgs: list[TrainConfig], callbacks: list | None = None, control=None, base=None):
        cfgs = [c.validate() for c in cfgs]
        check_jobs(cfgs)
        callbacks = list(callbacks) if callbacks is not None else [None] * len(cfgs)
        if len(callbacks) != len(cfgs):
            raise SdloraError(f"train_many: {len(cfgs)} jobs but {len(callbacks)} callbacks; pass one per job "
                              "(None for none)")
        self.control = control or TrainingControl()
        # the jobs' own controls are never set: commands come from the shared one, polled once a step
        self.trainers = [Trainer(c, cb, TrainingControl(), base) for c, cb in zip(cfgs, callbacks)]
        for t in self.trainers:
            t.stack_network = True

    def prepare(self) -> list:
        first = self.trainers[0]
        first.prepare()
        for t in self.trainers[1:]:
            t._base_arg = first.base            # loaded once; placed once (placing again is a no-op)
            t.prepare()
        if first.accel.num_processes > 1:
            raise SdloraError("several jobs train in one process; run them without `accelerate launch` "
                              "(or train one LoRA per launch)")
        if first.accel.scaler is not None:
            raise SdloraError("several jobs cannot share fp16's loss scaling; use --mixed-precision bf16 or no")
        return [t.plan for t in self.trainers]

    @property
    def networks(self) -> list:
        return [t.network for t in self.trainers if t.network is not None]

    @contextmanager
    def only(self, trainer: Trainer):
        """Every row through `trainer`'s LoRA alone (caches, samples, previews)."""
        for net in self.networks:
            net.set_rows(None if net is trainer.network else (0, 0))
        yield

    def run(self) -> list[TrainResult]:
        if any(t.plan is None for t in self.trainers):
            self.prepare()
        try:
            return self._run()
        except BaseException as e:
            for t in self.trainers:
                if isinstance(e, Exception):
                    t._status("failed", str(e) if isinstance(e, SdloraError) else f"{type(e).__name__}: {e}")
                t._remove_created()
            raise
        finally:
            for t in self.trainers:
                if getattr(t, "offloaded", None):
                    t._offload(False)

    def _run(self) -> list[TrainResult]:
        started, results = {}, {}
        for t in self.trainers:
            for net in self.networks:           # the networks injected so far leave its caches alone
                net.set_rows((0, 0))
            for done in started:                # and the models they offloaded come back for its caching
                done._offload(False)
            started[t] = t._start()
        self._share_offload()
        stopped = False
        try:
            while active := [t for t in self.trainers if t not in results]:
                todo = [t for t in active if t.step < t.plan.total_steps and not stopped]
                if todo:
                    stopped = self._step(todo)
                for t in (active if stopped else [t for t in active if t.step >= t.plan.total_steps]):
                    with self.only(t):
                        results[t] = t._finish("stopped" if stopped else "done", started[t])
        except KeyboardInterrupt:
            for t in self.trainers:
                if t not in results:
                    with self.only(t):
                        results[t] = t._interrupted()
        return [results[t] for t in self.trainers]

    def _share_offload(self) -> None:
        """A model one job leaves idle (its cache has its outputs) stays on the accelerator when
        another job runs it every step (uncached latents or text encoders)."""
        used = set()
        for t in self.trainers:
            if t.latents is None:
                used.add(id(t.base.pipe.vae))
            if t.embeddings is None:
                used.update(id(te) for te in t.base.text_encoders.values())
        for t in self.trainers:
            t._offload(False)
            t.offloaded = [m for m in t.offloaded if id(m) not in used]
        for t in self.trainers:
            t._offload(True)

    def _step(self, todo: list[Trainer]) -> bool:
        """One optimizer step of every job in `todo`; True when a stop was requested."""
        values = self._optimizer_step(todo)
        flags = self.control.poll()
        interrupted = False
        for t, value in zip(todo, values):      # every job counts its step, even after a Ctrl-C in one
            try:
                with self.only(t):
                    t._after_step(value, lambda: flags)
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt
        return flags[0]

    def _optimizer_step(self, todo: list[Trainer]) -> list[float]:
        totals = [torch.zeros((), device=t.accel.device) for t in todo]
        for j in range(max(t.cfg.grad_accum for t in todo)):
            jobs = [(k, t, t._micro_inputs(*t._micro_at(j))) for k, t in enumerate(todo) if j < t.cfg.grad_accum]
            losses = self._losses([(t, inputs) for _, t, inputs in jobs])
            sum(loss / t.cfg.grad_accum for (_, t, _), loss in zip(jobs, losses)).backward()
            for (k, t, _), loss in zip(jobs, losses):
                totals[k] += loss.detach() / t.cfg.grad_accum
        return [t._apply_step(total) for t, total in zip(todo, totals)]

    def _losses(self, jobs: list[tuple[Trainer, MicroInputs]]) -> list[torch.Tensor]:
        """Each job's micro-batch loss, from shared forward passes (one per latent shape); jobs with
        uncond_preservation add their term (Trainer._uncond_loss) from two more shared passes."""
        losses = [job._micro_loss(inputs, pred) for (job, inputs), pred in zip(jobs, self._predict(jobs))]
        empty = [i for i, (_, inputs) in enumerate(jobs) if inputs.uncond_kw is not None]
        if empty:
            # each pass gets its own copy of the kwargs: _encode replaces captions by their embeddings,
            # which differ between the passes when a job trains its text encoder
            pairs = lambda: [(jobs[i][0], replace(jobs[i][1], kw=dict(jobs[i][1].uncond_kw))) for i in empty]  # noqa: E731
            with torch.no_grad():
                for net in self.networks:
                    net.set_multiplier(0.0)
                try:
                    base = self._predict(pairs())
                finally:
                    for net in self.networks:
                        net.set_multiplier(1.0)
            for i, pred, target in zip(empty, self._predict(pairs()), base):
                losses[i] = losses[i] + jobs[i][0].cfg.uncond_preservation * L.per_sample_loss(pred, target).mean()
        return losses

    def _predict(self, jobs: list[tuple[Trainer, MicroInputs]]) -> list[torch.Tensor]:
        """Each job's UNet prediction, one shared forward pass per latent shape."""
        self._encode([(t, inputs) for t, inputs in jobs if "captions" in inputs.kw])
        groups: dict[tuple, list[int]] = {}
        for i, (_, inputs) in enumerate(jobs):
            groups.setdefault(tuple(inputs.noisy.shape[1:]), []).append(i)
        preds = [None] * len(jobs)
        for members in groups.values():
            for i, pred in zip(members, self._forward([jobs[i] for i in members])):
                preds[i] = pred
        return preds

    def _set_rows(self, jobs: list[tuple[Trainer, int]]) -> None:
        """Batch rows per job in the order given (each job's size); networks not listed: no rows."""
        rows, at = {}, 0
        for t, n in jobs:
            rows[id(t.network)] = (at, at + n)
            at += n
        for net in self.networks:
            net.set_rows(rows.get(id(net), (0, 0)))

    def _encode(self, jobs: list[tuple[Trainer, MicroInputs]]) -> None:
        """Caption embeddings of the jobs that encode every step (trained or uncached text encoders),
        in one text-encoder pass; each job's inputs get their context/pooled rows."""
        if not jobs:
            return
        captions = [c for _, inputs in jobs for c in inputs.kw["captions"]]
        self._set_rows([(t, len(inputs.kw["captions"])) for t, inputs in jobs])
        first = jobs[0][0]
        with first.accel.autocast():
            context, pooled = first.encode(captions)
        at = 0
        for _, inputs in jobs:
            n = len(inputs.kw.pop("captions"))
            inputs.kw.update(context=context[at:at + n], pooled=None if pooled is None else pooled[at:at + n])
            at += n

    def _forward(self, jobs: list[tuple[Trainer, MicroInputs]]) -> list[torch.Tensor]:
        """The UNet on the jobs' micro-batches concatenated; each job's prediction."""
        self._set_rows([(t, len(inputs.noisy)) for t, inputs in jobs])
        cat = lambda key: torch.cat([inputs.kw[key] for _, inputs in jobs])  # noqa: E731
        kw = {"context": cat("context")}
        if jobs[0][1].kw.get("pooled") is not None:
            kw["pooled"] = cat("pooled")
        if "time_ids" in jobs[0][1].kw:
            kw["time_ids"] = cat("time_ids")
        noisy = torch.cat([inputs.noisy for _, inputs in jobs])
        timesteps = torch.cat([inputs.timesteps for _, inputs in jobs])
        pred = jobs[0][0].model(noisy, timesteps, **kw)
        return list(pred.split([len(inputs.noisy) for _, inputs in jobs]))


def train_many(cfgs: list[TrainConfig], *, callbacks: list | None = None, control=None,
               base=None) -> list[TrainResult]:
    """Train one LoRA per config in one process on one base model; `callbacks[i]` gets job i's
    events (the `train` protocol), `control` stops them all. Results in the order of `cfgs`."""
    runner = MultiTrainer(cfgs, callbacks, control, base)
    runner.prepare()
    return runner.run()
