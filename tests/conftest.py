import os
import sys

# tests import their helpers (tiny.py) as top-level modules, and the checkout's tools/ as `tools`
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402

STYLES = os.path.join(os.path.dirname(__file__), "..", "sample_data", "styles")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A UiContext on the embedded tiny base, with three LoRA files (one for SDXL) and a data root."""
    from loras import write_lora, write_sdxl_lora
    from tiny import base_spec
    from tiny import write_image
    from sdlora.ui.context import UiContext
    root = tmp_path_factory.mktemp("ui")
    c = UiContext(base=base_spec(), loras=root / "loras", outputs=root / "outputs", data_roots=[STYLES, root / "data"],
                  device="cpu")
    configs = c.component_configs()
    write_lora(c.loras_dir / "style.safetensors", c.family, configs, seed=1,
               metadata={"modelspec.trigger_phrase": "neonstyle", "ss_sd_model_name": "<b>tiny</b>"})
    write_lora(c.loras_dir / "sub" / "style2.safetensors", c.family, configs, seed=2)
    write_sdxl_lora(c.loras_dir / "xl_style.safetensors")
    write_image(c.loras_dir / "style.png", "PNG", (32, 32))
    (root / "data").mkdir()
    return c
