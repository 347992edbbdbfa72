"""Run by test_distributed.py under `accelerate launch --cpu --num_processes 2`: trains the tiny SD1
model and leaves, per rank, what it saw and what it holds in PROBE_DIR (the test's own files)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import sdlora.training.checkpoint as ckpt  # noqa: E402
import sdlora.training.trainer as trainer_mod  # noqa: E402
from sdlora.training import Trainer  # noqa: E402
from tiny import tiny_pipeline  # noqa: E402
from trainkit import tiny_cfg  # noqa: E402

work, probe = Path(sys.argv[1]), Path(sys.argv[2])
writes = []
real_save, real_ckpt = trainer_mod.atomic_save_file, ckpt.save_checkpoint
trainer_mod.atomic_save_file = lambda *a, **k: (writes.append(str(a[1])), real_save(*a, **k))[1]
ckpt.save_checkpoint = lambda *a, **k: (writes.append(str(a[0])), real_ckpt(*a, **k))[1]

cfg = tiny_cfg(work, steps=3, batch_size=1, save_every=2, train_text_encoder=True)
seen = []
t = Trainer(cfg, base=tiny_pipeline("sd1"),
            on_micro_batch=lambda epoch, batch: seen.extend((epoch, s.slot, s.item) for s in batch))
t.prepare()
result = t.run()
rank = t.accel.process_index
torch.save({"seen": seen, "writes": writes, "status": result.status,
            "world": t.accel.num_processes, "batches_per_epoch": t.plan.batches_per_epoch,
            "lora": {p: (layer.lora_down.detach().clone(), layer.lora_up.detach().clone()) for p, layer in t.network.items()}},
           probe / f"rank{rank}.pt")
