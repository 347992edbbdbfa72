"""Does training several LoRAs in one run learn what solo runs learn? The style metric, both ways.

    OMP_NUM_THREADS=1 python bench/multi_style.py [--steps N] [--out DIR]

Trains the three sample styles (halftone, neon, toon) on the embedded model with the settings the
base brings (as `sdlora train FOLDER` with no flags; `--steps` overrides the step count) twice:
three solo `train` runs, and one `train_many` run. Each of the six LoRAs then generates the
evaluation prompts of tools/eval_style.py (not captions of any style folder) on seeds 0-3, patched
at weight 1, and every image is scored with the style metric of its folder (tools/metrics.py). The
last line is the largest per-style difference of the mean metric, multi minus solo.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STYLES = ("halftone", "neon", "toon")


def _configs(out: Path, tag: str, steps: int | None):
    from sdlora.training import build_config
    over = {} if steps is None else {"steps": steps}
    return [build_config(overrides=dict(over, data_dir=str(ROOT / "sample_data" / "styles" / s),
                                        output=str(out / tag / f"{s}.safetensors"),
                                        checkpoint_dir=str(out / tag / "ckpt" / s), preview=False))
            for s in STYLES]


def _scores(base, lora: Path, style: str) -> list[float]:
    from sdlora.extra_networks import LoraRef
    from sdlora.generate import generate_prompts
    from tools.eval_style import DEFAULT_PROMPTS
    from tools.metrics import style_score
    folder = ROOT / "sample_data" / "styles" / style
    ref = LoraRef(lora.stem, 1.0, 1.0, lora)
    scores = []
    for seed in range(4):
        for r in generate_prompts(base, list(DEFAULT_PROMPTS), loras=[ref], seed=seed * 1000, progress=False):
            scores.append(float(style_score(r.image, folder)))
    return scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="default: the base's own (as sdlora train FOLDER)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from sdlora.pipelines import load_base
    from sdlora.training import train
    from sdlora.training.multi import train_many
    with tempfile.TemporaryDirectory(prefix="sdlora-multi-style-") as tmp:
        out = a.out or Path(tmp)
        solo = [train(c).output for c in _configs(out, "solo", a.steps)]
        multi = [r.output for r in train_many(_configs(out, "multi", a.steps))]
        base = load_base(None)
        worst = 0.0
        for style, s, m in zip(STYLES, solo, multi):
            ms, mm = statistics.mean(_scores(base, Path(s), style)), statistics.mean(_scores(base, Path(m), style))
            worst = max(worst, abs(mm - ms))
            print(f"{style}: style metric solo {ms:.3f}, one multi-LoRA run {mm:.3f} (difference {mm - ms:+.3f})")
    print(f"style metric, multi-LoRA run vs solo runs, largest difference: {worst:.3f}")


if __name__ == "__main__":
    main()
