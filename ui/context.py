"""What every tab of one running UI shares: the base model, the folders, the catalog and the jobs."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from sdlora.families import get_family
from sdlora.ui.catalog import Catalog
from sdlora.ui.jobs import DeviceLock, JobManager
from sdlora.ui.paths import Roots
from sdlora.sample_data import STYLES as SAMPLE_STYLES

log = logging.getLogger("sdlora.ui")


class UiContext:
    """One per server. Per-browser-tab state is NOT kept here (it lives in the page's components)."""

    def __init__(self, *, base: str | None = None, loras="loras", outputs="outputs", data_roots=(),
                 device: str | None = None, dtype: torch.dtype | None = None, base_precision: str = "auto"):
        self.base_spec = base or None
        self.base_precision = base_precision       # of the generation model (sdlora.quant)
        self.loras_dir = Path(loras).expanduser().resolve()
        self.outputs_dir = Path(outputs).expanduser().resolve()
        self.loras_dir.mkdir(parents=True, exist_ok=True)
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
        roots = [self.outputs_dir, *data_roots]
        if not data_roots and SAMPLE_STYLES.is_dir():
            roots.append(SAMPLE_STYLES)            # the shipped style folders, to try training at once
        self.data_roots = Roots.of(*roots)
        self.catalog = Catalog(self.loras_dir)
        self.device_lock = DeviceLock()
        self.jobs = JobManager(self.device_lock)
        self._base = None
        self._base_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------
    # the base model the page generates with

    @property
    def base(self):
        """The loaded sdlora.pipelines.BaseModel (loaded on first use)."""
        with self._base_lock:
            if self._base is None:
                from sdlora.pipelines import load_base
                self._base = load_base(self.base_spec, device=self.device, dtype=self.dtype,
                                       base_precision=self.base_precision)
                log.info("base model %s (%s) on %s", self._base.name, self._base.family, self.device)
            return self._base

    @property
    def family(self) -> str:
        return self.base.family

    def describe_base(self) -> str:
        b = self.base
        stored = getattr(b.pipe, "_sdlora_base_precision", None)
        dtype = str(self.dtype).replace('torch.', '') + (f", base stored {stored}" if stored else "")
        return f"{b.name} ({get_family(b.family).label}, {self.device}, {dtype})"

    def component_configs(self) -> dict:
        """The loaded model's component configs: mixes are checked against its real shapes."""
        from sdlora.families import get_family as fam
        from sdlora.mixplan import component_configs
        pipe = self.base.pipe
        return component_configs({c: getattr(pipe, c) for c in fam(self.family).components})

    def training_base(self):
        """A fresh copy of the base model for one training run (the trainer changes the model it trains)."""
        from sdlora.pipelines import load_base
        return load_base(self.base_spec, device="cpu", dtype=torch.float32)

    def lora_path(self, name: str) -> Path:
        return self.loras_dir / f"{name}.safetensors"
