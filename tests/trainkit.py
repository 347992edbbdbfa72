"""Helpers for trainer tests: small captioned image folders and a fast tiny-model config."""
from pathlib import Path

import numpy as np
from PIL import Image

from sdlora.training import TrainConfig, TrainingCallbacks

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def make_folder(path, n=4, size=32, seed=0, captions=True) -> Path:
    """n images of coloured squares on noise, with `.txt` captions naming the colour."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for i in range(n):
        a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        c = names[i % len(names)]
        a[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = COLOURS[c]
        Image.fromarray(a).save(path / f"img{i}.png")
        if captions:
            (path / f"img{i}.txt").write_text(f"a {c} square, noise")
    return path


def tiny_cfg(tmp_path, name="lora", **kw) -> TrainConfig:
    """4 images, 32 px, a few steps: seconds on one core."""
    data = Path(tmp_path) / "data"
    if not data.exists():
        make_folder(data)
    base = dict(data_dir=str(data), output=str(Path(tmp_path) / "out" / f"{name}.safetensors"), resolution=32,
                steps=4, batch_size=2, rank=4, alpha=2.0, unet_lr=1e-2, text_encoder_lr=1e-2, seed=0,
                save_precision="fp32", device="cpu", sample_steps=2,
                checkpoint_dir=str(Path(tmp_path) / "checkpoints" / name))
    base.update(kw)
    return TrainConfig(**base)


def ctrl_c_at(step: int) -> TrainingCallbacks:
    """Callbacks that press Ctrl-C (KeyboardInterrupt) when training reaches `step`."""
    class CtrlC(TrainingCallbacks):
        def on_progress(self, p):
            if p.step == step:
                raise KeyboardInterrupt
    return CtrlC()
