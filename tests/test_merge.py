"""`sdlora mix` and `sdlora fuse`: exact concat and SVD merges, folders baked with LoRAs."""
import filecmp
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

from loras import lora_file, random_lora, attention_paths, components, diffusers_fuse, pipeline_folder, weight, write
from sdlora import cli
from sdlora.formats import read_lora
from sdlora.adapters import Adapter, LoRA
from sdlora.errors import FamilyMismatchError, SdloraError
from sdlora.families import live_path, module_table
from sdlora.merge import fuse, mix_loras, save_mix
from sdlora.lora_cache import DEFAULT_CACHE
from sdlora.mixing import LoraCache, MixEntry, Mixer
from tiny import tiny_configs


@pytest.fixture(autouse=True)
def _fresh_cache():
    DEFAULT_CACHE.clear()


CONVS = ["unet.down_blocks.0.resnets.0.conv1", "unet.up_blocks.1.resnets.0.conv_shortcut", "unet.conv_in"]


class _Full(Adapter):
    """Test-only additive non-LoRA adapter (like LyCORIS full/diff): ΔW = diff."""
    algorithm = "full"

    def __init__(self, diff):
        super().__init__({"diff": diff})

    def delta(self, weight):
        return self._t("diff", weight).reshape(weight.shape)

    def target_shape_ok(self, shape):
        return tuple(shape) == tuple(self.tensors["diff"].shape)


def _inputs(tmp_path, comps):
    """Three sd1 LoRA files of different ranks/alphas: attention, LoCon 3×3, a Tucker (lora_mid) LoCon."""
    paths = attention_paths(comps)
    a = random_lora(comps, paths + CONVS[:2], rank=4, seed=1)
    b = random_lora(comps, paths[10:] + CONVS[1:], rank=3, seed=2, alpha=1.0)
    g = torch.Generator().manual_seed(3)
    c = {p: ad for p, ad in random_lora(comps, paths[:20], rank=2, seed=4).items()}
    w = weight(comps, CONVS[0])
    c[CONVS[0]] = LoRA(torch.randn(w.shape[0], 2, 1, 1, generator=g) * 0.1, torch.randn(2, w.shape[1], 1, 1, generator=g),
                       mid=torch.randn(2, 2, 3, 3, generator=g) * 0.3, alpha=1.5)
    files = [write(tmp_path / f"{n}.safetensors", p, "sd1") for n, p in (("a", a), ("b", b), ("c", c))]
    return files, [a, b, c]


def _weighted_sum(patches_list, weights, comps):
    out = {}
    for patches, s in zip(patches_list, weights):
        for p, ad in patches.items():
            w = weight(comps, p).detach()
            out[p] = out.get(p, 0) + s * ad.delta(w)
    return out


def test_mix_exact_is_the_weighted_sum_and_diffusers_loads_it(tmp_path):
    comps = components("sd1")
    files, patches = _inputs(tmp_path, comps)
    weights = [0.7, -1.3, 0.5]
    entries = [MixEntry(f, unet=s, text_encoder=s) for f, s in zip(files, weights)]
    mixed = mix_loras(entries, configs=tiny_configs("sd1"), cache=LoraCache())
    assert mixed.method == "concat" and mixed.errors == {}
    want = _weighted_sum(patches, weights, comps)
    assert mixed.patches.keys() == want.keys()
    for p, d in want.items():
        got = mixed.patches[p].delta(weight(comps, p))
        torch.testing.assert_close(got, d, rtol=1e-5, atol=1e-6, msg=p)
    a_only = attention_paths(comps)[0]   # a (rank 4) + c (rank 2): ranks concatenated
    assert mixed.patches[a_only].rank == 6 and mixed.patches[CONVS[0]].rank == 4 + 2
    out = tmp_path / "mix.safetensors"
    save_mix(out, mixed, entries, configs=tiny_configs("sd1"))
    # read back, what we wrote is the same sum, and so says diffusers' own loader (mid is folded in)
    ours = components("sd1")
    Mixer(ours, cache=LoraCache()).apply([MixEntry(str(out))])
    ref = components("sd1")
    diffusers_fuse("sd1", ref, [(str(out), 1.0)])
    for p, d in want.items():
        w0 = weight(comps, p)
        torch.testing.assert_close(weight(ours, p), w0 + d, rtol=1e-5, atol=1e-6, msg=p)
        torch.testing.assert_close(weight(ref, p), w0 + d, rtol=1e-5, atol=1e-6, msg=p)


def test_mix_metadata_says_it_is_a_merge(tmp_path):
    comps = components("sd1")
    files, _ = _inputs(tmp_path, comps)
    entries = [MixEntry(f, unet=0.5, text_encoder=0.5) for f in files[:2]]
    out = tmp_path / "merged.safetensors"
    save_mix(out, mix_loras(entries, configs=tiny_configs("sd1"), cache=LoraCache()), entries,
             configs=tiny_configs("sd1"))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        ranks = {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith("lora_down.weight")}
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "Dynamic" and ranks == {3, 4, 7}   # b alone: 3, a: 4, a+b: 7
    assert alphas == {7.0} and meta["ss_network_alpha"] == "7"          # one alpha in every module
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.merged_from"] == "a, b" and meta["modelspec.title"] == "merged"
    recipe = json.loads(meta["sdlora_merge"])
    assert recipe["method"] == "concat" and [i["unet"] for i in recipe["inputs"]] == [0.5, 0.5]
    data = out.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + header:]).hexdigest()


def test_mix_svd_is_the_best_rank_r_approximation_and_error_falls(tmp_path):
    comps = components("sd1")
    files, patches = _inputs(tmp_path, comps)
    full_path = attention_paths(comps)[3]
    full = lora_file({full_path: _Full(torch.randn(weight(comps, full_path).shape) * 0.01)}, "sd1")
    weights = [0.7, -1.3, 0.5]
    entries = [MixEntry(f, unet=s, text_encoder=s) for f, s in zip(files, weights)] + [MixEntry(full, unet=2.0)]
    with pytest.raises(SdloraError, match="--rank"):
        mix_loras(entries, configs=tiny_configs("sd1"))
    want = _weighted_sum(patches, weights, comps)
    want[full_path] = want[full_path] + 2.0 * full.patches[full_path].tensors["diff"]
    errors = []
    for rank in (1, 2, 4, 8, 12):
        mixed = mix_loras(entries, rank=rank, configs=tiny_configs("sd1"))
        assert mixed.method == "svd"
        sq = {}
        for p, d in want.items():
            m = d.reshape(d.shape[0], -1)
            s = torch.linalg.svdvals(m)                                     # dense reference
            got = mixed.patches[p].delta(weight(comps, p)).reshape(m.shape)
            best = float(s[rank:].pow(2).sum().sqrt())                      # Eckart–Young
            assert abs(float((got - m).norm()) - best) <= 1e-4 * float(s.norm()) + 1e-6, (rank, p)
            true_rank = int(torch.linalg.matrix_rank(m))
            assert min(rank, true_rank) <= mixed.patches[p].rank <= min(rank, *m.shape), (rank, p)
            c = p.split(".")[0]
            e, n = sq.get(c, (0.0, 0.0))
            sq[c] = (e + best ** 2, n + float(s.norm()) ** 2)
        for c, (e, n) in sq.items():
            assert mixed.errors[c] == pytest.approx((e / n) ** 0.5, rel=1e-3, abs=1e-6)
        errors.append(mixed.errors)
    for comp in ("unet", "text_encoder"):
        seq = [e[comp] for e in errors]
        assert all(x > y or x == y == 0 for x, y in zip(seq, seq[1:])) and seq[0] > 0.3, seq
    assert errors[-1]["text_encoder"] == 0       # rank 12 ≥ 4+3: the low-rank sum is recovered exactly
    assert errors[-1]["unet"] > 0                # the full-rank `full` module is not


def test_mix_refuses_what_a_lora_file_cannot_hold(tmp_path):
    comps = components("sd1")
    files, _ = _inputs(tmp_path, comps)
    p = attention_paths(comps)[0]

    class _Rescale(_Full):
        algorithm, additive = "dora", False

    dora = lora_file({p: _Rescale(torch.zeros(weight(comps, p).shape))}, "sd1")
    with pytest.raises(SdloraError, match="sdlora fuse"):
        mix_loras([MixEntry(files[0]), MixEntry(dora)], rank=4, configs=tiny_configs("sd1"))
    biased = lora_file({p: LoRA(torch.ones(32, 1), torch.ones(1, 32), bias=torch.ones(32))}, "sd1")
    with pytest.raises(SdloraError, match="bias"):
        mix_loras([MixEntry(biased)], configs=tiny_configs("sd1"))
    xl = components("sdxl")
    xl_file = lora_file(random_lora(xl, attention_paths(xl)[:2]), "sdxl")
    with pytest.raises(FamilyMismatchError, match="SDXL"):
        mix_loras([MixEntry(files[0]), MixEntry(xl_file)], configs=tiny_configs("sd1"))


def _real_size_files(tmp_path):
    """Small kohya files with real SD1.5 shapes (a few modules), as a user would pass them."""
    table = module_table("sd1")
    paths = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "unet.down_blocks.0.resnets.0.conv1",
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    files = []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        patches = {}
        for p in paths[i:]:
            shape = table[p].shape
            down = torch.randn(4, *shape[1:], generator=g) * 0.05
            up = torch.randn(shape[0], 4, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.05
            patches[p] = LoRA(up, down, alpha=2.0)
        files.append((write(tmp_path / f"real{i}.safetensors", patches, "sd1", configs={}), patches))
    return files, table


def test_cli_mix(tmp_path, capsys):
    ((f0, p0), (f1, p1)), _ = _real_size_files(tmp_path)
    out = tmp_path / "out.safetensors"
    assert cli.main(["mix", str(out), "--lora", f"{f0}:0.5", "--lora", f"{f1}:-1"]) == 0
    assert "exact" in capsys.readouterr().out
    got = read_lora(out, family="sd1")
    for p, ad in got.patches.items():
        zero = torch.zeros(ad.tensors["up"].shape[0], *ad.tensors["down"].shape[1:])
        want = 0.5 * p0[p].delta(zero) - (p1[p].delta(zero) if p in p1 else 0)
        torch.testing.assert_close(ad.delta(zero), want, rtol=1e-5, atol=1e-7)
    assert got.patches.keys() == p0.keys()
    assert cli.main(["mix", str(out), "--lora", f0, "--lora", f"{f1}:0.25", "--rank", "2",
                     "--save-dtype", "fp16"]) == 0
    text = capsys.readouterr().out
    assert "SVD merge to rank 2" in text and "unet:" in text and "text_encoder:" in text
    with safe_open(str(out), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert cli.main(["mix", str(out), "--lora", str(tmp_path / "nope.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# fuse

def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("family, dtype", [("sd1", torch.float32), ("sdxl", torch.float16)])
def test_fuse_writes_a_loadable_folder_with_only_lora_weights_changed(tmp_path, family, dtype):
    from diffusers import DiffusionPipeline
    base = pipeline_folder(family, tmp_path / "base", dtype)
    comps = components(family)
    paths = attention_paths(comps) + ["unet.conv_in", "unet.up_blocks.1.resnets.0.conv1"]
    a = write(tmp_path / "a.safetensors", random_lora(comps, paths, seed=1), family)
    b = write(tmp_path / "b.safetensors", random_lora(comps, paths[::3], seed=2), family)
    out = tmp_path / "out"
    assert cli.main(["fuse", str(base), str(out), "--lora", f"{a}:0.8", "--lora", f"{b}:-0.5"]) == 0
    # the same mix applied live by the Mixer (checked against diffusers in test_mixing) gives the same bits
    live = {k: v.to(dtype) for k, v in components(family).items()}
    Mixer(live, cache=LoraCache()).apply([MixEntry(a, unet=0.8, text_encoder=0.8),
                                          MixEntry(b, unet=-0.5, text_encoder=-0.5)])
    touched = set()
    for src in sorted(base.rglob("*")):
        dst = out / src.relative_to(base)
        if src.is_dir():
            continue
        assert dst.is_file(), dst
        if src.suffix != ".safetensors" or src.parent.name not in live:
            assert filecmp.cmp(src, dst, shallow=False), src        # byte-for-byte copy
            continue
        old, new = _tensors(src), _tensors(dst)
        assert old.keys() == new.keys()
        model = live[src.parent.name]
        for k in old:
            assert new[k].dtype == old[k].dtype
            if torch.equal(old[k], new[k]):
                continue
            touched.add(f"{src.parent.name}.{k}")
            live_key = k if k in model.state_dict() else k.replace("text_model.", "", 1)
            assert torch.equal(new[k], model.state_dict()[live_key]), k
    # the files were saved by the installed transformers, so their names are the live ones
    assert touched == {f"{p.split('.')[0]}.{live_path(live[p.split('.')[0]], p)}.weight" for p in paths}
    pipe = DiffusionPipeline.from_pretrained(out, torch_dtype=dtype)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    assert torch.equal(pipe.unet.conv_in.weight, live["unet"].conv_in.weight)


def test_fuse_refuses_overwrite_and_fails_cleanly(tmp_path, capsys):
    base = pipeline_folder("sd1", tmp_path / "base")
    comps = components("sd1")
    a = write(tmp_path / "a.safetensors", random_lora(comps, attention_paths(comps)[:3]), "sd1")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["fuse", str(base), str(out), "--lora", a]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    xl = components("sdxl")
    bad = write(tmp_path / "xl.safetensors", random_lora(xl, attention_paths(xl)[:2]), "sdxl")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FamilyMismatchError):
        fuse(base, tmp_path / "new", [MixEntry(bad)])
    assert sorted(os.listdir(tmp_path)) == before                  # no OUT, no temp folder left
    with pytest.raises(SdloraError, match="not a diffusers pipeline folder"):
        fuse(tmp_path, tmp_path / "new", [MixEntry(a)])
    with pytest.raises(SdloraError, match="inside it"):
        fuse(base, base / "sub", [MixEntry(a)])
    # --overwrite replaces only an empty folder or a model folder, never a folder of other files
    with pytest.raises(SdloraError, match="not a model folder.*keep.txt.*nothing was touched"):
        fuse(base, out, [MixEntry(a)], overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    said = []
    assert fuse(base, out, [MixEntry(a, unet=0.0)], overwrite=True, log=said.append) == {}  # zero weight: a copy
    assert said == [f"replaced {out} (an empty folder)"]
    assert fuse(base, out, [MixEntry(a)], overwrite=True, log=said.append) == {"unet": 3}
    assert said[-1].startswith(f"replaced {out} (a model folder") and (out / "model_index.json").is_file()
    assert sorted(os.listdir(tmp_path)) == before


def test_fuse_finds_text_encoder_weights_saved_by_transformers_4(tmp_path):
    """Folders from the hub name CLIP tensors `text_model.encoder...` (transformers 4.x); patch those."""
    from safetensors.torch import save_file
    base = pipeline_folder("sd1", tmp_path / "base")
    te_file = base / "text_encoder" / "model.safetensors"
    save_file({"text_model." + k: v for k, v in _tensors(te_file).items()}, str(te_file), metadata={"format": "pt"})
    comps = components("sd1")
    paths = [p for p in attention_paths(comps) if p.startswith("text_encoder.")]
    a = write(tmp_path / "a.safetensors", random_lora(comps, paths, seed=1), "sd1")
    assert fuse(base, tmp_path / "out", [MixEntry(a, text_encoder=-0.7)]) == {"text_encoder": len(paths)}
    Mixer(comps, cache=LoraCache()).apply([MixEntry(a, text_encoder=-0.7)])
    new = _tensors(tmp_path / "out" / "text_encoder" / "model.safetensors")
    for p in paths:
        assert torch.equal(new[p.partition(".")[2] + ".weight"], weight(comps, p)), p


def _snapshot(folder):
    """relative path -> bytes of every file under `folder` (what must survive a refused command)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fuse_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    base = pipeline_folder("sd1", root / "pristine")
    comps = components("sd1")
    a = write(root / "a.safetensors", random_lora(comps, attention_paths(comps)[:3]), "sd1")
    return base, a


def _copy_base(fuse_inputs, dest):
    import shutil
    shutil.copytree(fuse_inputs[0], dest)
    return dest


def test_fuse_never_deletes_the_base_or_what_contains_it(tmp_path, fuse_inputs, capsys):
    models = tmp_path / "models"
    base = _copy_base(fuse_inputs, models / "base")
    (models / "notes.txt").write_text("unrelated")
    (tmp_path / "link").symlink_to(models)
    before = _snapshot(tmp_path)
    a = fuse_inputs[1]
    for out in (models, tmp_path / "link", tmp_path):          # OUT a parent of BASE, also through a link
        assert cli.main(["fuse", str(base), str(out), "--lora", a, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sdlora: error: ") and "contains the base folder" in err and "Traceback" not in err
    assert cli.main(["fuse", str(base), str(tmp_path / "link" / "base"), "--lora", a, "--overwrite"]) == 2
    assert "is the base folder" in capsys.readouterr().err
    # a base whose weights are links into OUT (hub-cache style): replacing OUT would delete them
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "model_index.json").symlink_to(base / "model_index.json")
    for comp in ("unet", "text_encoder", "vae", "tokenizer", "scheduler"):
        (linked / comp).symlink_to(base / comp)
    before = _snapshot(tmp_path)
    assert cli.main(["fuse", str(linked), str(models), "--lora", a, "--overwrite"]) == 2
    assert "is a link into" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_fuse_cleans_only_stale_temp_folders_of_its_output(tmp_path, fuse_inputs):
    base, a = fuse_inputs
    dead = 2 ** 22 + 12345
    while True:                       # a pid that is not running
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    stale = tmp_path / f".out.{dead}-0123abcd.tmp"
    live = tmp_path / f".out.{os.getpid()}-0123abcd.tmp"        # a run in progress (this process)
    other = tmp_path / f".other.{dead}-0123abcd.tmp"            # another output's
    legacy_old, legacy_new = tmp_path / ".out.ab_cd12x.tmp", tmp_path / ".out.zz_cd12x.tmp"  # mkdtemp names
    for d in (stale, live, other, legacy_old, legacy_new):
        d.mkdir()
        (d / "part").write_text("x")
    os.utime(legacy_old, (0, 0))
    said = []
    fuse(base, tmp_path / "out", [MixEntry(a)], log=said.append)
    assert not stale.exists() and not legacy_old.exists()
    assert live.exists() and other.exists() and legacy_new.exists()
    assert sum("left over by an interrupted run" in s for s in said) == 2


def test_fuse_disk_full_and_read_only_leave_nothing(tmp_path, fuse_inputs, monkeypatch, capsys):
    import errno
    import sdlora.merge as merge
    base, a = fuse_inputs
    out = tmp_path / "out"
    fuse(base, out, [MixEntry(a, unet=0.0)])                   # an existing model folder to replace
    before = _snapshot(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out))
    monkeypatch.setattr(merge, "save_file", full)
    assert cli.main(["fuse", str(base), str(out), "--lora", a, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device [ENOSPC]" in err and "the old" in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["out"]
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))
    monkeypatch.setattr(merge, "temp_dir", read_only)
    assert cli.main(["fuse", str(base), str(tmp_path / "new"), "--lora", a]) == 2
    err = capsys.readouterr().err
    assert "read-only [EROFS]" in err and "no folder was created" in err
    assert _snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions, so chmod cannot make it read-only")
def test_fuse_into_a_read_only_folder(tmp_path, fuse_inputs, capsys):
    base, a = fuse_inputs
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert cli.main(["fuse", str(base), str(ro / "out"), "--lora", a]) == 2
        assert "permission denied [EACCES]" in capsys.readouterr().err
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_fuse_refuses_symlink_loops_in_the_base(tmp_path, fuse_inputs, capsys):
    a = fuse_inputs[1]
    base = _copy_base(fuse_inputs, tmp_path / "base")
    (base / "unet" / "again").symlink_to(base)                 # a folder loop: copying would never end
    assert cli.main(["fuse", str(base), str(tmp_path / "out"), "--lora", a]) == 2
    assert "symbolic link loop: it leads back to" in capsys.readouterr().err
    (base / "unet" / "again").unlink()
    loop = base / "vae" / "loop.json"
    loop.symlink_to(loop)                                      # a file that is a link to itself
    assert cli.main(["fuse", str(base), str(tmp_path / "out"), "--lora", a]) == 2
    err = capsys.readouterr().err
    assert "loop.json: a symbolic link loop" in err and "[ELOOP]" in err
    assert sorted(os.listdir(tmp_path)) == ["base"]


def test_mix_to_a_folder_or_a_full_disk(tmp_path, monkeypatch, capsys):
    import errno
    import safetensors.torch
    ((f0, _), _), _ = _real_size_files(tmp_path)
    folder = tmp_path / "taken.safetensors"
    folder.mkdir()
    assert cli.main(["mix", str(folder), "--lora", f0]) == 2
    assert "is an existing folder; give a file name" in capsys.readouterr().err
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous mix")
    before = _snapshot(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert cli.main(["mix", str(out), "--lora", f0]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device [ENOSPC]" in err and "out.safetensors is unchanged" in err
    assert _snapshot(tmp_path) == before and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
