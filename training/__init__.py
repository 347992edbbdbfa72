"""The style trainer (sdlora.training).

    from sdlora.training import TrainConfig, build_config, train, Trainer
    from sdlora.training import TrainingCallbacks, TrainingControl, Progress, TrainResult

`train(cfg, callbacks=..., control=...)` runs a whole training; `Trainer(cfg).prepare()` returns the
plan before the heavy work. Options: `config.TrainConfig` (each declared once; CLI/TOML/UI derive
from it). Callback and command API: `control`. The loop itself: `trainer`.
"""
from sdlora.training.config import TrainConfig, build_config, form_fields
from sdlora.training.control import Progress, TrainingCallbacks, TrainingControl

__all__ = ["TrainConfig", "build_config", "form_fields", "Progress", "TrainingCallbacks", "TrainingControl",
           "train", "Trainer", "TrainResult", "TrainingError"]


def __getattr__(name):  # the loop imports torch/diffusers: load it on first use
    if name in ("train", "Trainer", "TrainResult", "TrainingError"):
        from sdlora.training import trainer
        return getattr(trainer, name)
    raise AttributeError(name)
