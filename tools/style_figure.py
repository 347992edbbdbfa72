"""The README's style picture and table: for every style folder, train a LoRA with the default settings
(what `sdlora train FOLDER --trigger W --out X` does, no other option), then show base / LoRA at
weight 0.5 / LoRA at weight 1 on the same prompts (not in the captions) and seeds.

    python -m tools.style_figure --out docs/styles.png [--styles sample_data/styles] [--work DIR]

Every number comes from tools/eval_style.py (the images in the picture are the ones it scored);
the trigger of a folder is tools/make_styles.TRIGGERS' (else the folder's name + "style").
Prints two Markdown tables (the LoRA against the base; the LoRA at the weights WEIGHTS) and writes
WORK/report.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROWS = (("base", "base"), ("half", "LoRA 0.5"), ("lora", "LoRA 1"))
WEIGHTS = (0.5, 0.75, 1.0)   # the second table: the same LoRA at these weights


def trigger_for(folder: Path) -> str:
    from tools.make_styles import TRIGGERS
    return TRIGGERS.get(folder.name, f"{folder.name}style")


def rate(flags) -> str:
    return f"{sum(flags) / len(flags):.0%}" if flags else "-"


def table_row(name: str, r) -> str:
    half = statistics.fmean(r.half_scores) if r.half_scores else float("nan")
    return (f"| `{name}` | {r.base_mean:.2f} → {half:.2f} → {r.lora_mean:.2f} (+{r.lora_mean - r.base_mean:.2f}) "
            f"| {r.nearer:.0%} ({statistics.median(r.base_distances):.1f} → {statistics.median(r.lora_distances):.1f}) "
            f"| {rate(r.base_shape_followed)} → {rate(r.shape_followed)} "
            f"| {rate(r.base_colour_followed)} → {rate(r.colour_followed)} | {r.train_seconds:.0f} s |")


def weight_row(name: str, r) -> str:
    """Style gain over the base / colour followed / shape followed, at each of WEIGHTS."""
    cells = []
    for w in WEIGHTS:
        at = r.at_weights[f"{w:g}"]
        cells.append(f"+{statistics.fmean(at['style']) - r.base_mean:.2f} / {rate(at['colour'])} / {rate(at['shape'])}")
    return f"| `{name}` | " + " | ".join(cells) + " |"


def figure(work: Path, names: list[str], n_prompts: int, seeds: list[int], scale: int = 2) -> Image.Image:
    """Rows: per style, base / half / LoRA; columns: prompt-major, each prompt on every seed."""
    side, label_w = 64 * scale, 90
    cols = [(p, s) for p in range(n_prompts) for s in seeds]
    out = Image.new("RGB", (label_w + len(cols) * (side + 2), len(names) * (len(ROWS) * (side + 2) + 8)), "white")
    d = ImageDraw.Draw(out)
    y = 0
    for name in names:
        for tag, label in ROWS:
            d.text((4, y + side // 2 - 12), name, fill="black")
            d.text((4, y + side // 2 + 2), label, fill="black")
            for c, (p, s) in enumerate(cols):
                im = Image.open(work / name / f"{tag}-seed{s}-p{p}.png").convert("RGB")
                out.paste(im.resize((side, side), Image.NEAREST), (label_w + c * (side + 2), y))
            y += side + 2
        y += 8
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--styles", type=Path, default=Path("sample_data/styles"))
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--work", type=Path, default=Path("style-figure"), help="folder for LoRAs, images, report.json")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (scored); the picture shows 2")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from tools import eval_style as E
    metric, colour = E.default_metrics()
    names, reports, rows, weight_rows, n_prompts = [], {}, [], [], None
    for folder in sorted(d for d in a.styles.iterdir() if d.is_dir()):
        trig = trigger_for(folder)
        r = E.evaluate(folder, metric=metric, colour_metric=colour, shape_metric=E.default_shape_metric(), half=True,
                       weights=WEIGHTS, distance=E.default_distance(),
                       preset=None, overrides={"trigger": trig}, prompt_prefix=f"{trig}, ",
                       seeds=tuple(range(a.seeds)), out_dir=a.work / folder.name)
        print(r.summary(), flush=True)
        names.append(folder.name)
        reports[folder.name] = json.loads(r.to_json())
        rows.append(table_row(folder.name, r))
        weight_rows.append(weight_row(folder.name, r))
        # a folder whose captions contain a default prompt scores one prompt fewer: show what all have
        n_prompts = min(n_prompts or len(r.prompts), len(r.prompts))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    figure(a.work, names, n_prompts, list(range(min(2, a.seeds)))).save(a.out)
    (a.work / "report.json").write_text(json.dumps(reports, indent=1))
    print("| style | style metric: base → LoRA 0.5 → LoRA 1 | LoRA nearer the style (distance, base → LoRA) | shape followed, base → LoRA "
          "| colour followed, base → LoRA | training |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| style | " + " | ".join(f"weight {w:g}" for w in WEIGHTS) + " |\n|---|" + "---|" * len(WEIGHTS))
    print("\n".join(weight_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
