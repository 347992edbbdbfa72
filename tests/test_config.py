"""One declaration (TrainConfig) -> CLI flags, TOML keys, presets and the UI form, all consistent."""
import argparse
import dataclasses
import tomllib

import pytest

from sdlora.errors import SdloraError
from sdlora.training import config as C
from sdlora.training.cli import add_arguments


def _parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_every_field_is_a_flag_a_toml_key_and_a_form_field(tmp_path):
    names = [f.name for f in dataclasses.fields(C.TrainConfig)]
    form = {f["name"]: f for f in C.form_fields()}
    assert list(form) == names
    help_text = argparse.ArgumentParser()
    add_arguments(help_text)
    flags = {a.dest for a in help_text._actions}
    for f in dataclasses.fields(C.TrainConfig):
        assert f.metadata["help"] and f.metadata["group"] in C.GROUPS, f.name
        assert form[f.name]["default"] == getattr(C.TrainConfig(), f.name)
        if f.metadata["cli"]:
            assert f.name in flags, f.name
    assert "data_dir" not in flags            # the positional FOLDER sets it
    # the TOML of a config reads back to the same config
    cfg = C.TrainConfig(rank=7, unet_targets=["attn", "ff"], trigger='say "hi"', noise_offset=0.05,
                        random_flip=True).validate()
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert C.build_config(config_file=path) == cfg


def test_layering_defaults_preset_file_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("rank = 12\nunet_lr = 3e-4\n[network]\nalpha = 6.0\n")
    args = _parse(["--unet-lr", "5e-4", "--no-buckets", "--unet-targets", "attn", "proj"])
    cfg = C.build_config(preset="tiny CPU demo", config_file=path, overrides=C.overrides_from_args(args))
    tiny = tomllib.loads((C.PRESET_DIR / "tiny-cpu-demo.toml").read_text())
    assert (cfg.batch_size, cfg.steps) == (tiny["batch_size"], tiny["steps"])  # preset
    assert cfg.rank == 12 and cfg.alpha == 6.0     # file over preset
    assert cfg.unet_lr == 5e-4                     # flag over file
    assert cfg.buckets is False and cfg.unet_targets == ["attn", "proj"]
    assert cfg.seed == C.TrainConfig().seed        # untouched: the default
    assert C.overrides_from_args(_parse([])) == {}  # flags not typed do not override anything


def test_the_embedded_base_brings_its_own_defaults(tmp_path):
    """No preset on the embedded model: tiny-cpu-demo's values (read from its TOML file here) are the
    defaults, under flags; another base or an explicit preset does not get them; the device is never pinned."""
    tiny = tomllib.loads((C.PRESET_DIR / "tiny-cpu-demo.toml").read_text())
    cfg = C.build_config(overrides={"steps": 50})
    assert cfg.steps == 50 and cfg.rank == tiny["rank"] and cfg.unet_lr == tiny["unet_lr"]
    assert cfg.batch_size == tiny["batch_size"] and cfg.device == C.TrainConfig().device
    other = C.build_config(overrides={"base": str(tmp_path)})
    assert other.rank == C.TrainConfig().rank and other.steps == C.TrainConfig().steps
    assert C.build_config(preset="style-sd15").rank == C.load_preset("style-sd15").get("rank", C.TrainConfig().rank)
    assert C.TrainConfig().resolution == 0          # the base's native size, decided by the trainer


@pytest.mark.parametrize("name", ["style SD1.5", "style SDXL", "tiny CPU demo", "style-sd15"])
def test_presets_are_valid(name):
    cfg = C.build_config(preset=name)
    assert cfg.rank > 0 and cfg.steps > 0


def test_bad_options_are_clear_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("unet_rl = 1e-4\n")
    with pytest.raises(SdloraError, match="unknown option 'unet_rl'; did you mean 'unet_lr'"):
        C.build_config(config_file=path)
    path.write_text("rank = [\n")
    with pytest.raises(SdloraError, match="not valid TOML"):
        C.build_config(config_file=path)
    with pytest.raises(SdloraError, match="option rank: expected int"):
        C.build_config(overrides={"rank": "big"})
    with pytest.raises(SdloraError, match="option crop: 'middle' is not one of center, random"):
        C.build_config(overrides={"crop": "middle"})
    with pytest.raises(SdloraError, match="option caption_dropout: 1.5 is outside"):
        C.build_config(overrides={"caption_dropout": 1.5})
    with pytest.raises(SdloraError, match="random crops cannot be cached"):
        C.build_config(overrides={"crop": "random"})
    with pytest.raises(SdloraError, match="conv-rank"):
        C.build_config(overrides={"unet_targets": ["conv"]})
    with pytest.raises(SdloraError, match="unknown preset"):
        C.build_config(preset="nope")
    with pytest.raises(SdloraError, match="does not exist"):
        C.build_config(config_file=tmp_path / "missing.toml")


def test_resume_config_is_the_checkpoints_and_lists_every_contradiction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stored = C.absolute_paths(C.TrainConfig(data_dir="imgs", output="loras/x.safetensors", steps=6, resolution=32))
    # repeated options are fine, relative paths included (they name the same folder)
    cfg = C.resume_config(stored.to_dict(), {"data_dir": "imgs", "steps": 6, "resume": "ck"}, "ck")
    assert cfg.replace(resume="") == stored and cfg.resume == "ck" and cfg.data_dir == str(tmp_path / "imgs")
    with pytest.raises(SdloraError) as e:
        C.resume_config(stored.to_dict(), {"steps": 8, "rank": 16, "resolution": 64, "data_dir": "other"}, "ck")
    text = str(e.value)
    assert "--steps: checkpoint 6, given 8" in text and "--resolution: checkpoint 32, given 64" in text
    assert f"FOLDER: checkpoint {str(tmp_path / 'imgs')!r}" in text and "--rank" not in text    # 16 is the default
