"""sdlora.mixing: weighted LoRAs patched into live tiny SD1/SD2/SDXL models, checked against
diffusers' own loading and fusing (kohya files) or the direct formula W0 + Σ s·ΔW."""
import os

import pytest
import torch

from loras import lora_file, random_lora, attention_paths, components, diffusers_fuse, modules, state, weight, write
from sdlora.adapters import Adapter, LoRA
from sdlora.blocks import LISTS, parse_lbw
from sdlora.errors import FamilyMismatchError, SdloraError, UnmatchedKeysError
from sdlora.formats import read_lora
from sdlora.mixing import LoraCache, MixEntry, Mixer
from sdlora.extra_networks import split_lora_arg
from tiny import lora_pipeline, tiny_configs


def _files(tmp_path, family, comps, n=2, paths=None, rank=4):
    paths = paths or attention_paths(comps)
    out = []
    for i in range(n):
        patches = random_lora(comps, paths, rank=rank + i, seed=10 + i)
        out.append((write(tmp_path / f"l{i}.safetensors", patches, family), patches))
    return out


def _expected(base, recipe_by_path):
    """W0 + Σ s·ΔW per path from the pristine weights, in fp32."""
    return {path: base[path].float() + sum(s * ad.delta(base[path].float()) for ad, s in items)
            for path, items in recipe_by_path.items()}


# ---------------------------------------------------------------------------------------------
# against diffusers

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_matches_diffusers_per_component_weights(tmp_path, family):
    comps, ref = components(family), components(family)
    (f0, _), (f1, _) = _files(tmp_path, family, comps)
    weights = [dict(unet=0.7, text_encoder=-0.4), dict(unet=-1.3, text_encoder=0.6)]
    Mixer(comps, cache=LoraCache()).apply([MixEntry(f0, **weights[0]), MixEntry(f1, **weights[1])])
    te = [c for c in comps if c != "unet"]
    diffusers_fuse(family, ref, [(f, {"unet": w["unet"], **{c: w["text_encoder"] for c in te}})
                                 for f, w in zip((f0, f1), weights)])
    got, want, base = state(comps), state(ref), state(components(family))
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    changed = [k for k in got if not torch.equal(got[k], base[k])]
    assert len(changed) == len(attention_paths(comps))  # every LoRA module and nothing else


# LBW slot -> diffusers' per-transformer UNet scale position, by hand from docs/formats.md "Block weights"
DIFFUSERS_BLOCKS = {
    "sd1": ({"block_0": ["IN01", "IN02"], "block_1": ["IN04", "IN05"], "block_2": ["IN07", "IN08"]},
            {"block_1": ["OUT03", "OUT04", "OUT05"], "block_2": ["OUT06", "OUT07", "OUT08"],
             "block_3": ["OUT09", "OUT10", "OUT11"]}),
    "sdxl": ({"block_1": ["IN04", "IN05"], "block_2": ["IN07", "IN08"]},
             {"block_0": ["OUT00", "OUT01", "OUT02"], "block_1": ["OUT03", "OUT04", "OUT05"]}),
}


@pytest.mark.parametrize("family, lbw", [
    ("sd1", [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, -0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]),
    ("sdxl", [0.9, 0.1, 0.2, -0.3, 0.4, 0.5, 0.6, 0.7, 0.8, -0.9, 1.0, 1.1]),
])
def test_block_weights_match_diffusers_block_scales(tmp_path, family, lbw):
    """Attention-only LoRA with an LBW list (17 for SD1, 12 for SDXL) vs diffusers' UNet block scales."""
    comps, ref = components(family), components(family)
    (f0, _), = _files(tmp_path, family, comps, n=1)
    Mixer(lora_pipeline(family, comps), cache=LoraCache()).apply(
        [MixEntry(f0, unet=0.5, text_encoder=2.0, blocks=",".join(map(str, lbw)))])
    s = dict(zip(LISTS[len(lbw)], lbw))
    down, up = DIFFUSERS_BLOCKS[family]
    unet_scales = {"down": {b: [0.5 * s[x] for x in slots] for b, slots in down.items()}, "mid": 0.5 * s["M00"],
                   "up": {b: [0.5 * s[x] for x in slots] for b, slots in up.items()}}
    te = {c: 2.0 * s["BASE"] for c in comps if c != "unet"}
    diffusers_fuse(family, ref, [(f0, {"unet": unet_scales, **te})])
    got, want = state(comps), state(ref)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------------------------
# against the formula

def test_block_weights_resnets_and_outside_modules():
    """LoCon on conv_in, resnets, samplers, time embedding and conv_out: slot weights from LBW rules."""
    comps = components("sd1")
    base = {p: w.detach().clone() for p, w in ((p, weight(comps, p)) for p in modules(comps))}
    paths = ["unet.conv_in", "unet.down_blocks.0.resnets.0.conv1", "unet.down_blocks.0.downsamplers.0.conv",
             "unet.down_blocks.3.resnets.1.conv2", "unet.up_blocks.0.resnets.2.conv1",
             "unet.up_blocks.0.upsamplers.0.conv", "unet.mid_block.resnets.1.time_emb_proj",
             "unet.time_embedding.linear_1", "unet.conv_out", "text_encoder.text_model.encoder.layers.1.mlp.fc2"]
    # slots by hand from docs/formats.md "UNet names" and "Block weights"
    slots = ["IN00", "IN01", "IN03", "IN11", "OUT02", "OUT02", "M00", None, None, "BASE"]
    lora = lora_file(random_lora(comps, paths, seed=3), "sd1")
    values26 = [round(0.1 * i - 1.0, 2) for i in range(26)]
    lbw26 = dict(zip(["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)],
                     values26))
    mixer = Mixer(comps)
    for spec, table in ((values26, lbw26), ("OUTALL", parse_lbw("OUTALL"))):
        mixer.apply([MixEntry(lora, unet=0.8, text_encoder=-0.5, blocks=spec)])
        for path, slot in zip(paths, slots):
            mult = 0.8 if path.startswith("unet.") else -0.5
            factor = 1.0 if slot is None else table[slot]
            want = base[path] + mult * factor * lora.patches[path].delta(base[path])
            if factor == 0:
                assert torch.equal(weight(comps, path), base[path]), path
            torch.testing.assert_close(weight(comps, path), want, rtol=1e-6, atol=1e-6, msg=path)
    assert parse_lbw("OUTALL")["IN00"] == 0.0   # 17-list: slots it does not name are off (LBW to26)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_restore_is_bit_identical_and_values_computed_in_fp32(dtype):
    comps = components("sd1", dtype)
    before = state(comps)
    paths = attention_paths(comps)
    a = lora_file(random_lora(comps, paths, seed=1), "sd1")
    b = lora_file(random_lora(comps, paths[::2], seed=2), "sd1")
    mix = [MixEntry(a, unet=0.6, text_encoder=0.3), MixEntry(b, unet=-1.0, text_encoder=-1.0)]
    mixer = Mixer(comps, backup_device="cpu" if dtype == torch.float32 else None)  # both backup placements
    mixer.apply(mix)
    # the same weights upcast to fp32 and mixed there: one rounding of that is what we must hold
    wide = {k: v.float() for k, v in components("sd1", dtype).items()}
    base = {p: weight(wide, p).detach().clone() for p in paths}   # fp32 upcast of the pristine weights
    Mixer(wide).apply(mix)
    want = _expected(base, {p: [(a.patches[p], 0.6 if p.startswith("unet.") else 0.3)] +
                            ([(b.patches[p], -1.0)] if p in b.patches else []) for p in paths})
    for p in paths:
        torch.testing.assert_close(weight(wide, p), want[p], rtol=1e-5, atol=1e-6, msg=p)
        assert torch.equal(weight(comps, p), weight(wide, p).to(dtype)), p
    mixer.apply([MixEntry(b, unet=2.0)])
    mixer.restore()
    after = state(comps)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert mixer.active == () and not mixer.patched and mixer.backup_bytes == 0


def test_only_touched_weights_are_backed_up():
    comps = components("sd1")
    paths = attention_paths(comps)
    lora = lora_file(random_lora(comps, paths, seed=1), "sd1")
    mixer = Mixer(comps)
    mixer.apply([MixEntry(lora, unet=1.0, text_encoder=0.0)])   # te multiplier 0: te left alone
    unet_paths = {p for p in paths if p.startswith("unet.")}
    assert mixer.patched == unet_paths
    assert mixer.backup_bytes == sum(weight(comps, p).nbytes for p in unet_paths)
    total = sum(t.nbytes for m in comps.values() for t in m.state_dict().values())
    assert mixer.backup_bytes < 0.5 * total


def test_changing_one_multiplier_recomputes_only_its_modules():
    comps, fresh = components("sd1"), components("sd1")
    paths = attention_paths(comps)
    a = lora_file(random_lora(comps, paths[:40], seed=1), "sd1")
    b = lora_file(random_lora(comps, paths[30:], seed=2), "sd1")
    mixer = Mixer(comps)
    first = mixer.apply([MixEntry(a, unet=0.5), MixEntry(b, unet=0.7)])
    assert set(first.updated) == set(paths)
    second = mixer.apply([MixEntry(a, unet=0.9), MixEntry(b, unet=0.7)])
    assert set(second.updated) == set(a.patches) and not second.restored   # 40 of len(paths) modules
    Mixer(fresh).apply([MixEntry(a, unet=0.9), MixEntry(b, unet=0.7)])
    got, want = state(comps), state(fresh)
    assert all(torch.equal(got[k], want[k]) for k in got)        # same bits as a fresh apply
    third = mixer.apply([MixEntry(b, unet=0.7)])                   # drop a
    assert set(third.restored) == set(a.patches) - set(b.patches)
    assert set(third.updated) == set(a.patches) & set(b.patches)
    assert mixer.apply([MixEntry(b, unet=0.7)]).updated == ()      # same mix: nothing to do


def test_inference_after_apply_has_no_hooks_and_matches_directly_set_weights():
    comps, direct = components("sd1"), components("sd1")
    base = {p: weight(comps, p).detach().clone() for p in modules(comps)}
    params_before = {id(p) for m in comps.values() for p in m.parameters()}
    paths = attention_paths(comps)
    lora = lora_file(random_lora(comps, paths, seed=4), "sd1")
    Mixer(comps).apply([MixEntry(lora, unet=0.8, text_encoder=0.8)])
    want = _expected(base, {p: [(lora.patches[p], 0.8)] for p in paths})
    with torch.no_grad():
        for p in paths:   # the other model gets the same weights the plain way
            torch.testing.assert_close(weight(comps, p), want[p], rtol=1e-5, atol=1e-6)
            weight(direct, p).copy_(weight(comps, p))
    for m in comps["unet"].modules():
        assert not (m._forward_hooks or m._forward_pre_hooks), type(m)
        assert type(m) in {type(d) for d in direct["unet"].modules()}
    assert {id(p) for m in comps.values() for p in m.parameters()} == params_before
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10])
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        ctx, ctx_direct = comps["text_encoder"](ids)[0], direct["text_encoder"](ids)[0]
        assert torch.equal(ctx, ctx_direct)
        assert torch.equal(comps["unet"](x, t, ctx).sample, direct["unet"](x, t, ctx_direct).sample)


def test_file_cache_reads_each_file_once(tmp_path):
    comps = components("sd1")
    paths = attention_paths(comps)[:6]
    (f0, _), (f1, _) = _files(tmp_path, "sd1", comps, paths=paths)
    reads = []
    cache = LoraCache(reader=lambda *a: reads.append(a[0]) or read_lora(a[0], family=a[1], configs=a[2]))
    mixer = Mixer(comps, cache=cache)
    for mix in ([f0], [f1], [f0, f1], [f0], [f1, f0]):
        mixer.apply([MixEntry(f) for f in mix])
    assert cache.reads == 2 and len(reads) == 2
    write(f1, random_lora(comps, paths, seed=99), "sd1")    # changed on disk: read again
    os.utime(f1, ns=(1, 1))
    mixer.apply([MixEntry(f1)])
    assert cache.reads == 3
    small = LoraCache(max_bytes=1, reader=cache.reader)               # bound: keeps only the latest
    m2 = Mixer(components("sd1"), cache=small)
    m2.apply([MixEntry(f0)]), m2.apply([MixEntry(f1)]), m2.apply([MixEntry(f0)])
    assert small.reads == 3


def _sd1_with_a_mix():
    """A tiny SD1 with one LoRA applied at UNet 0.5: (components, paths, file, mixer, its state)."""
    comps = components("sd1")
    paths = attention_paths(comps)
    good = lora_file(random_lora(comps, paths, seed=1), "sd1")
    mixer = Mixer(comps)
    mixer.apply([MixEntry(good, unet=0.5)])
    return comps, paths, good, mixer, state(comps)


def test_failed_apply_leaves_weights_untouched(tmp_path):
    comps, paths, good, mixer, applied = _sd1_with_a_mix()
    xl = components("sdxl")
    xl_file = write(tmp_path / "xl.safetensors", random_lora(xl, attention_paths(xl)[:4]), "sdxl")
    bad_shape = {paths[0]: LoRA(torch.ones(7, 2), torch.ones(2, 5))}
    bad_name = {"unet.down_blocks.0.attentions.0.no_such_layer": LoRA(torch.ones(32, 2), torch.ones(2, 32))}
    cases = [
        ([MixEntry(good), MixEntry(xl_file)], FamilyMismatchError, "SDXL"),
        ([MixEntry(good), MixEntry(lora_file(bad_shape, "sd1"))], UnmatchedKeysError, "do not fit"),
        ([MixEntry(lora_file(bad_name, "sd1"))], UnmatchedKeysError, "not found"),
        ([MixEntry(good, blocks="1,2,3")], SdloraError, "12, 17, 20 or 26"),
        ([MixEntry(good, unet=float("nan"))], SdloraError, "finite"),
        ([MixEntry(tmp_path / "missing.safetensors")], SdloraError, "not found"),
    ]
    for entries, err, text in cases:
        with pytest.raises(err, match=text):
            mixer.apply(entries)
        now = state(comps)
        assert all(torch.equal(applied[k], now[k]) for k in now)
        assert mixer.active == (MixEntry(good, unet=0.5),)
    no_te = Mixer({"unet": comps["unet"]})
    with pytest.raises(SdloraError, match="no text_encoder"):
        no_te.apply([MixEntry(good)])
    no_te.apply([MixEntry(good, text_encoder=0)])   # explicitly without the text-encoder part: fine


class _RowScale(Adapter):
    """Test-only non-additive adapter: W' = W · (1 + s·v) per output row (reads the current W)."""
    algorithm, additive = "rowscale", False

    def __init__(self, v):
        super().__init__({"v": v})

    def apply(self, weight, strength):
        return weight * (1 + strength * self.tensors["v"].to(weight.device))[:, None]

    def target_shape_ok(self, shape):
        return shape[0] == self.tensors["v"].shape[0]


def test_non_additive_after_additive_sum_and_bias_deltas():
    comps = components("sd1")
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"       # no bias
    out = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"  # has a bias
    mod_q = comps["unet"].get_submodule(q[5:])
    mod_out = comps["unet"].get_submodule(out[5:])
    w_q, w_out, b_out = mod_q.weight.clone(), mod_out.weight.clone(), mod_out.bias.clone()
    g = torch.Generator().manual_seed(0)
    lo = {p: LoRA(torch.randn(32, 2, generator=g), torch.randn(2, 32, generator=g), alpha=1.0,
                  bias=torch.randn(32, generator=g)) for p in (q, out)}
    rs = _RowScale(torch.randn(32, generator=g))
    scale = lora_file({q: rs}, "sd1")
    lora = lora_file(lo, "sd1")
    mixer = Mixer(comps)
    mixer.apply([MixEntry(scale, unet=0.5), MixEntry(lora, unet=-0.7)])   # rowscale listed first
    want_q = (w_q + -0.7 * lo[q].delta(w_q)) * (1 + 0.5 * rs.tensors["v"])[:, None]
    torch.testing.assert_close(mod_q.weight, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mod_q.bias, -0.7 * lo[q].bias_delta(None))             # created
    torch.testing.assert_close(mod_out.bias, b_out - 0.7 * lo[out].bias_delta(b_out))
    mixer.apply([MixEntry(lora, unet=0.0), MixEntry(scale, unet=1.0)])   # bias part gone
    assert mod_q.bias is None and torch.equal(mod_out.bias, b_out) and torch.equal(mod_out.weight, w_out)
    mixer.restore()
    assert mod_q.bias is None and torch.equal(mod_q.weight, w_q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_apply_and_restore(dtype):
    comps = {k: v.to("cuda") for k, v in components("sd1", dtype).items()}
    before = state(comps)
    paths = attention_paths(comps)
    cpu = components("sd1")
    lora = lora_file(random_lora(cpu, paths, seed=1), "sd1")
    mixer = Mixer(comps)
    mixer.apply([MixEntry(lora, unet=0.7, text_encoder=-0.2)])
    p = paths[0]
    w0 = before[f"unet.{p[5:]}.weight"]
    want = (w0.float() + 0.7 * lora.patches[p].delta(w0.float())).to(dtype)
    torch.testing.assert_close(weight(comps, p).float(), want.float(), rtol=0, atol=float(want.abs().max()) * 2e-3)
    mixer.restore()
    after = state(comps)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# the command-line entry format

@pytest.mark.parametrize("spec, want", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.7", ("style.safetensors", 0.7)),
    ("style.safetensors:-1.25", ("style.safetensors", -1.25)),
    ("dir/a:b.safetensors", ("dir/a:b.safetensors", 1.0)),
    ("C:\\loras\\style.safetensors", ("C:\\loras\\style.safetensors", 1.0)),
    ("C:\\loras\\style.safetensors:-0.5", ("C:\\loras\\style.safetensors", -0.5)),
    ("D:/x.safetensors:2", ("D:/x.safetensors", 2.0)),
])
def test_path_weight_parsing(spec, want):
    assert split_lora_arg(spec) == (want[0], want[1], want[1])
    e = MixEntry.parse(spec)
    assert (e.source, e.unet, e.text_encoder) == (want[0], want[1], want[1])


def test_path_weight_errors(tmp_path):
    with pytest.raises(SdloraError, match="finite"):
        split_lora_arg("a.safetensors:nan")
    with pytest.raises(SdloraError, match="no file"):
        split_lora_arg(":0.5")
    odd = tmp_path / "odd:0.5"                # an existing file whose name ends like a weight
    odd.write_bytes(b"")
    assert split_lora_arg(str(odd)) == (str(odd), 1.0, 1.0)
    assert split_lora_arg("a.safetensors:0.5:-1") == ("a.safetensors", 0.5, -1.0)   # PATH:TE:UNET, as --lora


def test_tiny_configs_are_what_the_mixer_reports():
    """The mixer describes its target with the same configs the tiny model was built from."""
    comps = components("sdxl")
    cfg = Mixer(comps).target.configs
    want = tiny_configs("sdxl")
    for comp in comps:
        for k in ("hidden_size", "block_out_channels", "cross_attention_dim", "projection_dim"):
            if k in want[comp]:
                assert cfg[comp][k] == want[comp][k] or list(cfg[comp][k]) == list(want[comp][k])
    assert cfg["text_encoder_2"]["architectures"] == ["CLIPTextModelWithProjection"]


class _Bomb(Adapter):
    """Test-only adapter whose ΔW fails: a failure in the middle of patching (out of memory, Ctrl-C)."""
    algorithm = "bomb"

    def __init__(self, rows, exc):
        super().__init__({"v": torch.ones(rows)})
        self.exc = exc

    def delta(self, weight):
        raise self.exc

    def target_shape_ok(self, shape):
        return shape[0] == self.tensors["v"].shape[0]


@pytest.mark.parametrize("exc", [RuntimeError("simulated out of memory"), KeyboardInterrupt()])
@pytest.mark.parametrize("backup_device", ["cpu", None])
def test_failure_while_patching_leaves_the_previous_mix(exc, backup_device):
    comps = components("sd1")
    paths = attention_paths(comps)
    base = state(comps)
    a = lora_file(random_lora(comps, paths[:30], seed=1), "sd1")
    b = lora_file(random_lora(comps, paths[20:], seed=2), "sd1")
    mixer = Mixer(comps, backup_device=backup_device)
    first = (MixEntry(a, unet=0.5, text_encoder=0.5), MixEntry(b, unet=-0.3, text_encoder=0.3))
    mixer.apply(first)
    applied, patched = state(comps), mixer.patched
    last = paths[25]                                   # reached after many modules were rewritten
    bomb = lora_file({last: _Bomb(weight(comps, last).shape[0], exc)}, "sd1")
    for entries in ([MixEntry(a, unet=0.9), MixEntry(bomb)],          # changes, then fails
                    [MixEntry(bomb)],                                  # restores the others, then fails
                    [MixEntry(b, unet=0.7), MixEntry(bomb), MixEntry(a)]):
        with pytest.raises(type(exc)):
            mixer.apply(entries)
        now = state(comps)
        assert all(torch.equal(applied[k], now[k]) for k in now)       # bit for bit the previous mix
        assert mixer.active == first and mixer.patched == patched
    assert mixer.apply(first).updated == ()                            # it knows what is applied
    mixer.restore()
    now = state(comps)
    assert all(torch.equal(base[k], now[k]) for k in now)


def test_adapters_with_inconsistent_shapes_are_refused_before_patching():
    comps, paths, good, mixer, applied = _sd1_with_a_mix()
    rows, cols = weight(comps, paths[3]).shape
    cases = [
        (LoRA(torch.ones(rows, 4), torch.ones(2, cols)), "lora_up .* has rank 4 but lora_down .* has rank 2"),
        (LoRA(torch.ones(rows, 0), torch.ones(0, cols)), "rank 0"),
        (LoRA(torch.ones(rows, 2, 3, 3), torch.ones(2, cols)), r"lora_up .* must be \[out, rank, 1, 1\]"),
    ]
    for ad, text in cases:
        with pytest.raises(SdloraError, match=f"{paths[3]}: {text}.*nothing was changed"):
            mixer.apply([MixEntry(good), MixEntry(lora_file({paths[3]: ad}, "sd1"))])
        now = state(comps)
        assert all(torch.equal(applied[k], now[k]) for k in now)
        assert mixer.active == (MixEntry(good, unet=0.5),)
