"""Three style LoRAs: one `train_many` run vs three sequential `train` calls (wall time, peak RSS).

    python bench/multi_train.py --steps 40
    from bench.multi_train import bench_training; bench_training(40)

Both train the embedded tiny model (sample_data/models/tiny-sd, the default base) on the style
folders in sample_data/styles/ (halftone, neon, toon) with the settings the base brings (preset
tiny-cpu-demo: 64 px, batch 8, rank 16 (8 when bench/README.md was measured), latents and embeddings
cached) and `steps` steps each, no samples or previews. Sequential: three `train` calls one after
the other, each loading the base as a solo run does. Parallel: one `train_many` with the three jobs
on one base. Each measurement runs in its own subprocess (`threads` torch threads, default 1), so
its peak RSS is its own: VmHWM of /proc/self/status, the high-water mark of this process image
(ru_maxrss is not: Linux carries it over from the parent across fork and exec, so a parent that held
a real-size UNet shows in it). Wall time counts from before the first config is built to the last
file written (model loading and caching included; the trainer modules are imported before the clock
starts in both modes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STYLES = ("halftone", "neon", "toon")

CHILD = r"""
import json, sys, time
from pathlib import Path
mode, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
from sdlora.training import build_config
from sdlora.training.trainer import train          # both modes import the same modules before the clock
from sdlora.training.multi import train_many
t0, c0 = time.perf_counter(), time.process_time()
cfgs = [build_config(overrides=dict(data_dir=str(Path(sys.argv[4]) / s), output=str(out / f"{s}.safetensors"),
                                    checkpoint_dir=str(out / "ckpt" / s), steps=steps, preview=False))
        for s in sys.argv[5:]]
if mode == "sequential":
    results = [train(c) for c in cfgs]
else:
    results = train_many(cfgs)
wall = time.perf_counter() - t0
cpu = time.process_time() - c0
assert all(r.status == "done" for r in results), [r.status for r in results]
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_mib": hwm / 1024}))
"""


def _measure(mode: str, steps: int, threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore",
               TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    with tempfile.TemporaryDirectory(prefix="sdlora-multi-bench-") as tmp:
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(steps), tmp,
                               str(ROOT / "sample_data" / "styles"), *STYLES],
                              cwd=tmp, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_training(steps: int, threads: int = 1) -> dict:
    """{"sequential_s", "parallel_s", "seq_peak_mib", "par_peak_mib"} for 3 jobs x `steps` steps, plus
    "sequential_cpu_s"/"parallel_cpu_s" (process CPU time: on a shared machine wall time swings with
    the other jobs' load, CPU time much less)."""
    seq = _measure("sequential", steps, threads)
    par = _measure("parallel", steps, threads)
    return {"sequential_s": round(seq["wall_s"], 2), "parallel_s": round(par["wall_s"], 2),
            "seq_peak_mib": round(seq["peak_mib"], 1), "par_peak_mib": round(par["peak_mib"], 1),
            "sequential_cpu_s": round(seq["cpu_s"], 2), "parallel_cpu_s": round(par["cpu_s"], 2)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    print(json.dumps(bench_training(a.steps, a.threads), indent=1))
