"""generate: A1111 prompt tags, LoRA lookup, samplers, seeds, PNG infotext, the CLI."""
import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdlora.errors import SdloraError
from sdlora.extra_networks import LoraRef, find_lora, parse_lora_arg, parse_prompt, resolve
from sdlora.generate import generate, generate_prompts, lora_hash, save_png
from sdlora.infotext import parse, read_png
from sdlora.samplers import SAMPLERS, make_scheduler, sampler_name


# ---------------------------------------------------------------------------------------------
# prompt tags

@pytest.mark.parametrize("prompt,text,refs", [
    ("a red circle", "a red circle", []),
    ("a red circle <lora:neon:0.8>", "a red circle", [LoraRef("neon", 0.8, 0.8)]),
    ("<lora:neon> a red circle", "a red circle", [LoraRef("neon", 1.0, 1.0)]),
    ("a <lora:a:0.5:1.5>red, <LORA:b:-1> circle", "a red, circle", [LoraRef("a", 0.5, 1.5), LoraRef("b", -1, -1)]),
    ("x, <lora:a:te=0.2:unet=0.7>, y", "x, y", [LoraRef("a", 0.2, 0.7)]),
    ("x <lora:a:unet=0.3>", "x", [LoraRef("a", 1.0, 0.3)]),
    ("x <lyco:my style v2:0.6>", "x", [LoraRef("my style v2", 0.6, 0.6)]),
    ("keep <hypernet:foo:1> and <other>", "keep <hypernet:foo:1> and <other>", []),
])
def test_parse_prompt(prompt, text, refs):
    assert parse_prompt(prompt) == (text, refs)


@pytest.mark.parametrize("bad,match", [("<lora:x:abc>", "not a number"), ("<lora::1>", "no LoRA name"),
                                       ("<lora:x:inf>", "finite"), ("<lora:x:1:2:3:4>", "too many"),
                                       ("<lora:x:foo=1>", "unknown option")])
def test_parse_prompt_errors(bad, match):
    with pytest.raises(SdloraError, match=match):
        parse_prompt(f"a {bad}")


def test_lora_tag_round_trip():
    for ref in (LoraRef("n", 0.5, 0.5), LoraRef("n", 0.25, 1.0)):
        assert parse_prompt(ref.tag)[1] == [ref]


def _lora_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(path), metadata={"ss_network_dim": "2"})
    return path


def test_lora_arg(tmp_path):
    f = _lora_file(tmp_path / "my:style.safetensors")  # a colon inside the name stays in the path
    assert parse_lora_arg(str(f)) == LoraRef("my:style", 1.0, 1.0, f)
    assert parse_lora_arg(f"{f}:0.5") == LoraRef("my:style", 0.5, 0.5, f)
    assert parse_lora_arg(f"{f}:0.5:-1") == LoraRef("my:style", 0.5, -1.0, f)
    with pytest.raises(FileNotFoundError, match="PATH"):
        parse_lora_arg(str(tmp_path / "nope.safetensors:1"))
    with pytest.raises(SdloraError, match="finite"):
        parse_lora_arg(f"{f}:nan")


def test_lora_lookup(tmp_path):
    a = _lora_file(tmp_path / "sub" / "Neon.safetensors")
    b = _lora_file(tmp_path / "toon.safetensors")
    _lora_file(tmp_path / "legacy.pt")                  # a folder lists .safetensors only (--lora PATH reads .pt)
    assert find_lora("Neon", tmp_path) == a
    assert find_lora("neon", tmp_path) == a           # case-insensitive when unambiguous
    assert resolve([LoraRef("toon", 0.5, 0.5)], tmp_path) == [LoraRef("toon", 0.5, 0.5, b)]
    with pytest.raises(FileNotFoundError, match="Did you mean: Neon"):
        find_lora("Neonn", tmp_path)
    with pytest.raises(FileNotFoundError):
        find_lora("legacy", tmp_path)
    _lora_file(tmp_path / "other" / "Neon.safetensors")
    with pytest.raises(SdloraError, match="several files"):
        find_lora("Neon", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_lora("x", tmp_path / "missing")


def test_lora_hash_is_a1111s(tmp_path):
    f = _lora_file(tmp_path / "a.safetensors")
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert lora_hash(f) == hashlib.sha256(data[8 + n:]).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# samplers

def test_sampler_table(embedded):
    import diffusers
    cfg = embedded.pipe.scheduler.config
    for label, (cls, extra) in SAMPLERS.items():
        s = make_scheduler(label, cfg)
        assert type(s) is getattr(diffusers, cls)
        assert s.config.beta_schedule == cfg.beta_schedule and s.config.prediction_type == cfg.prediction_type
        for k, v in extra.items():
            assert s.config[k] == v
    # the pipeline's config after another sampler gives the same scheduler as the model's own config
    # (it once kept "use_karras_sigmas" from a Karras sampler: "DPM++ 2M" sampled Karras sigmas)
    import inspect

    def public(s):   # the settings the scheduler class takes (a config also keeps ones it ignores)
        own = inspect.signature(type(s).__init__).parameters
        return {k: v for k, v in s.config.items() if k in own}
    fresh = {label: public(make_scheduler(label, cfg)) for label in SAMPLERS}
    for before in SAMPLERS:
        after = make_scheduler(before, cfg).config
        for label in SAMPLERS:
            assert public(make_scheduler(label, after)) == fresh[label], (before, label)
    assert sampler_name("dpm++ 2m karras") == "DPM++ 2M Karras"
    with pytest.raises(ValueError, match="Euler a"):
        sampler_name("nope")


# ---------------------------------------------------------------------------------------------
# generation with the embedded model

@pytest.fixture(scope="module")
def embedded():
    from sdlora.pipelines import load_base
    return load_base()


def _pixels(results):
    return [np.asarray(r.image) for r in results]


def test_seeds_reproduce(embedded):
    kw = dict(steps=4, progress=False)
    a = generate(embedded, "a red circle on a blue background", seed=7, batch=2, **kw)
    b = generate(embedded, "a red circle on a blue background", seed=7, batch=2, **kw)
    c = generate(embedded, "a red circle on a blue background", seed=8, **kw)
    assert [r.seed for r in a] == [7, 8]
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))       # exact, same device
    assert not np.array_equal(_pixels(a)[0], _pixels(a)[1])
    # image i of a batch is the image of seed + i (up to float batching noise)
    assert np.abs(_pixels(a)[1].astype(int) - _pixels(c)[0].astype(int)).max() <= 2
    for x in _pixels(a):
        assert x.shape == (64, 64, 3) and x.std() > 5


def test_ancestral_sampler_reproduces(embedded):
    a = generate(embedded, "a green square", seed=3, steps=4, sampler="Euler a", progress=False)
    b = generate(embedded, "a green square", seed=3, steps=4, sampler="Euler a", progress=False)
    assert np.array_equal(_pixels(a)[0], _pixels(b)[0])


def test_infotext_and_png(embedded, tmp_path):
    (r,) = generate(embedded, "a red circle", negative="blurry", seed=5, steps=3, cfg=5.5, sampler="Euler a",
                    progress=False)
    info = parse(r.infotext)
    assert info.prompt == "a red circle" and info.negative_prompt == "blurry"
    assert info.settings() == {"prompt": "a red circle", "negative": "blurry", "steps": 3, "cfg": 5.5, "seed": 5,
                               "sampler": "Euler a", "width": 64, "height": 64}
    assert info.params["Model"] == "tiny-sd" and info.params["Model hash"] == embedded.hash
    p1, p2 = save_png(r, tmp_path), save_png(r, tmp_path)
    assert (p1.name, p2.name) == ("00000-5.png", "00001-5.png")
    assert read_png(p1) == info
    assert not list(tmp_path.glob("*.tmp"))


def test_cli(tmp_path, capsys):
    from sdlora.cli import main
    out = tmp_path / "out"
    assert main(["generate", "a blue triangle", "--seed", "11", "--steps", "3", "--batch", "2",
                 "--sampler", "Euler", "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-11.png", "00001-12.png"]
    assert read_png(files[1]).settings()["seed"] == 12
    # bad input: one clear line, nothing loaded, nothing written
    assert main(["generate", "x <lora:missing:1>", "--loras", str(tmp_path), "--out", str(out)]) == 2
    assert "no .safetensors" in capsys.readouterr().err
    assert main(["generate", "x", "--sampler", "Bogus", "--out", str(out)]) == 2
    assert main(["generate", "x", "--s-min-uncond", "-1", "--out", str(out)]) == 2
    assert "s_min_uncond must be a sigma >= 0" in capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 2


# ---------------------------------------------------------------------------------------------
# several prompts, each with its own LoRAs: one routed batch

@pytest.fixture(scope="module")
def two_loras(embedded, tmp_path_factory):
    from loras import attention_paths, random_lora, write
    from sdlora.mixplan import component_configs, components_of
    comps = components_of(embedded.pipe)
    folder = tmp_path_factory.mktemp("loras")
    configs = component_configs(comps)
    for name, seed in (("a", 1), ("b", 2)):
        write(folder / f"{name}.safetensors", random_lora(comps, attention_paths(comps), rank=4, seed=seed, scale=0.3),
              embedded.family, configs)
    return folder


def test_prompts_with_own_loras_are_one_routed_batch(embedded, two_loras):
    prompts = ["a red circle <lora:a:0.8>", "a blue square <lora:b:1>", "a green ring <lora:a:-0.5> <lora:b:0.5>",
               "a yellow star"]
    kw = dict(steps=3, progress=False, lora_dir=two_loras)
    routed = generate_prompts(embedded, prompts, seed=3, **kw)
    assert [r.mode for r in routed] == ["routed"] * 4 and [r.seed for r in routed] == [3, 4, 5, 6]
    ha, hb = lora_hash(two_loras / "a.safetensors"), lora_hash(two_loras / "b.safetensors")
    assert [parse(r.infotext).lora_hashes for r in routed] == [{"a": ha}, {"b": hb}, {"a": ha, "b": hb}, {}]
    assert [parse(r.infotext).prompt for r in routed] == prompts
    for i, p in enumerate(prompts):   # each image as its prompt alone, patched
        (alone,) = generate(embedded, p, seed=3 + i, **kw)
        assert alone.mode == "patched"
        assert np.abs(_pixels(routed)[i].astype(int) - _pixels([alone])[0].astype(int)).max() <= 2, p
    plain = generate(embedded, "a red circle", seed=3, **kw)
    assert np.abs(_pixels(routed)[0].astype(int) - _pixels(plain)[0].astype(int)).max() > 10  # the LoRA shows


def test_prompts_sharing_one_mix_are_patched(embedded, two_loras):
    rs = generate_prompts(embedded, ["x <lora:a:0.5>", "y <lora:a:0.5>"], seed=1, steps=2, progress=False,
                          lora_dir=two_loras)
    assert [r.mode for r in rs] == ["patched", "patched"]
    forced = generate_prompts(embedded, ["x <lora:a:0.5>", "y <lora:a:0.5>"], seed=1, steps=2, progress=False,
                              lora_dir=two_loras, mode="route")
    assert [r.mode for r in forced] == ["routed", "routed"]
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 2 for a, b in zip(_pixels(rs), _pixels(forced)))


def test_cli_several_prompts(tmp_path, capsys, two_loras):
    from sdlora.cli import main
    out = tmp_path / "out"
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("a green square <lora:b:0.7>\n\n  a red dot  \n")
    assert main(["generate", "--prompt", "a blue triangle <lora:a:1>", "--prompts", str(pfile), "--seed", "11",
                 "--steps", "2", "--loras", str(two_loras), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "LoRA mix: routed (3 mixes routed per image over 3 images in one batch)" in text
    files = sorted(out.glob("*.png"))
    infos = [read_png(f) for f in files]
    assert [i.prompt for i in infos] == ["a blue triangle <lora:a:1>", "a green square <lora:b:0.7>", "a red dot"]
    assert [sorted(i.lora_hashes) for i in infos] == [["a"], ["b"], []]
    assert main(["generate", "--prompts", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
    assert "--prompts" in capsys.readouterr().err
    assert main(["generate", "--out", str(out)]) == 2
