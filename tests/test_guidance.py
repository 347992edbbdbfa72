"""CFG that stops below a sigma (A1111's NGMS, sdlora.guidance.guidance_kwargs) against a hand-written sampling loop."""
import numpy as np
import pytest
import torch

from sdlora.guidance import guidance_kwargs, sigmas_of
from tiny import tiny_pipeline


def _euler(pipe):
    from diffusers import EulerDiscreteScheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_batches(pipe):
    """Record the batch size of every UNet call."""
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


@torch.no_grad()
def test_matches_a_hand_written_loop():
    """The sampling loop written out: CFG (uncond + w (cond - uncond)) while sigma >= s_min_uncond,
    the prompt's prediction alone after, Euler steps; the pipeline with guidance_kwargs must give it."""
    pipe = _euler(tiny_pipeline("sd1", seed=3))
    steps, w, s_min = 6, 5.0, 3.0
    sigmas = sigmas_of(pipe.scheduler, steps)
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] > s_min > sigmas[-1]   # both kinds of step run
    prompts, size = ["a red circle", "a blue square"], 32
    sizes, handle = _unet_batches(pipe)
    got = pipe(prompts, negative_prompt=["blurry"] * 2, num_inference_steps=steps, height=size, width=size,
               generator=torch.Generator().manual_seed(0), output_type="latent",
               **guidance_kwargs(pipe, w, steps, s_min)).images
    handle.remove()
    assert sizes == [4 if s >= s_min else 2 for s in sigmas]        # the uncond branch is not computed

    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, ["blurry"] * 2)
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    x = torch.randn(got.shape, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    for sigma, t in zip(sigmas, sched.timesteps):
        xin = sched.scale_model_input(x, t)
        if sigma >= s_min:
            e_u, e_c = pipe.unet(torch.cat([xin, xin]), t, torch.cat([uncond, cond])).sample.chunk(2)
            eps = e_u + w * (e_c - e_u)
        else:
            eps = pipe.unet(xin, t, cond).sample
        x = sched.step(eps, t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_off_and_always(family):
    """Below every sigma: exactly plain CFG; above the first: exactly CFG scale 1 (one pass per step).
    SDXL's pooled embeddings and time ids are halved with the prompt embeddings."""
    pipe = _euler(tiny_pipeline(family, seed=1))
    steps, kw = 4, dict(height=32, width=32, output_type="latent")
    sigmas = sigmas_of(pipe.scheduler, steps)

    def run(cfg, s_min):
        return pipe(["a cat", "a dog"], num_inference_steps=steps, generator=torch.Generator().manual_seed(2),
                    **kw, **guidance_kwargs(pipe, cfg, steps, s_min)).images

    plain, plain_1 = run(4.0, 0.0), run(1.0, 0.0)
    assert torch.equal(run(4.0, sigmas[-1] / 2), plain)
    assert torch.equal(run(4.0, sigmas[0] * 2), plain_1)
    sizes, handle = _unet_batches(pipe)
    mid = run(4.0, sigmas[1] * 0.999)
    handle.remove()
    assert sizes == [4, 4, 2, 2]
    assert not torch.allclose(mid, plain) and not torch.allclose(mid, plain_1)


def test_step_callback_still_called():
    pipe = _euler(tiny_pipeline("sd1", seed=2))
    seen = []
    chain = lambda p, i, t, tensors: seen.append(i) or {}   # noqa: E731
    pipe("x", num_inference_steps=3, height=32, width=32, output_type="latent",
         **guidance_kwargs(pipe, 3.0, 3, sigmas_of(pipe.scheduler, 3)[1] * 0.5, chain=chain))
    assert seen == [0, 1, 2]   # the progress callback runs on every step, before and after CFG stops


# ---------------------------------------------------------------------------------------------
# through generate: infotext, routing, errors

@pytest.fixture(scope="module")
def embedded():
    from sdlora.pipelines import load_base
    return load_base()


def test_generate_writes_a1111s_ngms(embedded):
    from sdlora.generate import generate
    from sdlora.infotext import parse
    (r,) = generate(embedded, "a red square", seed=4, steps=6, progress=False, s_min_uncond=2.0)
    info = parse(r.infotext)
    assert (info.params["NGMS"], info.params["NGMS all steps"]) == ("2", "True")
    assert info.settings()["s_min_uncond"] == 2.0
    (plain,) = generate(embedded, "a red square", seed=4, steps=6, progress=False)
    assert "NGMS" not in parse(plain.infotext).params
    assert np.abs(np.asarray(r.image, int) - np.asarray(plain.image, int)).max() > 0
    with pytest.raises(ValueError, match="s_min_uncond"):
        generate(embedded, "x", steps=2, progress=False, s_min_uncond=-1)


def test_routed_batch_with_ngms(embedded, tmp_path):
    """Per-image LoRAs route by row (row r -> sample r % B): still right once the batch is halved."""
    from loras import attention_paths, random_lora, write
    from sdlora.generate import generate, generate_prompts
    from sdlora.mixplan import component_configs, components_of
    comps = components_of(embedded.pipe)
    write(tmp_path / "a.safetensors", random_lora(comps, attention_paths(comps), rank=4, seed=1, scale=0.3),
          embedded.family, component_configs(comps))
    prompts = ["a red circle <lora:a:1>", "a blue square"]
    kw = dict(steps=5, progress=False, lora_dir=tmp_path, s_min_uncond=1.0)
    routed = generate_prompts(embedded, prompts, seed=3, **kw)
    assert [r.mode for r in routed] == ["routed", "routed"]
    for i, p in enumerate(prompts):
        (alone,) = generate(embedded, p, seed=3 + i, **kw)
        assert np.abs(np.asarray(routed[i].image, int) - np.asarray(alone.image, int)).max() <= 2, p
