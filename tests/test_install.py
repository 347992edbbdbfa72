"""What `pip install .` (not -e) ships: the wheel must carry the embedded model, the sample styles
and the presets, since an installed sdlora finds them through the package (sdlora.sample_data)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_embedded_model_styles_and_presets(tmp_path):
    src = tmp_path / "src"        # build from a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "loras", "checkpoints",
                                                             "test-output", "__pycache__", "*.egg-info", "build"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("sdlora-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    model = ROOT / "sample_data" / "models" / "tiny-sd"
    for f in model.rglob("*"):
        if f.is_file():
            assert f"sdlora/sample_data/models/tiny-sd/{f.relative_to(model).as_posix()}" in names
    styles = [f for f in (ROOT / "sample_data" / "styles").rglob("*") if f.is_file()]
    assert styles and all(f"sdlora/sample_data/styles/{f.relative_to(ROOT / 'sample_data' / 'styles').as_posix()}"
                          in names for f in styles)
    presets = [p.name for p in (ROOT / "training" / "presets").glob("*.toml")]
    assert presets and all(f"sdlora/training/presets/{p}" in names for p in presets)
    assert "sdlora/sample_data/__init__.py" in names and "sdlora/ui/style.css" in names


def test_the_core_imports_no_trainer_ui_or_tools_module():
    """Every module of sdlora/ (but the cli front door) imported alone pulls in no sdlora.training,
    sdlora.ui or tools module."""
    core = sorted(p for p in (ROOT / "sdlora").rglob("*.py") if p.name != "cli.py")
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in core]
    code = ("import importlib, sys\nbad = {}\nfor n in %r:\n    before = set(sys.modules)\n    importlib.import_module(n)\n"
            "    new = [m for m in sys.modules if m.startswith(('sdlora.training', 'sdlora.ui', 'tools'))]\n"
            "    if new: bad[n] = new\nprint(bad)" % names)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "{}", run.stdout[-1000:]
