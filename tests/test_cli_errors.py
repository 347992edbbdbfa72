"""Bad input on the command line: one `sdlora: error:` line (exit 2), no traceback, no terminal
escapes, and nothing changed on disk. Each case is a kind of damage, not one file."""
import errno
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from sdlora import cli

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"   # real SD1.5: [320, 320]
ROOT = Path(__file__).resolve().parent.parent


def lora_state(up=(320, 4), down=(4, 320), alpha=torch.tensor(2.0), **extra):
    g = torch.Generator().manual_seed(0)
    sd = {f"{Q}.lora_up.weight": torch.randn(*up, generator=g) * 0.01,
          f"{Q}.lora_down.weight": torch.randn(*down, generator=g) * 0.01}
    if alpha is not None:
        sd[f"{Q}.alpha"] = alpha
    sd.update({f"{Q}.{k}": v for k, v in extra.items()})
    return sd


def with_header(path: Path, edit) -> Path:
    """A copy of a good file whose JSON header was changed by `edit(dict)` (padded as safetensors does)."""
    save_file(lora_state(), str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return path


def _meta(value):
    return lambda h: h.__setitem__("__metadata__", value)


def _raw(path: Path, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


# name -> (make(path) -> the file to pass, what the message must say)
DAMAGE = {
    "ranks disagree": (lambda p: save_file(lora_state(up=(320, 4), down=(2, 320)), str(p)),
                       r"lora_up \[320, 4\] has rank 4 but lora_down \[2, 320\] has rank 2"),
    "zero rank": (lambda p: save_file(lora_state(up=(320, 0), down=(0, 320)), str(p)), "rank 0"),
    "conv up not 1x1": (lambda p: save_file(lora_state(up=(320, 4, 3, 3), down=(4, 320)), str(p)),
                        r"must be \[out, rank, 1, 1\]"),
    "empty alpha": (lambda p: save_file(lora_state(alpha=torch.zeros(0)), str(p)),
                    r"alpha must be a single number, found a tensor of shape \[0\]"),
    "several alphas": (lambda p: save_file(lora_state(alpha=torch.tensor([1.0, 2.0])), str(p)),
                       r"alpha must be a single number, found a tensor of shape \[2\] \(2 values\)"),
    "nan alpha": (lambda p: save_file(lora_state(alpha=torch.tensor(float("nan"))), str(p)), "NaN"),
    "empty scale": (lambda p: save_file(lora_state(scale=torch.zeros(0)), str(p)), "scale must be a single number"),
    "deep header": (lambda p: _raw(p, b'{"a":' * 5000 + b"1" + b"}" * 5000), "nested thousands of levels deep"),
    "deep list header": (lambda p: _raw(p, b"[" * 100000 + b"]" * 100000), "nested thousands of levels deep"),
    "metadata a list": (lambda p: with_header(p, _meta(["a", "b"])), "__metadata__ must be an object of text values.*array"),
    "metadata a string": (lambda p: with_header(p, _meta("abc")), "__metadata__ must be an object.*a JSON string"),
    "metadata a number": (lambda p: with_header(p, _meta(5)), "__metadata__ must be an object.*a JSON number"),
    "metadata nested": (lambda p: with_header(p, _meta({"a": {"b": "c"}})), "'a' holding a JSON object"),
    "metadata int value": (lambda p: with_header(p, _meta({"ss_network_dim": 4})), "'ss_network_dim' holding a JSON number"),
    "entry not an object": (lambda p: with_header(p, lambda h: h.__setitem__(f"{Q}.alpha", 3)), "damaged safetensors header"),
    "negative shape": (lambda p: with_header(p, lambda h: h[f"{Q}.alpha"].__setitem__("shape", [-1])),
                       "damaged safetensors header"),
    "link loop": (lambda p: os.symlink(p.name, p), "a symbolic link loop"),
    "broken link": (lambda p: os.symlink("gone.safetensors", p), "broken symbolic link"),
    "a folder": (lambda p: p.mkdir(), "is a folder, not a file"),
}


def _snapshot(folder: Path) -> dict:
    """Every entry under `folder` (links not followed) with its bytes: what a refused command must leave."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(folder))
            out[rel] = ("link", os.readlink(p)) if p.is_symlink() else \
                ("dir",) if p.is_dir() else ("file", p.read_bytes())
    return out


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_clear_line(err: str) -> str:
    assert err.startswith("sdlora: error: "), err
    assert err.count("\n") == 1, err                 # one line
    assert "Traceback" not in err and "\x1b" not in err, err
    return err


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", ["inspect", "mix"])
def test_damaged_lora_is_one_clear_error_and_nothing_is_written(tmp_path, capsys, damage, command):
    make, text = DAMAGE[damage]
    bad = tmp_path / "bad.safetensors"
    make(bad)
    before = _snapshot(tmp_path)
    argv = ["inspect", str(bad)] if command == "inspect" else ["mix", str(tmp_path / "out.safetensors"),
                                                                  "--lora", str(bad)]
    code, _, err = _run(argv, capsys)
    assert code == 2, err
    _one_clear_line(err)
    assert re.search(text, err), err
    assert _snapshot(tmp_path) == before


def test_pickle_refusal_is_plain_text(tmp_path, capsys):
    evil, junk = tmp_path / "evil.pt", tmp_path / "junk.ckpt"
    torch.save({"x": _Evil()}, evil)
    junk.write_bytes(b"hello, not a pickle")
    before = _snapshot(tmp_path)
    for f, reason in ((evil, r"it stores a Python object \(print\)"), (junk, "not a PyTorch tensor file")):
        code, out, err = _run(["inspect", str(f)], capsys)
        assert code == 2 and "this must never run" not in out
        _one_clear_line(err)
        assert re.search(reason, err), err
        assert "Weights only load failed" not in err and "two options" not in err    # torch's own text
    assert _snapshot(tmp_path) == before


def test_generate_with_a_pickle_base_says_why_in_plain_text(tmp_path, capsys, monkeypatch):
    from sdlora.pipelines import CheckpointError, read_checkpoint
    evil = tmp_path / "model.ckpt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(evil)
    msg = str(info.value)
    assert "it stores a Python object (print)" in msg and "\x1b" not in msg and "Weights only" not in msg


NON_UTF8 = os.fsdecode(b"caf\xe9 style.safetensors")   # a Latin-1 name, as from an old archive


def test_a_file_whose_name_is_not_utf8_loads(tmp_path, capsys):
    f = tmp_path / NON_UTF8
    save_file(lora_state(), str(tmp_path / "good.safetensors"))
    os.rename(tmp_path / "good.safetensors", f)
    code, out, err = _run(["inspect", str(f)], capsys)
    assert code == 0, err
    assert "damaged" not in out + err and "kohya" in out
    out_file = tmp_path / "mixed.safetensors"
    code, out, err = _run(["mix", str(out_file), "--lora", f"{f}:0.5"], capsys)
    assert code == 0, err
    from sdlora.formats import read_lora
    mixed = read_lora(out_file, family="sd1")
    assert list(mixed.patches) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    # printed to a real (UTF-8, strict) stdout: the name must not crash the command after its work
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "sdlora.cli", "inspect", os.fsencode(f)], capture_output=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert b"kohya" in run.stdout


def _good_inputs(tmp_path):
    a = tmp_path / "a.safetensors"
    save_file(lora_state(), str(a), metadata={"ss_sd_model_name": "dreamshaper_8",
                                              "modelspec.trigger_phrase": "neon glow",
                                              "ss_tag_frequency": json.dumps({"10_neon": {"neon glow": 10, "city": 3}})})
    b = tmp_path / "b.safetensors"
    save_file(lora_state(), str(b), metadata={"ss_sd_model_name": "dreamshaper_8",
                                              "ss_tag_frequency": json.dumps({"5_ink": {"ink wash": 5, "city": 2}})})
    return str(a), str(b)


def test_mix_disk_full_inside_safetensors_and_read_only_leave_nothing(tmp_path, capsys, monkeypatch):
    import safetensors.torch
    a, _ = _good_inputs(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous mix")
    before = _snapshot(tmp_path)

    def full(tensors, filename, metadata=None):   # as safetensors' Rust writer reports it
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = _run(["mix", str(out), "--lora", a], capsys)
    assert code == 2
    _one_clear_line(err)
    assert "no space left on the device [ENOSPC]" in err and "out.safetensors is unchanged" in err
    assert _snapshot(tmp_path) == before
    monkeypatch.undo()

    def read_only(*args):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "replace", read_only)
    code, _, err = _run(["mix", str(out), "--lora", a], capsys)
    assert code == 2
    _one_clear_line(err)
    assert "read-only [EROFS]" in err and "Nothing was written" in err
    assert _snapshot(tmp_path) == before


def test_fuse_disk_full_inside_safetensors_leaves_nothing(tmp_path, capsys, monkeypatch):
    import sdlora.merge as merge
    from loras import pipeline_folder
    base = pipeline_folder("sd1", tmp_path / "base")
    from loras import attention_paths, components, random_lora, write
    comps = components("sd1")
    a = write(tmp_path / "a.safetensors", random_lora(comps, attention_paths(comps)[:2]), "sd1")
    before = _snapshot(tmp_path)
    capsys.readouterr()                       # the fixture's own progress bars

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(merge, "save_file", full)
    code, _, err = _run(["fuse", str(base), str(tmp_path / "out"), "--lora", a], capsys)
    assert code == 2
    _one_clear_line(err)
    assert "no space left on the device [ENOSPC]" in err and "no folder was created" in err
    assert _snapshot(tmp_path) == before


def test_outputs_get_the_umask_modes(tmp_path, capsys):
    from loras import attention_paths, components, pipeline_folder, random_lora, write
    old = os.umask(0o022)
    try:
        a, b = _good_inputs(tmp_path)
        out = tmp_path / "mix.safetensors"
        assert _run(["mix", str(out), "--lora", a, "--lora", b], capsys)[0] == 0
        assert out.stat().st_mode & 0o777 == 0o644
        base = pipeline_folder("sd1", tmp_path / "base")
        comps = components("sd1")
        lora = write(tmp_path / "t.safetensors", random_lora(comps, attention_paths(comps)[:2]), "sd1")
        assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644     # save_lora (training's writer)
        fused = tmp_path / "fused"
        assert _run(["fuse", str(base), str(fused), "--lora", lora], capsys)[0] == 0
        modes = {str(p.relative_to(fused)): p.stat().st_mode & 0o777 for p in [fused, *fused.rglob("*")]}
        assert modes[str(Path("unet/diffusion_pytorch_model.safetensors"))] == 0o644   # patched: rewritten
        assert {m for rel, m in modes.items() if (fused / rel).is_dir()} == {0o755}
        assert {m for rel, m in modes.items() if (fused / rel).is_file()} == {0o644}
    finally:
        os.umask(old)


def test_mix_keeps_base_model_and_merges_trigger_words(tmp_path, capsys):
    a, b = _good_inputs(tmp_path)
    out = tmp_path / "mix.safetensors"
    assert _run(["mix", str(out), "--lora", f"{a}:0.6", "--lora", f"{b}:0.4"], capsys)[0] == 0
    from sdlora.inspect import inspect_lora
    info = inspect_lora(out)
    meta = info["metadata"]
    assert meta["ss_sd_model_name"] == "dreamshaper_8"                  # what the library shows as base
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.trigger_phrase"] == "neon glow, ink wash, city"
    assert json.loads(meta["ss_tag_frequency"]) == {"10_neon": {"neon glow": 10, "city": 3},
                                                    "5_ink": {"ink wash": 5, "city": 2}}
    assert info["trigger_words"][:2] == ["neon glow", "ink wash"]
    # a LoRA subtracted from the mix brings no trigger words; disagreeing bases are not claimed
    c = tmp_path / "c.safetensors"
    save_file(lora_state(), str(c), metadata={"ss_sd_model_name": "other", "modelspec.trigger_phrase": "rust"})
    assert _run(["mix", str(out), "--lora", a, "--lora", f"{c}:-0.5"], capsys)[0] == 0
    meta = inspect_lora(out)["metadata"]
    assert "rust" not in meta["modelspec.trigger_phrase"] and "ss_sd_model_name" not in meta


def test_mix_to_an_existing_folder_is_refused_before_the_work(tmp_path, capsys):
    a, _ = _good_inputs(tmp_path)
    (tmp_path / "loras").mkdir()
    before = _snapshot(tmp_path)
    code, _, err = _run(["mix", str(tmp_path / "loras"), "--lora", a], capsys)
    assert code == 2
    _one_clear_line(err)
    assert "is an existing folder; give a file name" in err
    assert _snapshot(tmp_path) == before


def test_generate_checks_the_output_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import sdlora.pipelines as pipelines

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr(pipelines, "load_base", must_not_load)
    taken = tmp_path / "outputs"
    taken.write_text("a file, not a folder")
    before = _snapshot(tmp_path)
    code, _, err = _run(["generate", "a cat", "--out", str(taken), "--steps", "1"], capsys)
    assert code == 2
    _one_clear_line(err)
    assert "is a file, not a folder" in err
    code, _, err = _run(["generate", "a cat", "--out", str(tmp_path / "o"), "--lora", str(tmp_path / "none.safetensors")],
                        capsys)
    assert code == 2 and "no file" in _one_clear_line(err)
    bad = _raw(tmp_path / "bad.safetensors", b"[" * 100000 + b"]" * 100000)   # damaged: found before the load
    before = _snapshot(tmp_path)
    code, _, err = _run(["generate", "a cat", "--out", str(tmp_path / "o"), "--lora", f"{bad}:0.5"], capsys)
    assert code == 2 and "nested thousands of levels deep" in _one_clear_line(err)
    (tmp_path / "dir.safetensors").mkdir()
    code, _, err = _run(["generate", "a cat", "--out", str(tmp_path / "o"), "--lora", str(tmp_path / "dir.safetensors")],
                        capsys)
    assert code == 2 and "is a folder, not a file" in _one_clear_line(err)
    assert _snapshot(tmp_path) == dict(before, **{"dir.safetensors": ("dir",)})


def test_generated_png_never_replaces_an_existing_name(tmp_path):
    """A1111's rule, which users expect: the next free number, never an overwrite or an error."""
    from PIL import Image

    from sdlora.generate import Generated, save_png
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "00004-7.png").write_bytes(b"someone's picture")
    (out / "00005-7.png").mkdir()                                # a folder of the next name
    before = _snapshot(tmp_path)
    image = Generated(Image.new("RGB", (8, 8), (200, 10, 10)), 7, "a cat\nSteps: 1")
    path = save_png(image, out)
    assert path.name == "00006-7.png"
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != "outputs/00006-7.png"} == before
    assert Image.open(path).text["parameters"] == "a cat\nSteps: 1"


@pytest.mark.parametrize("command", ["generate", "inspect", "mix", "fuse", "train"])
def test_help_imports_no_torch(command):
    """--help is fast because it imports neither torch nor diffusers (no timing: that depends on the machine)."""
    code = (f"import sys\nfrom sdlora import cli\ntry:\n    cli.main([{command!r}, '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout[-500:]


def test_help_texts_say_what_each_option_takes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS denoising steps" in text and "--height HEIGHT default: the model's native size" in text
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a diffusers folder, a single-file .safetensors/.ckpt checkpoint" in text and "hub id" in text


def test_symlink_loop_inside_a_base_folder_is_one_message(tmp_path):
    from sdlora.errors import SdloraError
    from sdlora.pipelines import load_base
    base = tmp_path / "model"
    base.mkdir()
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (base / "unet").mkdir()
    (base / "unet" / "again").symlink_to(base)
    with pytest.raises(SdloraError, match="symbolic link loop: it leads back to"):
        load_base(base)
    (base / "unet" / "again").unlink()
    (base / "unet" / "self.json").symlink_to(base / "unet" / "self.json")
    with pytest.raises(SdloraError, match=r"a symbolic link loop .*\[ELOOP\]"):
        load_base(base)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(SdloraError, match=r"base model .*loop.*symbolic link loop"):
        load_base(tmp_path / "loop")
