"""Does a trained style LoRA learn the style? Train on a style folder, then compare generations.

    python -m tools.eval_style sample_data/styles/halftone --out eval-halftone
    python -m tools.eval_style STYLE_DIR --metric mypkg.metrics:style_score --steps 300

1. Generate images with the base model for prompts that are NOT captions of the style folder
   (fixed seeds), 2. train a LoRA on the folder with a preset ("tiny CPU demo" by default),
3. generate the same prompts and seeds with the LoRA, 4. score every image with a style metric
   and (optionally) check that the prompt's colour is still followed.

Metrics are plain functions so any scorer can be plugged in:
    style metric:  fn(image: PIL.Image, style_dir: Path) -> float   (higher = more like the style)
    colour check:  fn(image: PIL.Image, colour: str) -> bool
    distance:      fn(image: PIL.Image, style_dir: Path) -> float   (lower = more typical of the style)
By default they are `tools.metrics.style_score` (the StyleMetric of the style folder: 0 = like
the base scenes, 1 = like the style images), `tools.metrics.follows_colour` and
`tools.metrics.style_distance`; pass `--metric`, `--colour-metric`, `--distance` as
`module:function` to use others. A linear score also rises for images unlike both the base scenes
and the style (mush), so "the LoRA image is nearer the style" is judged by the distance.
The report (JSON + a printed table) holds every score, so numbers can go to the README.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.errors import SdloraError

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
# prompts in the base model's own vocabulary (the tiny model knows shapes and colours)
DEFAULT_PROMPTS = ("a large red circle on a white background", "a small blue square on a yellow background",
                   "a green triangle on a black background", "a yellow circle on a blue background",
                   "a purple square on a white background", "an orange triangle on a green background")
# the same colours and shapes, placed instead of grounded: for a style whose captions never name a
# background (its ground is part of the style, as neon's black), where asking for "a white background"
# asks for something else than the style
GROUNDLESS_PROMPTS = ("a large red circle at the top", "a small blue square at the right",
                      "a green triangle at the bottom", "a yellow circle in the middle",
                      "a purple square at the left", "an orange triangle at the top")


@dataclass
class StyleReport:
    style_dir: str
    prompts: list[str]
    seeds: list[int]
    base_scores: list[float]
    lora_scores: list[float]
    lora_path: str
    colour_followed: list[bool] | None = None     # per LoRA image, when a colour check ran
    base_colour_followed: list[bool] | None = None
    shape_followed: list[bool] | None = None      # per LoRA image, when a shape check ran
    base_shape_followed: list[bool] | None = None
    base_distances: list[float] | None = None     # per image, when a distance function ran (lower: nearer)
    lora_distances: list[float] | None = None
    half_scores: list[float] | None = None        # the LoRA at weight 0.5, when `half` was asked
    # the LoRA at other weights, when asked: "0.75" -> {"style": scores, "colour": flags, "shape": flags}
    at_weights: dict = field(default_factory=dict)
    train_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def base_mean(self) -> float:
        return statistics.fmean(self.base_scores)

    @property
    def lora_mean(self) -> float:
        return statistics.fmean(self.lora_scores)

    @property
    def wins(self) -> float:
        """Share of (prompt, seed) pairs where the LoRA image scores higher than the base image."""
        return sum(b < lo for b, lo in zip(self.base_scores, self.lora_scores)) / len(self.lora_scores)

    @property
    def nearer(self) -> float | None:
        """Share of (prompt, seed) pairs where the LoRA image is nearer the style images than the base
        image (by the distance function). The linear score also rises for images unlike both the base
        scenes and the style (mush), so "nearer" is judged by the distance, not the score."""
        if not self.lora_distances:
            return None
        return sum(lo < b for b, lo in zip(self.base_distances, self.lora_distances)) / len(self.lora_distances)

    def summary(self) -> str:
        lines = [f"style {self.style_dir}: {len(self.prompts)} prompts x {len(self.seeds)} seeds",
                 f"  style metric  base {self.base_mean:.4f}  ->  LoRA {self.lora_mean:.4f}  "
                 f"(+{self.lora_mean - self.base_mean:.4f}; LoRA higher on {self.wins:.0%} of pairs)"]
        if self.nearer is not None:
            lines.append(f"  distance to the style images (theirs ~1): base {statistics.median(self.base_distances):.2f}"
                         f"  ->  LoRA {statistics.median(self.lora_distances):.2f} (medians; LoRA nearer on "
                         f"{self.nearer:.0%} of pairs)")
        if self.half_scores is not None:
            lines.append(f"  style metric at LoRA weight 0.5: {statistics.fmean(self.half_scores):.4f}")
        for w, r in self.at_weights.items():
            rates = ", ".join(f"{k} followed {sum(v) / len(v):.0%}" for k, v in r.items() if k != "style" and v)
            lines.append(f"  LoRA weight {w}: style metric {statistics.fmean(r['style']):.4f}, {rates}")
        for what, lora, base in (("colour", self.colour_followed, self.base_colour_followed),
                                 ("shape", self.shape_followed, self.base_shape_followed)):
            if lora is not None:
                lines.append(f"  prompt {what} followed: base {sum(base) / len(base):.0%}, "
                             f"LoRA {sum(lora) / len(lora):.0%}")
        if self.train_seconds is not None:
            lines.append(f"  training took {self.train_seconds:.0f} s")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> str:
        d = dict(self.__dict__, base_mean=self.base_mean, lora_mean=self.lora_mean, wins=self.wins,
                 nearer=self.nearer)
        return json.dumps(d, indent=1)


def load_function(spec: str):
    """`module:function` -> the function."""
    mod, _, name = spec.partition(":")
    if not name:
        raise SdloraError(f"expected module:function, got {spec!r}")
    return getattr(importlib.import_module(mod), name)


def default_metrics():
    """(style metric, colour check): tools.metrics' StyleMetric score and colour classifier."""
    from tools.metrics import follows_colour, style_score
    return style_score, follows_colour


def default_distance():
    """Distance to the style images: tools.metrics' StyleMetric distance."""
    from tools.metrics import style_distance
    return style_distance


def default_shape_metric():
    from tools.metrics import follows_shape
    return follows_shape


def shape_of(prompt: str) -> str | None:
    words = prompt.lower().replace(",", " ").split()
    return next((w for w in words if w in ("circle", "square", "triangle")), None)


def colour_of(prompt: str) -> str | None:
    words = prompt.lower().replace(",", " ").split()
    return next((w for w in words if w in COLOURS), None)


def captions_of(style_dir: Path) -> set[str]:
    return {p.read_text(encoding="utf-8").strip().lower() for ext in ("*.txt", "*.caption")
            for p in Path(style_dir).rglob(ext)}


def prompts_for(style_dir: Path) -> tuple[str, ...]:
    """DEFAULT_PROMPTS, or GROUNDLESS_PROMPTS when no caption of the folder names a background."""
    return DEFAULT_PROMPTS if any("background" in c for c in captions_of(style_dir)) else GROUNDLESS_PROMPTS


def held_out_prompts(prompts, style_dir: Path) -> list[str]:
    """The prompts that are not (part of) any caption in the style folder."""
    captions = captions_of(style_dir)
    return [p for p in prompts if not any(p.lower() in c for c in captions)]


def evaluate(style_dir, *, metric, colour_metric=None, base=None, preset: str = "tiny CPU demo",
             overrides: dict | None = None, prompts=None, prompt_prefix: str = "", seeds=(0, 1, 2, 3),
             out_dir="eval-style", steps: int = 20, cfg_scale: float = 5.0, size: int | None = None,
             shape_metric=None, half: bool = False, weights=(), s_min_uncond: float = 0.0,
             distance=None) -> StyleReport:
    """Train on `style_dir` with `preset` (+ overrides; preset None: the base model's own defaults,
    as `sdlora train FOLDER` with no preset), score base vs LoRA images. `base`: a diffusers pipeline
    or None for the trainer's default base model. `prompts`: None for prompts_for(style_dir); those
    found in the captions are dropped. `shape_metric(image, shape) -> bool` checks the
    prompt's shape; `half` also scores the LoRA at weight 0.5 (style metric), `weights` at each
    of those weights (style metric, colour and shape: StyleReport.at_weights). `s_min_uncond`: no
    CFG below this sigma when sampling (generate's --s-min-uncond). `distance(image, style_dir) ->
    float` (lower: more typical of the style) decides StyleReport.nearer."""
    import time
    from sdlora.pipelines import load_base
    from sdlora.training.config import build_config
    from sdlora.training.sampling import generate, write_png
    from sdlora.training.trainer import Trainer

    style_dir, out_dir = Path(style_dir), Path(out_dir)
    prompts = prompts or prompts_for(style_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = held_out_prompts(prompts, style_dir)
    notes = [f"dropped {len(prompts) - len(kept)} prompt(s) found in the captions"] if len(kept) < len(prompts) else []
    if not kept:
        raise SdloraError("every evaluation prompt appears in the style captions; pass other --prompts")
    full = [f"{prompt_prefix}{p}" for p in kept]
    # checkpoints beside the evaluation's images, not in ./checkpoints of whoever runs it
    cfg = build_config(preset=preset, overrides=dict({"checkpoint_dir": str(out_dir / "checkpoints")}, **(overrides or {}),
                                                     data_dir=str(style_dir),
                                                     output=str(out_dir / "style-lora.safetensors")))
    pipe = base if base is not None else load_base(cfg.base).pipe
    size = size or cfg.resolution

    def images(tag):
        ims = []
        for seed in seeds:       # prompt i of seed s uses generator seed s*1000 + i
            batch = generate(pipe, full, seed=seed * 1000, steps=steps, cfg=cfg_scale, size=size,
                             s_min_uncond=s_min_uncond)
            for i, im in enumerate(batch):
                write_png(im, out_dir / f"{tag}-seed{seed}-p{i}.png")
            ims += batch
        return ims

    base_images = images("base")
    trainer = Trainer(cfg, base=pipe)
    t0 = time.time()
    trainer.prepare()
    result = trainer.run()
    seconds = time.time() - t0
    trainer.network.eval()
    lora_images = images("lora")
    by_weight = {1.0: lora_images}          # each weight's images made once (half is weight 0.5)
    for w in ((0.5,) if half else ()) + tuple(weights):
        if w not in by_weight:
            trainer.network.set_multiplier(w)
            by_weight[w] = images("half" if w == 0.5 else f"w{w:g}")
    trainer.network.set_multiplier(1.0)
    trainer.network.remove()

    shapes = [shape_of(p) for p in kept] * len(seeds)
    colours = [colour_of(p) for p in kept] * len(seeds)
    check_shape, check_colour = shape_metric is not None and all(shapes), colour_metric is not None and all(colours)

    def scored(ims) -> dict:
        return {"style": [float(metric(im, style_dir)) for im in ims],
                "colour": [bool(colour_metric(im, c)) for im, c in zip(ims, colours)] if check_colour else [],
                "shape": [bool(shape_metric(im, sh)) for im, sh in zip(ims, shapes)] if check_shape else []}
    base_checks = scored(base_images)
    checks = {w: scored(by_weight[w]) for w in {1.0, *weights}}
    report = StyleReport(str(style_dir), full, list(seeds), base_checks["style"], checks[1.0]["style"],
                         str(result.output), notes=notes, train_seconds=seconds)
    if half:
        report.half_scores = checks[0.5]["style"] if 0.5 in checks else [float(metric(im, style_dir))
                                                                          for im in by_weight[0.5]]
    report.at_weights = {f"{w:g}": checks[w] for w in weights}
    if distance is not None:
        report.base_distances = [float(distance(im, style_dir)) for im in base_images]
        report.lora_distances = [float(distance(im, style_dir)) for im in lora_images]
    if check_shape:
        report.shape_followed, report.base_shape_followed = checks[1.0]["shape"], base_checks["shape"]
    if check_colour:
        report.colour_followed, report.base_colour_followed = checks[1.0]["colour"], base_checks["colour"]
    else:
        report.notes.append("colour check not run: " + ("no colour function" if colour_metric is None
                                                        else "a prompt names no colour"))
    (out_dir / "report.json").write_text(report.to_json())
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("style_dir")
    p.add_argument("--out", default="eval-style", help="folder for images, the LoRA and report.json")
    p.add_argument("--preset", default="", help="training preset (default: none, i.e. what `sdlora train FOLDER` "
                                                "uses: the base model's own defaults)")
    p.add_argument("--trigger", default="", help="train with this trigger word (as `sdlora train --trigger W`) and "
                                                 "put 'W, ' before every prompt")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="training options, as in a config file (e.g. rank=16 train_text_encoder=true)")
    p.add_argument("--half", action="store_true", help="also score the LoRA at weight 0.5")
    p.add_argument("--weights", type=float, nargs="*", default=[],
                   help="also score the LoRA at these weights (style metric, colour, shape)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default: the preset's)")
    p.add_argument("--base", default="", help="base model (default: the embedded one)")
    p.add_argument("--metric", help="style metric as module:function (default: tools.metrics.style_score)")
    p.add_argument("--colour-metric", help="colour check as module:function (default: tools.metrics.follows_colour)")
    p.add_argument("--distance", help="distance to the style images as module:function, lower is nearer "
                                      "(default: tools.metrics.style_distance)")
    p.add_argument("--prompts", nargs="+", help="prompts to score (default: DEFAULT_PROMPTS, or GROUNDLESS_PROMPTS "
                                                "when the folder's captions never name a background)")
    p.add_argument("--prompt-prefix", default="", help="put before every prompt (e.g. the trigger word + ', ')")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--s-min-uncond", type=float, default=0.0, metavar="SIGMA",
                   help="no CFG below this sigma when sampling (generate's --s-min-uncond; default 0: off)")
    a = p.parse_args(argv)
    metric, colour = default_metrics()
    metric = load_function(a.metric) if a.metric else metric
    colour = load_function(a.colour_metric) if a.colour_metric else colour
    overrides = {"base": a.base} if a.base else {}
    if a.steps:
        overrides["steps"] = a.steps
    for item in a.set:
        key, _, value = item.partition("=")
        overrides[key] = tomllib.loads(f"v = {value}")["v"] if value not in ("",) else ""
    prefix = a.prompt_prefix
    if a.trigger:
        overrides["trigger"] = a.trigger
        prefix = prefix or f"{a.trigger}, "
    report = evaluate(a.style_dir, metric=metric, colour_metric=colour, preset=a.preset or None, overrides=overrides,
                      prompts=a.prompts, prompt_prefix=prefix, seeds=tuple(range(a.seeds)), out_dir=a.out,
                      steps=a.sample_steps, shape_metric=default_shape_metric(), half=a.half,
                      weights=tuple(a.weights), s_min_uncond=a.s_min_uncond,
                      distance=load_function(a.distance) if a.distance else default_distance())
    print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
