"""Several processes (gloo DDP on the CPU) under `accelerate launch` on the tiny model.

accelerate 1.15's `launch --cpu --num_processes 2` starts ONE process unless an MPI hostfile is given
(its simple launcher); `launch --multi_gpu --num_processes 2` starts two through torchrun, and the
trainer's CPU mode (no GPU here, `--device cpu`) makes them a MULTI_CPU group on gloo. That is the
command a CPU-only node needs; on GPUs the same command gives NCCL DDP.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdlora.families import kohya_name
from trainkit import make_folder


def test_two_processes_share_the_work_and_agree(tmp_path):
    make_folder(tmp_path / "data", n=6)
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "--main_process_port", "29517",
                      str(Path(__file__).parent / "ddp_train.py"), str(tmp_path), str(probe)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(probe / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["status"] == r1["status"] == "done"
    # identical LoRA weights on both ranks, and they did train
    assert r0["lora"].keys() == r1["lora"].keys()
    for path in r0["lora"]:
        for a, b in zip(r0["lora"][path], r1["lora"][path]):
            assert torch.equal(a, b), path
    assert any(up.abs().sum() > 0 for _, up in r0["lora"].values())
    # each rank saw its own shard: disjoint sample positions, together the start of each epoch
    s0, s1 = ({(e, slot) for e, slot, _ in r["seen"]} for r in (r0, r1))
    assert len(s0) == len(s1) == 3 and not s0 & s1
    # only rank 0 wrote files, and the file holds the weights both ranks agree on
    assert r1["writes"] == [] and len(r0["writes"]) == 3            # checkpoints at 2 and 3, the LoRA
    out = tmp_path / "out" / "lora.safetensors"
    sd = load_file(out)
    for path, (down, up) in r0["lora"].items():
        assert torch.equal(sd[kohya_name(path, "sd1") + ".lora_down.weight"], down)
    # the LoRA and its preview in OUT; checkpoints in the run's checkpoint folder (trainkit.tiny_cfg)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lora.preview.png", "lora.safetensors"]
    assert (tmp_path / "checkpoints" / "lora").is_dir()
