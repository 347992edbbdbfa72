"""sdlora: train, load, mix and bake Stable Diffusion style LoRAs."""

__version__ = "0.1.0"
