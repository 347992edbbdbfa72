"""Reading and writing LoRA files (sdlora.formats)."""
