"""The style trainer (sdlora.training).

    from sdlora.training import TrainConfig, build_config, train, Trainer
    from sdlora.training import TrainingCallbacks, TrainingControl, Progress, TrainResult

`train(cfg, callbacks=..., control=...)` runs a whole training; `train_many([cfg, ...])` trains several
LoRAs in one process on one base model (`multi`); `Trainer(cfg).prepare()` returns the
plan before the heavy work. Options: `config.TrainConfig` (each declared once; CLI/TOML/UI derive
from it). Callback and command API: `control`. The loop itself: `trainer`.
"""
from sdlora.training.config import TrainConfig, build_config, form_fields
from sdlora.training.control import Progress, TrainingCallbacks, TrainingControl

__all__ = ["TrainConfig", "build_config", "form_fields", "Progress", "TrainingCallbacks", "TrainingControl",
           "train", "Trainer", "TrainResult", "TrainingError", "train_many"]


def __getattr__(name):  # the loop imports torch/diffusers: load it on first use
    if name in ("train", "Trainer", "TrainResult", "TrainingError"):
        from sdlora.training import trainer
        return getattr(trainer, name)
    if name == "train_many":
        from sdlora.training.multi import train_many
        return train_many
    raise AttributeError(name)
