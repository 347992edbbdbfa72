"""sdlora.routing: per-sample mixes by hooks, checked against patching (Mixer) sample by sample.

Reference: the Mixer patches one mix into the weights and the plain model runs; routing must give
the same UNet and text-encoder outputs (max |a−b| / max |b| ≤ 1e-4 in fp32) and leave nothing behind.
"""
import pytest
import torch

from loras import attention_paths, components, lora_file, random_lora, state, write
from sdlora.adapters import IA3, OFT, DoRA, Full, LoHa, LoKr, LoRA
from sdlora.errors import SdloraError
from sdlora.families import canonical_name, live_path
from sdlora.mixing import LoraCache, MixEntry, Mixer
from sdlora.routing import Router, choose_mode, use_mixes

TOL = 1e-4


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _mod(comps, path):
    comp = comps[path.split(".")[0]]
    return comp.get_submodule(live_path(comp, path))


def _paths(comps, kind):
    """A few target modules of a kind: 'linear', 'conv' (3x3), 'norm' (GroupNorm/LayerNorm)."""
    out = []
    for comp, model in comps.items():
        for name, m in model.named_modules():
            path = canonical_name(comp, model, name)
            if kind == "linear" and isinstance(m, torch.nn.Linear) and (".to_" in name or "q_proj" in name
                                                                         or "fc1" in name or "proj_in" in name):
                out.append(path)
            elif kind == "conv" and isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and "resnets" in name:
                out.append(path)
            elif kind == "norm" and isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and (
                    "resnets" in name or "transformer_blocks" in name or "layer_norm1" in name):
                out.append(path)
    return out


def _rand(g, *shape, s=0.2):
    return torch.randn(*shape, generator=g) * s


def build(algo: str, comps, seed: int) -> dict:
    """canonical path -> adapter of one algorithm family, shapes taken from the live weights."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    lin, conv = _paths(comps, "linear"), _paths(comps, "conv")
    for path in (lin + conv if algo not in ("norm", "ia3", "oft") else lin if algo != "norm" else _paths(comps, "norm")):
        w = _mod(comps, path).weight
        o, i, k = w.shape[0], w.shape[1] if w.dim() > 1 else 0, tuple(w.shape[2:])
        r = 2 + seed % 3
        if algo == "lora":       # LoRA on linears, LoCon (3x3 down) on convs
            out[path] = LoRA(_rand(g, o, r, *([1, 1] if k else [])), _rand(g, r, i, *k), alpha=r / 2)
        elif algo == "locon_tucker" and k:
            out[path] = LoRA(_rand(g, o, r, 1, 1), _rand(g, r, i, 1, 1), _rand(g, r, r, *k), alpha=1.0)
        elif algo == "lora_modifiers":   # PEFT lora_B.bias, A1111 weight-sized offset, `scale`, diff_b
            out[path] = LoRA(_rand(g, o, r, *([1, 1] if k else [])), _rand(g, r, i, *k), alpha=r,
                             bias=_rand(g, o), offset=_rand(g, *w.shape, s=0.01) if seed % 2 else None,
                             scale_override=0.7 if seed % 2 else None)
            out[path].tensors["diff_b"] = _rand(g, o, s=0.05)
        elif algo == "loha":
            if k and seed % 2:   # CP form
                out[path] = LoHa(_rand(g, r, o), _rand(g, r, i), _rand(g, r, o), _rand(g, r, i),
                                 _rand(g, r, r, *k), _rand(g, r, r, *k), alpha=1.0)
            else:
                n = i * (k[0] * k[1] if k else 1)
                out[path] = LoHa(_rand(g, o, r), _rand(g, r, n), _rand(g, o, r), _rand(g, r, n), alpha=r)
        elif algo == "lokr":
            a, c = 4, 4
            t = {"lokr_w1": _rand(g, a, c)}
            if k:
                t["lokr_w2"] = _rand(g, o // a, i // c, *k)
            else:
                t.update(lokr_w2_a=_rand(g, o // a, r), lokr_w2_b=_rand(g, r, i // c))
            out[path] = LoKr(t, alpha=1.5)
        elif algo == "full":
            out[path] = Full(_rand(g, *w.shape, s=0.02), _rand(g, o, s=0.05))
        elif algo == "norm":
            out[path] = Full(_rand(g, o, s=0.1), _rand(g, o, s=0.1), algorithm="norm")
        elif algo == "ia3":
            on_input = bool(len(out) % 2)
            out[path] = IA3(_rand(g, i if on_input else o, s=0.3), on_input)
        elif algo == "oft":
            bs = 4 if o % 4 == 0 else 1
            out[path] = OFT(_rand(g, o // bs, bs, bs, s=0.1), alpha=1e-3 if seed % 2 else None)
        elif algo == "dora":
            inner = LoRA(_rand(g, o, r, *([1, 1] if k else [])), _rand(g, r, i, *k), alpha=r)
            out[path] = DoRA(inner, w.detach().flatten(1).norm(dim=1) * (1 + _rand(g, o, s=0.1)), axis="out") \
                if seed % 2 else DoRA(inner, w.detach().transpose(0, 1).flatten(1).norm(dim=1)[None]
                                      * (1 + _rand(g, i, s=0.1)[None]), axis="in")
    return out


ALGOS = ["lora", "locon_tucker", "lora_modifiers", "loha", "lokr", "full", "norm", "ia3", "oft", "dora"]


def probe(comps, n, seed=1):
    """n samples of UNet inputs and text-encoder token ids (fixed random)."""
    g = torch.Generator().manual_seed(seed)
    cfg = comps["unet"].config
    x = torch.randn(n, cfg.in_channels, 8, 8, generator=g)
    t = torch.randint(1, 999, (n,), generator=g)
    ctx = torch.randn(n, 5, cfg.cross_attention_dim, generator=g)
    kw = {}
    if cfg.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(n, comps["text_encoder_2"].config.projection_dim, generator=g),
                                   "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * n)}
    ids = torch.randint(3, 999, (n, 7), generator=g)
    return x, t, ctx, kw, ids


def rows(inputs, idx):
    x, t, ctx, kw, ids = inputs
    kw = {"added_cond_kwargs": {k: v[idx] for k, v in kw["added_cond_kwargs"].items()}} if kw else {}
    return x[idx], t[idx], ctx[idx], kw, ids[idx]


def outputs(comps, inputs):
    x, t, ctx, kw, ids = inputs
    with torch.no_grad():
        out = {"unet": comps["unet"](x, t, ctx, **kw).sample}
        for te in ("text_encoder", "text_encoder_2"):
            if te in comps:
                out[te] = comps[te](ids, output_hidden_states=True).hidden_states[-1]
    return out


def patched_per_sample(comps, mixes, inputs, n_rows):
    """Reference: for each sample, patch its mix and run its rows (r ≡ i mod len(mixes))."""
    mixer, got = Mixer(comps, cache=LoraCache()), {}
    for i, mix in enumerate(mixes):
        idx = torch.arange(i, n_rows, len(mixes))
        mixer.apply(mix)
        for k, v in outputs(comps, rows(inputs, idx)).items():
            got.setdefault(k, torch.zeros(n_rows, *v.shape[1:]))[idx] = v
    mixer.restore()
    return got


def hooks(comps) -> dict:
    """Every module's forward (pre-)hooks, by name (transformers installs its own output-capturing
    hooks on the first call; they must stay as they were)."""
    return {(c, n): (tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values()))
            for c, model in comps.items() for n, m in model.named_modules()}


def assert_clean(comps, before, hooks_before):
    """Nothing left behind: same state_dict bit for bit, hooks as before, forward is the class's."""
    after = state(comps)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert hooks(comps) == hooks_before
    for model in comps.values():
        for m in model.modules():
            assert "forward" not in m.__dict__
            assert not any(getattr(h, "__module__", "") == "sdlora.routing"
                           for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))


def _mixes(comps, family, algo):
    a = lora_file(build(algo, comps, seed=1), family)
    b = lora_file(build(algo, comps, seed=2), family)
    return a, b, [[MixEntry(a, unet=0.8, text_encoder=0.5)],
                  [MixEntry(a, unet=-0.6, text_encoder=1.0), MixEntry(b, unet=1.1, text_encoder=-0.4)],
                  [MixEntry(b, unet=0.9, text_encoder=0.9, blocks="OUTD")]]


@pytest.mark.parametrize("algo", ALGOS)
def test_routed_equals_patched_per_algorithm(algo):
    """Each algorithm family on the tiny SD1 model: 3 samples with 3 mixes (CFG-doubled batch of 6)
    equal three patched runs, and one mix routed over a whole batch equals that mix patched."""
    comps = components("sd1")
    before = state(comps)
    a, b, mixes = _mixes(comps, "sd1", algo)
    inputs = probe(comps, 6)
    want = patched_per_sample(comps, mixes, inputs, 6)
    hb = hooks(comps)
    with Router(comps, mixes, cache=LoraCache()):
        got = outputs(comps, inputs)
    for k in want:
        assert rel(got[k], want[k]) <= TOL, (k, rel(got[k], want[k]))
    base = outputs(comps, inputs)
    assert rel(want["unet"], base["unet"]) > 1e-3   # the mixes do change the output
    single = [mixes[1]]
    want1 = patched_per_sample(comps, single, inputs, 6)
    with Router(comps, single):
        got1 = outputs(comps, inputs)
    for k in want1:
        assert rel(got1[k], want1[k]) <= TOL, (k, rel(got1[k], want1[k]))
    assert_clean(comps, before, hb)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("algo", ["lora", "loha", "dora"])
def test_routed_equals_patched_other_families(family, algo):
    comps = components(family)
    before = state(comps)
    _, _, mixes = _mixes(comps, family, algo)
    inputs = probe(comps, 3)
    want = patched_per_sample(comps, mixes, inputs, 3)
    hb = hooks(comps)
    with Router(comps, mixes):
        got = outputs(comps, inputs)
    for k in want:
        assert rel(got[k], want[k]) <= TOL, (k, rel(got[k], want[k]))
    assert_clean(comps, before, hb)


def test_masked_and_grouped_low_rank_paths_agree_with_patching():
    """An XY grid (same LoRAs, other weights) takes the masked path; unrelated LoRAs the grouped one."""
    comps = components("sd1")
    paths = attention_paths(comps) + _paths(comps, "conv")
    a, b, c = (lora_file(random_lora(comps, paths, seed=s), "sd1") for s in (1, 2, 3))
    grid = [[MixEntry(a, unet=wa, text_encoder=wa), MixEntry(b, unet=wb, text_encoder=wb)]
            for wa in (-0.5, 0.5, 1.0) for wb in (0.0, 0.7, 1.4)]
    apart = [[MixEntry(a)], [MixEntry(b, unet=0.5)], [MixEntry(c, unet=-1.0)], []]
    for mixes, masked in ((grid, True), (apart, False)):
        inputs = probe(comps, 2 * len(mixes))
        want = patched_per_sample(comps, mixes, inputs, 2 * len(mixes))
        with Router(comps, mixes) as router:
            assert any(r.table is not None for r in router.routes.values()) == masked
            got = outputs(comps, inputs)
        for k in want:
            assert rel(got[k], want[k]) <= TOL, (k, rel(got[k], want[k]))


def test_files_per_component_multipliers_and_set_mixes(tmp_path):
    """LoRA files through the cache (read once), UNet/TE multipliers, changing mixes while installed."""
    comps = components("sd1")
    before = state(comps)
    paths = attention_paths(comps)
    f0 = write(tmp_path / "a.safetensors", random_lora(comps, paths, seed=4), "sd1")
    f1 = write(tmp_path / "b.safetensors", random_lora(comps, paths[::3], seed=5), "sd1")
    cache = LoraCache()
    first = [[MixEntry(f0, unet=1.0, text_encoder=0.0)], [MixEntry(f1, unet=0.0, text_encoder=1.0)]]
    second = [[MixEntry(f1, unet=0.3)], [MixEntry(f0, unet=-1.0, text_encoder=0.2), MixEntry(f1)]]
    inputs = probe(comps, 4)
    outputs(comps, inputs)
    hb = hooks(comps)
    with Router(comps, first, cache=cache) as router:
        got1 = outputs(comps, inputs)
        router.set_mixes(second)
        got2 = outputs(comps, inputs)
    assert cache.reads == 2
    for got, mixes in ((got1, first), (got2, second)):
        want = patched_per_sample(comps, mixes, inputs, 4)
        for k in want:
            assert rel(got[k], want[k]) <= TOL, (k, rel(got[k], want[k]))
    assert_clean(comps, before, hb)


def test_use_mixes_says_which_path_and_leaves_no_routing():
    comps = components("sd1")
    a = lora_file(random_lora(comps, attention_paths(comps), seed=1), "sd1")
    same = [[MixEntry(a, unet=0.5)]] * 3
    different = [[MixEntry(a, unet=0.5)], []]
    assert choose_mode(same) == "patched" and choose_mode(different) == "routed"
    assert choose_mode(same, "route") == "routed"
    with pytest.raises(SdloraError, match="different mixes"):
        choose_mode(different, "patch")
    inputs = probe(comps, 4)
    outputs(comps, inputs)
    hb = hooks(comps)
    with use_mixes(comps, same) as how:
        assert how == "patched"
        patched = outputs(comps, inputs)["unet"]
    # the patched mix stays in the weights (as generate always did); routing restores it first
    with use_mixes(comps, different) as how:
        assert how == "routed"
        routed = outputs(comps, inputs)["unet"]
    base = outputs(comps, inputs)["unet"]
    assert rel(routed[0::2], patched[0::2]) <= TOL and rel(routed[1::2], base[1::2]) <= TOL
    with use_mixes(comps, [[]]):
        pass
    assert_clean(comps, state(components("sd1")), hb)


def test_batch_not_a_multiple_of_the_samples_is_refused():
    comps = components("sd1")
    a = lora_file(random_lora(comps, attention_paths(comps), seed=1), "sd1")
    x, t, ctx, kw, ids = probe(comps, 3)
    with Router(comps, [[MixEntry(a)], []]), pytest.raises(SdloraError, match="cannot be split"):
        with torch.no_grad():
            comps["unet"](x, t, ctx)
    assert not any(m._forward_hooks for m in comps["unet"].modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_routed_close_to_patched():
    comps = {k: v.to("cuda", torch.float16) for k, v in components("sd1").items()}
    _, _, mixes = _mixes(components("sd1"), "sd1", "lora")
    x, t, ctx, kw, ids = probe(comps, 6)
    inputs = (x.cuda().half(), t.cuda(), ctx.cuda().half(), kw, ids.cuda())
    mixer, want = Mixer(comps), torch.zeros(6, 4, 8, 8, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        for i, mix in enumerate(mixes):
            idx = torch.tensor([i, i + 3], device="cuda")
            mixer.apply(mix)
            want[idx] = comps["unet"](*rows(inputs, idx)[:3]).sample
        mixer.restore()
        with Router(comps, mixes):
            got = comps["unet"](*inputs[:3]).sample
    assert rel(got.float(), want.float()) < 1e-2
