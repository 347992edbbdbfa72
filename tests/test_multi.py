"""Several LoRAs in one run (training.multi): each job equals its solo run; steps, resume, CLI."""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora.errors import SdloraError
from sdlora.training import train
from sdlora.training.multi import train_many
from tiny import tiny_pipeline
from trainkit import ctrl_c_at, make_folder, tiny_cfg


def _jobs(tmp_path, tag, **kw):
    """Two jobs on different folders with their own trigger, rank, lr and (job b) text-encoder LoRA."""
    a = make_folder(tmp_path / "data_a", n=4, seed=1)
    b = make_folder(tmp_path / "data_b", n=6, seed=2)
    common = dict(kw)
    ja = tiny_cfg(tmp_path, f"{tag}-a", data_dir=str(a), trigger="zza", rank=4, unet_lr=1e-2, **common)
    jb = tiny_cfg(tmp_path, f"{tag}-b", data_dir=str(b), trigger="zzb", rank=2, unet_lr=3e-3, seed=7,
                  train_text_encoder=True, text_encoder_lr=5e-3, **common)
    return [ja, jb]


def _max_rel(ours: dict, ref: dict, keys) -> float:
    """max |ours - ref| over the tensors `keys`, relative to the largest |ref| among them."""
    num = max(float((ours[k] - ref[k]).abs().max()) for k in keys)
    return num / max(float(ref[k].abs().max()) for k in keys)


@pytest.mark.parametrize("family,precision", [("sd1", "no"), ("sdxl", "no"), ("sd1", "bf16")])
def test_one_step_equals_each_job_trained_alone(tmp_path, family, precision):
    # Adam's first step is lr * g / (|g| + eps): with the default eps 1e-8 it is lr * sign(g), and
    # elements whose gradient is ~1e-8 (or exactly 0 in theory, e.g. the 1-token self-attention q/k of
    # the tiny mid block) flip on float rounding. eps = 1 makes the step proportional to the gradient
    # (an SGD step), so the files compare the gradients themselves.
    # bf16: CPU autocast, where LoRA rows are added by in-place ops that autocast does not cast
    _assert_each_equals_solo(_jobs(tmp_path, "multi", steps=1, adam_epsilon=1.0, mixed_precision=precision), family)


def test_jobs_at_other_resolutions_run_in_separate_forward_passes_and_still_equal_solo(tmp_path):
    a, b = _jobs(tmp_path, "res", steps=1, adam_epsilon=1.0)
    _assert_each_equals_solo([a, b.replace(resolution=64)], "sd1")


def test_uncond_preservation_in_one_run_equals_each_job_alone(tmp_path):
    # two steps: at step 1 the LoRA is still the identity, so the term (and its gradient) is zero; with
    # adam_epsilon 1 (see above) the steps are small, so a large weight makes the term visible
    cfgs = _jobs(tmp_path, "uncond", steps=2, adam_epsilon=1.0, uncond_preservation=20.0)
    _assert_each_equals_solo(cfgs, "sd1")
    plain = train(cfgs[0].replace(uncond_preservation=0.0, output=str(tmp_path / "plain.safetensors"),
                                  checkpoint_dir=str(tmp_path / "plain-ckpt")), base=tiny_pipeline("sd1"))
    solo = load_file(str(Path(cfgs[0].output).with_name("solo-" + Path(cfgs[0].output).name)))
    ups = [k for k in solo if k.endswith("lora_up.weight")]
    assert _max_rel(load_file(plain.output), solo, ups) > 1e-4       # the term changed step 2 (measured 3.9e-4)


def _assert_each_equals_solo(cfgs, family):
    results = train_many(cfgs, base=tiny_pipeline(family))
    assert [r.status for r in results] == ["done"] * len(cfgs)
    for cfg, res in zip(cfgs, results):
        solo_cfg = cfg.replace(output=str(Path(cfg.output).with_name("solo-" + Path(cfg.output).name)),
                               checkpoint_dir=cfg.checkpoint_dir + "-solo")
        solo = train(solo_cfg, base=tiny_pipeline(family))
        ours, ref = load_file(res.output), load_file(solo.output)
        assert ours.keys() == ref.keys()
        ups = [k for k in ref if k.endswith("lora_up.weight")]
        downs = [k for k in ref if k.endswith("lora_down.weight")]
        assert max(float(ref[k].abs().max()) for k in ups) > 0      # one step really changed the LoRA
        if cfg.train_text_encoder:
            assert max(float(ref[k].abs().max()) for k in ups if k.startswith("lora_te")) > 0
        assert _max_rel(ours, ref, ups) <= 1e-5
        assert _max_rel(ours, ref, downs) <= 1e-5


def test_jobs_with_different_step_counts_write_their_own_ss_steps(tmp_path):
    a, b = _jobs(tmp_path, "steps")
    results = train_many([a.replace(steps=2), b.replace(steps=3)], base=tiny_pipeline("sd1"))
    assert [r.step for r in results] == [2, 3]
    for res, steps, trigger in zip(results, ("2", "3"), ("zza", "zzb")):
        with safe_open(res.output, "pt") as f:
            md = f.metadata()
        assert md["ss_steps"] == steps and md["ss_output_name"] == Path(res.output).stem
        assert trigger in md["ss_tag_frequency"]


def test_resumed_multi_run_equals_uninterrupted(tmp_path):
    opts = dict(steps=4, grad_accum=2, lr_scheduler="cosine", noise_offset=0.05, random_flip=True,
                caption_dropout=0.25)
    full = train_many(_jobs(tmp_path, "full", **opts), base=tiny_pipeline("sd1"))
    cfgs = _jobs(tmp_path, "cut", **opts)
    cut = train_many(cfgs, callbacks=[ctrl_c_at(2), None], base=tiny_pipeline("sd1"))
    assert [(r.status, r.step) for r in cut] == [("interrupted", 2), ("interrupted", 2)]
    resumed = train_many([c.replace(resume=str(r.checkpoint)) for c, r in zip(cfgs, cut)],
                         base=tiny_pipeline("sd1"))
    for f, r in zip(full, resumed):
        assert r.step == 4
        ta, tb = load_file(f.output), load_file(r.output)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k


def test_options_of_the_shared_base_must_agree(tmp_path):
    a, b = _jobs(tmp_path, "bad")
    with pytest.raises(SdloraError, match="--mixed-precision differs"):
        train_many([a, b.replace(mixed_precision="bf16")], base=tiny_pipeline("sd1"))
    with pytest.raises(SdloraError, match="--gradient-checkpointing cannot be used"):
        train_many([a.replace(gradient_checkpointing=True), b.replace(gradient_checkpointing=True)])
    with pytest.raises(SdloraError, match="both write the output file"):
        train_many([a, b.replace(output=a.output)], base=tiny_pipeline("sd1"))


CLI_OPTS = ["--base", "base", "--resolution", "32", "--steps", "2", "--batch-size", "2", "--rank", "4",
            "--seed", "0", "--device", "cpu", "--save-precision", "fp32", "--no-preview"]


@pytest.fixture
def cli_dir(tmp_path, monkeypatch):
    from tiny import save_tiny_pipeline
    monkeypatch.chdir(tmp_path)
    save_tiny_pipeline(tmp_path / "base", "sd1")
    make_folder(tmp_path / "ink", n=4, seed=1)
    make_folder(tmp_path / "neon", n=4, seed=2)
    return tmp_path


def test_cli_two_folders_write_two_files_and_out_is_refused(cli_dir, capsys):
    from sdlora.cli import main
    assert main(["train", "ink", "neon", "--out-dir", "loras", *CLI_OPTS]) == 0
    out = capsys.readouterr().out
    assert "job 1/2" in out and "job 2/2" in out                    # the plan lists each job
    for name in ("ink", "neon"):
        with safe_open(cli_dir / "loras" / f"{name}.safetensors", "pt") as f:
            assert f.metadata()["ss_output_name"] == name and f.metadata()["ss_steps"] == "2"
    assert main(["train", "ink", "neon", "--out", "x.safetensors", *CLI_OPTS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out-dir" in err[0]
    assert not (cli_dir / "x.safetensors").exists()


def test_cli_toml_jobs_get_their_own_rank_and_learning_rate(cli_dir):
    from sdlora.cli import main
    (cli_dir / "jobs.toml").write_text(
        'base = "base"\nresolution = 32\nsteps = 2\nbatch_size = 2\ndevice = "cpu"\npreview = false\n'
        'out_dir = "loras"\n\n'
        '[[job]]\ndata_dir = "ink"\ntrigger = "zzink"\nrank = 2\nunet_lr = 2e-3\n\n'
        '[[job]]\ndata_dir = "neon"\ntrigger = "zzneon"\nrank = 6\nunet_lr = 5e-4\nsteps = 3\n')
    assert main(["train", "--config", "jobs.toml"]) == 0
    for name, rank, lr, steps in (("ink", 2, "0.002", "2"), ("neon", 6, "0.0005", "3")):
        path = cli_dir / "loras" / f"{name}.safetensors"
        tensors = load_file(path)
        downs = [t for k, t in tensors.items() if k.endswith("lora_down.weight")]
        assert downs and all(t.shape[0] == rank for t in downs)
        with safe_open(path, "pt") as f:
            md = f.metadata()
        assert md["ss_network_dim"] == str(rank) and md["ss_unet_lr"] == lr and md["ss_steps"] == steps


# ------------------------------------------------------------------------------------------------
# --base-lora: training on top of a LoRA stack

def test_base_lora_stack_trains_on_top_and_equals_mixer_of_both_files(tmp_path):
    from sdlora.hashes import addnet_hash
    from sdlora.mixing import MixEntry, Mixer
    from sdlora.training import Trainer
    from tiny import probe_outputs
    first = train(tiny_cfg(tmp_path, "under", steps=2, train_text_encoder=True), base=tiny_pipeline("sd1"))
    pipe = tiny_pipeline("sd1")
    cfg = tiny_cfg(tmp_path, "top", steps=2, seed=3, train_text_encoder=True,
                   base_lora=[f"{first.output}:0.7"])
    trainer = Trainer(cfg, base=pipe)
    trainer.prepare()
    result = trainer.run()
    trainer.network.eval()
    live = probe_outputs(pipe)                        # base + the stack + the new LoRA, as trained
    both = tiny_pipeline("sd1")
    Mixer(both).apply([MixEntry(str(first.output), unet=0.7, text_encoder=0.7), MixEntry(str(result.output))])
    ref = probe_outputs(both)
    alone = tiny_pipeline("sd1")
    Mixer(alone).apply([MixEntry(str(result.output))])
    without = probe_outputs(alone)
    for comp in live:
        torch.testing.assert_close(live[comp], ref[comp], rtol=1e-4, atol=1e-5, msg=comp)
        assert (without[comp] - ref[comp]).abs().max() > 1e-4, comp     # the stack really is part of it
    with safe_open(result.output, "pt") as f:
        md = f.metadata()
    assert md["ss_base_weights"] == '["under.safetensors"]' and md["ss_base_weights_multiplier"] == "[0.7]"
    assert md["ss_base_weights_hashes"] == f'["{addnet_hash(first.output)}"]'


def test_bad_base_lora_fails_before_the_model_loads(tmp_path, monkeypatch):
    from sdlora.training import trainer as trainer_mod

    def no_loading(*a, **k):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(trainer_mod.Trainer, "_load_base", no_loading)
    cfg = tiny_cfg(tmp_path, "bad", base_lora=[str(tmp_path / "nope.safetensors:0.5")])
    with pytest.raises(SdloraError, match=r"--base-lora .*nope\.safetensors.*PATH:WEIGHT") as e:
        train(cfg)
    assert "\n" not in str(e.value)


def test_base_lora_flag_repeats_and_resume_warns_when_the_stack_file_changed(tmp_path):
    import argparse
    import shutil
    from sdlora.training.config import add_arguments, overrides_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--base-lora", "a.safetensors", "b.safetensors:0.5", "--base-lora", "c.safetensors"])
    assert overrides_from_args(args)["base_lora"] == ["a.safetensors", "b.safetensors:0.5", "c.safetensors"]

    one = train(tiny_cfg(tmp_path, "one", steps=1), base=tiny_pipeline("sd1"))
    two = train(tiny_cfg(tmp_path, "two", steps=1, seed=5), base=tiny_pipeline("sd1"))
    stack = tmp_path / "stack.safetensors"
    shutil.copy(one.output, stack)
    cfg = tiny_cfg(tmp_path, "drift", steps=3, base_lora=[str(stack)])
    cut = train(cfg, callbacks=ctrl_c_at(1), base=tiny_pipeline("sd1"))
    shutil.copy(two.output, stack)                      # same name, other weights
    with pytest.warns(UserWarning, match="base LoRA file contents"):
        train(cfg.replace(resume=str(cut.checkpoint)), base=tiny_pipeline("sd1"))


def test_base_lora_on_a_quantized_base_is_routed_and_equals_routing_both_files(tmp_path):
    from sdlora.mixing import MixEntry, patched_mixer
    from sdlora.quant import quantize_pipeline
    from sdlora.routing import kept_router, set_active
    from sdlora.training import Trainer
    from tiny import probe_outputs
    first = train(tiny_cfg(tmp_path, "under", steps=2), base=tiny_pipeline("sd1"))
    pipe = tiny_pipeline("sd1")
    trainer = Trainer(tiny_cfg(tmp_path, "top", steps=2, seed=3, base_precision="fp8",
                               base_lora=[f"{first.output}:0.5"]), base=pipe)
    trainer.prepare()
    result = trainer.run()
    assert kept_router(pipe) is not None and patched_mixer(pipe) is None     # routed, weights untouched
    trainer.network.eval()
    live = probe_outputs(pipe)
    ref_pipe = tiny_pipeline("sd1")
    quantize_pipeline(ref_pipe, "fp8", torch.float32)
    assert set_active(ref_pipe, [MixEntry(str(first.output), unet=0.5, text_encoder=0.5),
                                 MixEntry(str(result.output))]) == "routed"
    ref = probe_outputs(ref_pipe)
    for comp in live:
        torch.testing.assert_close(live[comp], ref[comp], rtol=1e-4, atol=1e-5, msg=comp)


def test_cli_ctrl_c_checkpoints_every_job_and_prints_their_resume_commands(cli_dir, capsys, monkeypatch):
    import shlex
    from sdlora.cli import main
    from sdlora.training import cli as train_cli
    orig = train_cli.CliProgress.on_progress

    def ctrl_c(self, p):
        orig(self, p)
        if p.step == 1 and self.name == "neon":
            raise KeyboardInterrupt

    monkeypatch.setattr(train_cli.CliProgress, "on_progress", ctrl_c)
    assert main(["train", "ink", "neon", "--out-dir", "loras", *CLI_OPTS]) == 130
    out = capsys.readouterr().out
    monkeypatch.setattr(train_cli.CliProgress, "on_progress", orig)
    commands = out.split("continue each job with: ", 1)[1].splitlines()[0].split("; ")
    assert len(commands) == 2 and not (cli_dir / "loras" / "ink.safetensors").exists()
    for command in commands:                   # each job's checkpoint is an ordinary one
        argv = shlex.split(command)
        assert argv[:3] == ["sdlora", "train", "--resume"] and Path(argv[3]).name == "step-000001"
        assert main(argv[1:]) == 0
    for name in ("ink", "neon"):
        with safe_open(cli_dir / "loras" / f"{name}.safetensors", "pt") as f:
            assert f.metadata()["ss_steps"] == "2"
