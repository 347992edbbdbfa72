"""The training loop on tiny models: round trip through diffusers, resume, control, NaN, bad input."""
import copy
import hashlib
import json
import os
import shlex
import stat
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.errors import FamilyMismatchError, SdloraError
from sdlora.mixing import MixEntry, Mixer
from sdlora.training import Trainer, TrainingCallbacks, TrainingControl, TrainingError, train
from tiny import probe_outputs, tiny_pipeline
from trainkit import ctrl_c_at, make_folder, tiny_cfg


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_trained_lora_loads_in_diffusers_and_sdlora_like_the_live_network(tmp_path, family):
    pipe = tiny_pipeline(family)
    before = probe_outputs(pipe)
    cfg = tiny_cfg(tmp_path, steps=3, train_text_encoder=True, unet_targets=["attn", "proj", "ff"],
                   text_targets=["attn", "mlp"])
    trainer = Trainer(cfg, base=pipe)
    trainer.prepare()
    result = trainer.run()
    trainer.network.eval()
    live = probe_outputs(pipe)                       # the trainer's network is still hooked in
    fresh = tiny_pipeline(family)
    fresh.load_lora_weights(str(result.output))
    theirs = probe_outputs(fresh)
    ours_pipe = tiny_pipeline(family)                # sdlora's own loader + weight patching
    Mixer(ours_pipe).apply([MixEntry(str(result.output))])
    ours = probe_outputs(ours_pipe)
    for comp in live:
        assert (live[comp] - before[comp]).abs().max() > 1e-4, comp
        torch.testing.assert_close(theirs[comp], live[comp], rtol=1e-4, atol=1e-5, msg=comp)
        torch.testing.assert_close(ours[comp], live[comp], rtol=1e-4, atol=1e-5, msg=comp)
    keys = set(load_file(result.output))
    if family == "sd1":
        expected = ["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                    "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha",
                    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
                    "lora_unet_up_blocks_3_attentions_2_proj_out.lora_down.weight"]
    else:
        expected = ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                    "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight",
                    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha",
                    "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2.lora_down.weight"]
    for k in expected:
        assert k in keys, k


def _equal_files(a, b):
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


RESUME_OPTS = dict(steps=6, batch_size=2, grad_accum=2, lr_scheduler="cosine", lr_warmup_steps=2, dropout=0.2,
                   random_flip=True, shuffle_caption=True, keep_tokens=1, caption_dropout=0.25, noise_offset=0.05,
                   min_snr_gamma=5.0, trigger="zzt", train_text_encoder=True)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    full = train(tiny_cfg(tmp_path, "full", **RESUME_OPTS), base=tiny_pipeline("sd1"))
    assert full.status == "done"

    cfg = tiny_cfg(tmp_path, "cut", **RESUME_OPTS)
    cut = train(cfg, callbacks=ctrl_c_at(3), base=tiny_pipeline("sd1"))
    assert cut.status == "interrupted" and cut.step == 3 and cut.checkpoint.name == "step-000003"
    assert not Path(cfg.output).exists()                       # only the checkpoint was written
    resumed = train(cfg.replace(resume=str(cut.checkpoint.parent)), base=tiny_pipeline("sd1"))
    assert resumed.status == "done" and resumed.step == 6
    _equal_files(full.output, resumed.output)


def test_ctrl_c_prints_one_resume_command_that_finishes_the_run(tmp_path, capsys, monkeypatch):
    from sdlora.cli import main
    from sdlora.training import cli as train_cli
    from tiny import save_tiny_pipeline
    monkeypatch.chdir(tmp_path)
    save_tiny_pipeline(tmp_path / "base", "sd1")
    make_folder(tmp_path / "imgs", n=4)
    # the run's own options (a 32 px run: the default 512 px would reject these images)
    opts = ["--base", "base", "--resolution", "32", "--steps", "6", "--batch-size", "2", "--rank", "4",
            "--unet-lr", "1e-2", "--lr-scheduler", "cosine", "--lr-warmup-steps", "2", "--trigger", "zzt",
            "--seed", "0", "--device", "cpu", "--save-precision", "fp32", "--sample-steps", "2"]
    assert main(["train", "imgs", "--out", "loras/full.safetensors", *opts]) == 0
    orig = train_cli.CliProgress.on_progress

    def ctrl_c(self, p):
        orig(self, p)
        if p.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_cli.CliProgress, "on_progress", ctrl_c)
    capsys.readouterr()
    assert main(["train", "imgs", "--out", "loras/cut.safetensors", *opts]) == 130
    text = capsys.readouterr()
    monkeypatch.setattr(train_cli.CliProgress, "on_progress", orig)
    assert (text.out + text.err).count("--resume") == 1                 # one command, printed once
    command = text.out.split("continue with: ", 1)[1].splitlines()[0]
    argv = shlex.split(command)
    assert argv[:3] == ["sdlora", "train", "--resume"] and len(argv) == 4
    assert Path(argv[3]).name == "step-000003" and Path(argv[3]).is_relative_to(tmp_path / "checkpoints" / "cut")

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")           # the stored config has absolute paths
    # options that contradict the checkpoint are refused, each listed; equal ones are fine
    assert main(argv[1:] + ["--steps", "8", "--rank", "4", "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert "--steps: checkpoint 6, given 8" in err and "--resolution: checkpoint 32, given 64" in err
    assert "--rank" not in err
    assert main(argv[1:]) == 0                           # the printed command, as printed
    text = capsys.readouterr().out
    assert "at step 3" in text and "LoRA written" in text
    full, cut = load_file(tmp_path / "loras" / "full.safetensors"), load_file(tmp_path / "loras" / "cut.safetensors")
    assert full.keys() == cut.keys()
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=1e-4, atol=1e-6, msg=k)
    with safe_open(tmp_path / "loras" / "cut.safetensors", "pt") as f:
        assert f.metadata()["ss_steps"] == "6" and f.metadata()["ss_output_name"] == "cut"


def test_checkpoints_leave_the_lora_folder_alone_get_normal_modes_and_leftovers_are_tidied(tmp_path, monkeypatch):
    from sdlora.training.checkpoint import list_checkpoints
    monkeypatch.chdir(tmp_path)
    old_umask = os.umask(0o022)
    try:
        cfg = tiny_cfg(tmp_path, "neon", steps=3, save_every=1, checkpoint_dir="",
                       output=str(tmp_path / "loras" / "neon.safetensors"))
        cut = train(cfg, callbacks=ctrl_c_at(2), base=tiny_pipeline("sd1"))
        root = tmp_path / "checkpoints" / "neon"                  # the default: ./checkpoints/NAME
        assert cut.checkpoint == root / "step-000002"
        assert [p.name for p in list_checkpoints(root)] == ["step-000001", "step-000002"]
        assert not (tmp_path / "loras").exists() or list((tmp_path / "loras").iterdir()) == []
        for p in [root, *root.rglob("*")]:
            assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p
        state = json.loads((root / "step-000002" / "state.json").read_text())
        assert state["config"]["checkpoint_dir"] == str(root) and state["config"]["output"] == cfg.output
        assert [s for s, _, _ in state["losses"]] == [1, 2]

        # what killed writes leave: a half-written folder, and a swap that died after moving the
        # last good checkpoint aside (it must come back, not be deleted)
        half = root / ".step-000003.123-abcdef01"
        half.mkdir()
        (half / "optimizer.pt").write_bytes(b"partial")
        (root / ".step-000002.old.xyz").mkdir()
        os.rename(root / "step-000002", root / ".step-000002.old.xyz" / "old")
        seen = {}

        class Resumed(TrainingCallbacks):
            def on_resume(self, step, losses):
                seen.update(step=step, losses=losses)

        res = train(cfg.replace(resume=str(root)), callbacks=Resumed(), base=tiny_pipeline("sd1"))
        assert res.status == "done" and seen["step"] == 2 and [s for s, _, _ in seen["losses"]] == [1, 2]
        assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002", "step-000003"]
        loras = tmp_path / "loras"
        assert sorted(p.name for p in loras.iterdir()) == ["neon.preview.png", "neon.safetensors"]
        assert stat.S_IMODE((loras / "neon.preview.png").stat().st_mode) == 0o644
        from PIL import Image
        assert Image.open(loras / "neon.preview.png").size == (32, 32)
    finally:
        os.umask(old_umask)


def test_control_stop_save_and_sample_then_resume(tmp_path):
    control = TrainingControl()
    events = []

    class UI(TrainingCallbacks):
        def on_status(self, status, message):
            events.append(status)

        def on_progress(self, p):
            assert p.total_steps == 6 and p.loss > 0 and p.steps_per_s > 0
            if p.step == 1:
                control.request_save()
                control.request_sample()
            if p.step == 2:
                control.request_stop()

        def on_sample(self, step, images, paths):
            events.append(("sample", step, images[0].size, [p.exists() for p in paths]))

    cfg = tiny_cfg(tmp_path, "ctl", **RESUME_OPTS)
    res = train(cfg, callbacks=UI(), control=control, base=tiny_pipeline("sd1"))
    assert res.status == "stopped" and res.step == 2
    assert ("sample", 1, (32, 32), [True]) in events
    assert events[:2] == ["scanning", "loading"] and events[-1] == "stopped" and "checkpoint" in events
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints" / "ctl").glob("step-*"))
    assert ckpts == ["step-000001", "step-000002"]
    with safe_open(res.output, "pt") as f:
        assert f.metadata()["ss_steps"] == "2" and f.metadata()["ss_max_train_steps"] == "6"
    # a stopped run resumes to the uninterrupted result too
    resumed = train(cfg.replace(resume=str(res.checkpoint)), base=tiny_pipeline("sd1"))
    full = train(tiny_cfg(tmp_path, "full", **RESUME_OPTS), base=tiny_pipeline("sd1"))
    _equal_files(full.output, resumed.output)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    holder = {}

    class Poison(TrainingCallbacks):
        def on_checkpoint(self, step, path):
            if step == 2:        # after the step-2 checkpoint is safely written, break the weights
                with torch.no_grad():
                    next(iter(holder["t"].network.parameters())).fill_(float("nan"))

    cfg = tiny_cfg(tmp_path, steps=5, save_every=1)
    t = holder["t"] = Trainer(cfg, callbacks=Poison(), base=tiny_pipeline("sd1"))
    t.prepare()
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*last good checkpoint is .*step-000002"):
        t.run()
    root = tmp_path / "checkpoints" / "lora"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002"]
    good = load_file(root / "step-000002" / "lora-step000002.safetensors")
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not Path(cfg.output).exists()


def test_fp16_vae_nan_latents_are_detected_and_upcast():
    from sdlora.training.cache import VaeEncoder
    pipe = tiny_pipeline("sd1")
    vae = pipe.vae
    with torch.no_grad():
        vae.encoder.conv_in.weight.fill_(6e4)     # an fp16 weight whose activations exceed 65504
    vae.half()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = VaeEncoder(copy.deepcopy(vae).float())(pixels, [1, 2])      # the same (fp16-rounded) weights in fp32
    assert torch.isfinite(ref).all()
    with torch.no_grad():
        assert not torch.isfinite(vae.encode(pixels.half()).latent_dist.mean).all()
    seen = []
    enc = VaeEncoder(vae, warn=seen.append)
    got = enc(pixels, [1, 2])
    assert enc.upcast and vae.dtype == torch.float32 and len(seen) == 1 and "upcasting" in seen[0]
    torch.testing.assert_close(got, ref)


def test_cli_end_to_end_plan_metadata_and_hashes(tmp_path, capsys, monkeypatch):
    from sdlora.cli import main
    monkeypatch.chdir(tmp_path)        # checkpoints default to ./checkpoints/NAME
    from tiny import save_tiny_pipeline
    save_tiny_pipeline(tmp_path / "base", "sd1")
    data = make_folder(tmp_path / "imgs" / "3_zzt style", n=3)
    (data / "img0.txt").unlink()
    (data / "img1.txt").rename(data / "img1.caption")
    out = tmp_path / "out" / "style.safetensors"
    rc = main(["train", str(tmp_path / "imgs"), "--out", str(out), "--base", str(tmp_path / "base"), "--trigger", "zzt",
               "--resolution", "32", "--steps", "3", "--rank", "4", "--sample-every", "3", "--sample-steps", "2",
               "--save-precision", "fp16"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "3_zzt style: 3 images x 3 repeats, 2 caption files" in text.out
    assert "captions: 2 from files, 1 from trigger/class word" in text.out
    assert "buckets: 32x32: 3" in text.out and "total: 3 optimizer steps = 1 epoch(s)" in text.out
    assert f"try it: sdlora generate zzt --base {tmp_path / 'base'} --lora {out}:1" in text.out
    assert (tmp_path / "checkpoints" / "style" / "samples" / "step-000003-00.png").exists()
    # the LoRA folder holds the LoRA and its card image, nothing else (checkpoints live elsewhere)
    assert sorted(p.name for p in out.parent.iterdir()) == ["style.preview.png", "style.safetensors"]
    with safe_open(out, "pt") as f:
        md = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_base_model_version"] == "sd_v1" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["ss_steps"] == "3" and md["ss_output_name"] == "style" and md["ss_num_train_images"] == "9"
    assert json.loads(md["ss_dataset_dirs"]) == {"3_zzt style": {"n_repeats": 3, "img_count": 3}}
    freq = json.loads(md["ss_tag_frequency"])["3_zzt style"]
    assert freq == {"zzt": 3, "noise": 2, "a green square": 1, "a blue square": 1}   # img0 has no caption: "zzt"
    assert float(md["ss_training_finished_at"]) >= float(md["ss_training_started_at"])
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()   # kohya: bytes after the header
    assert md["sshs_legacy_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]  # (< 1 MiB: empty)


def test_addnet_hashes_follow_kohyas_definition():
    import safetensors.torch
    from sdlora.training.metadata import addnet_hashes
    tensors = {"a": torch.arange(400_000, dtype=torch.float32).reshape(400, 1000)}   # 1.6 MB: legacy hash is real
    md = {"ss_x": "1", "modelspec.title": "t"}
    data = safetensors.torch.save(tensors, {"ss_x": "1"})
    n = int.from_bytes(data[:8], "little")
    assert addnet_hashes(tensors, md) == (hashlib.sha256(data[8 + n:]).hexdigest(),
                                          hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8])
    assert addnet_hashes(tensors, dict(md, **{"modelspec.title": "other"})) == addnet_hashes(tensors, md)


def test_v_prediction_sd2_and_prior_preservation(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=2, prior_preservation=True, class_word="painting", num_class_images=2,
                   min_snr_gamma=5.0, cache_latents="disk")
    trainer = Trainer(cfg, base=tiny_pipeline("sd2", prediction_type="v_prediction"))
    plan = trainer.prepare()
    class_dir = tmp_path / "out" / "lora-class-images"
    assert len(list(class_dir.glob("*.png"))) == 2 and plan.reg_images == 2
    assert "class images x 1 repeats" in plan.describe() and plan.batches_per_epoch == 4   # 4 train + 4 class
    res = trainer.run()
    assert trainer.prediction_type == "v_prediction"
    with safe_open(res.output, "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "sd_v2_v" and md["modelspec.prediction_type"] == "v"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and md["ss_num_reg_images"] == "2"
    cached = sorted((tmp_path / "out" / "lora-cache").glob("*.safetensors"))
    assert len(cached) == 6                              # 4 training + 2 class images, one latent each
    again = Trainer(cfg.replace(output=str(tmp_path / "out" / "again.safetensors"),
                                cache_dir=str(tmp_path / "out" / "lora-cache"), class_data_dir=str(class_dir)),
                    base=tiny_pipeline("sd2", prediction_type="v_prediction"))
    again.prepare()
    again.base.pipe.vae.encode = None                    # a second run reads the disk cache: no VAE call
    assert again.run().status == "done"


def test_loss_targets_and_min_snr_against_formulas():
    from diffusers import DDPMScheduler
    from sdlora.training import loss as L
    from sdlora.training.config import TrainConfig
    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x, n, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0, 500, 999])
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(L.target(s, "v_prediction", x, n, t), ab.sqrt() * n - (1 - ab).sqrt() * x)
    assert L.target(s, "epsilon", x, n, t) is n
    snr = (ab / (1 - ab)).flatten()
    torch.testing.assert_close(L.min_snr_weights(s.alphas_cumprod, t, 5.0, "epsilon"), snr.clamp(max=5) / snr)
    torch.testing.assert_close(L.min_snr_weights(s.alphas_cumprod, t, 5.0, "v_prediction"), snr.clamp(max=5) / (snr + 1))
    g = torch.Generator().manual_seed(0)
    a = L.draw_noise((2, 4, 3, 3), g, 0.1)
    g = torch.Generator().manual_seed(0)
    b = torch.randn((2, 4, 3, 3), generator=g)
    torch.testing.assert_close(a - b, (0.1 * torch.randn((2, 4, 1, 1), generator=g)).expand_as(a))

    g = torch.Generator().manual_seed(0)
    t = L.draw_timesteps(4000, 1000, g, 100, 600)
    assert int(t.min()) == 100 and int(t.max()) == 599          # kohya's [min_timestep, max_timestep)
    g, h = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(L.draw_timesteps(64, 1000, g), torch.randint(0, 1000, (64,), generator=h))
    with pytest.raises(SdloraError, match="min_timestep 600 must be below max_timestep 600"):
        TrainConfig(min_timestep=600, max_timestep=600).validate()


# --- bad input: one clear error, nothing written ---------------------------------------------------

def test_wrong_family_is_refused_before_writing(tmp_path):
    (tmp_path / "kept").mkdir()
    cfg = tiny_cfg(tmp_path, family="sdxl", output=str(tmp_path / "kept" / "new" / "sub" / "x.safetensors"))
    with pytest.raises(FamilyMismatchError, match=r"SD1.x \(sd1\).*expects SDXL \(sdxl\)"):
        train(cfg, base=tiny_pipeline("sd1"))
    # the folders the run created for its output are gone again; the one that was there stays
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_unwritable_output_fails_first(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(SdloraError, match="cannot write the LoRA to"):
        Trainer(tiny_cfg(tmp_path, output=str(tmp_path / "blocker" / "x.safetensors"))).prepare()
    with pytest.raises(SdloraError, match=r"written as \.safetensors"):
        Trainer(tiny_cfg(tmp_path, output=str(tmp_path / "x.pt"))).prepare()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "data"]


def test_corrupt_and_non_image_files_one_warning_then_training(tmp_path):
    data = make_folder(tmp_path / "data", n=4)
    (data / "broken.png").write_bytes(b"not a png")
    (data / "small.png").write_bytes((data / "img0.png").read_bytes())
    from PIL import Image
    Image.new("RGB", (4, 4)).save(data / "small.png")
    (data / "notes.json").write_text("{}")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = train(tiny_cfg(tmp_path, steps=2, crop="random", cache_latents="none", random_flip=True),
                    base=tiny_pipeline("sd1"))          # (also the uncached path: encode every step)
    msgs = [str(x.message) for x in w if "skipped" in str(x.message)]
    assert len(msgs) == 1 and "broken.png: unreadable" in msgs[0] and "small.png: too small" in msgs[0]
    assert res.status == "done"


def test_cli_reports_empty_folder_in_one_line(tmp_path, capsys):
    from sdlora.cli import main
    (tmp_path / "empty").mkdir()
    rc = main(["train", str(tmp_path / "empty"), "--out", str(tmp_path / "o" / "x.safetensors"), "--base", "unused"])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable training images" in err and "it is empty" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "x.safetensors").exists()


def test_bf16_weights_gradient_checkpointing_and_webp(tmp_path):
    from PIL import Image
    data = make_folder(tmp_path / "data", n=2)
    Image.open(data / "img0.png").save(data / "img9.webp")        # webp is read like png/jpg
    cfg = tiny_cfg(tmp_path, steps=2, mixed_precision="bf16", gradient_checkpointing=True, train_text_encoder=True)
    trainer = Trainer(cfg, base=tiny_pipeline("sd1"))
    plan = trainer.prepare()
    assert plan.train_images == 3
    res = trainer.run()
    unet = trainer.base.pipe.unet
    assert unet.dtype == torch.bfloat16 and unet.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in trainer.network.parameters())
    assert res.status == "done" and res.loss == res.loss                # finite, not NaN
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for k, v in load_file(res.output).items()
               if "lora_down" in k)


def test_resolution_zero_is_the_base_models_native_size(tmp_path):
    data = make_folder(tmp_path / "data", n=2)
    pipe = tiny_pipeline("sd1")
    native = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)   # the formula
    trainer = Trainer(tiny_cfg(tmp_path, steps=1, resolution=0, buckets=False), base=pipe)
    plan = trainer.prepare()
    assert trainer.resolution == native and trainer.cfg.resolution == native
    assert plan.resolution == f"{native} px (the base model's native size)"
    assert f"resolution: {native} px (the base model's native size)" in plan.describe()
    assert set(plan.buckets) == {(native, native)}


def test_data_order_hook_sees_every_image_once_per_epoch_and_reproduces(tmp_path):
    """on_micro_batch observes the data stream: 4 images at batch 2 with grad_accum 2 are one epoch
    per step, every image once in each, the same order for the same seed."""
    def order(run):
        seen = []
        cfg = tiny_cfg(tmp_path / run, steps=3, batch_size=2, grad_accum=2, save_every=0, preview=False)
        Trainer(cfg, base=tiny_pipeline("sd1"),
                on_micro_batch=lambda epoch, batch: seen.extend((epoch, s.item) for s in batch)).run()
        return seen
    first = order("a")
    assert len(first) == 3 * 2 * 2                    # steps x micro-batches x batch
    for epoch in range(3):
        assert sorted(i for e, i in first if e == epoch) == [0, 1, 2, 3]
    assert order("b") == first


@torch.no_grad()
def _change_of_predictions(trainer, prompts: list[str]) -> list[float]:
    """Per prompt: |UNet prediction with the trained LoRA - without it| / |without it|."""
    unet = trainer.base.pipe.unet
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, generator=gen)
    t = torch.tensor([300, 700])
    out = []
    for prompt in prompts:
        ctx = trainer.encode([prompt] * 2)[0]
        on = unet(x, t, ctx).sample
        trainer.network.set_multiplier(0.0)
        off = unet(x, t, ctx).sample
        trainer.network.set_multiplier(1.0)
        out.append(float((on - off).norm() / off.norm()))
    return out


def test_uncond_preservation_keeps_the_base_prediction_for_the_empty_prompt(tmp_path):
    """What the option is for: after training, the LoRA barely changes the UNet's prediction for the
    empty prompt (classifier-free guidance's unconditional half), while it still changes the
    prediction for its captions."""
    changes = {}
    for weight in (0.0, 4.0):
        cfg = tiny_cfg(tmp_path, f"u{weight}", steps=12, uncond_preservation=weight, trigger="zzt")
        trainer = Trainer(cfg, base=tiny_pipeline("sd1"))
        trainer.prepare()
        trainer.run()
        changes[weight] = _change_of_predictions(trainer, ["", trainer.items[0].caption])
    (empty_plain, caption_plain), (empty_kept, caption_kept) = changes[0.0], changes[4.0]
    assert empty_kept < 0.5 * empty_plain
    assert caption_kept > 2 * empty_kept and caption_kept > 0.3 * caption_plain
