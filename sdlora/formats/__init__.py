"""Reading and writing LoRA files (sdlora.formats).

`read_lora(path_or_state_dict, family=..., configs=..., allow_partial=...)` -> `LoraFile`
(canonical module path -> adapter); `read_header(path)` reads names/shapes/metadata only.
"""
from sdlora.formats.container import Header, TensorInfo, read_header
from sdlora.formats.reader import LoraFile, read_lora

__all__ = ["Header", "LoraFile", "TensorInfo", "read_header", "read_lora"]
