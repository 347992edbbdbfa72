"""The embedded tiny base model and the sample style folders, installed as `sdlora.sample_data`
(package data), so they are found the same way from a checkout, an editable install or
`pip install .` run from any folder."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent
EMBEDDED_MODEL = ROOT / "models" / "tiny-sd"
STYLES = ROOT / "styles"
