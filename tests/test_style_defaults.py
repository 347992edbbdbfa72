"""The headline job on the embedded model: `sdlora train FOLDER --trigger W` with no preset (the
base model's own defaults), at reduced steps, moves the style metric of held-out prompts; and the
shape check used on styled pictures agrees with the shapes the style images were drawn with."""
import numpy as np

from tools import metrics as M
from tools import eval_style as E
from tools import make_styles as MS
from tools import scenes as S
from sdlora.training.config import build_config

NEON = "sample_data/styles/neon"
TOON = "sample_data/styles/toon"


def test_drawn_shape_matches_the_rendered_shape():
    rng = np.random.default_rng(11)
    for style, floor in (("neon", 0.85), ("halftone", 0.8), ("toon", 0.95)):
        hits = []
        for i in range(36):
            shape = S.SHAPES[i % 3]
            image, _ = MS.render(style, MS.style_scene(style, rng, list(S.COLOURS)[i % 6], shape))
            hits.append(M.follows_shape(image, shape))
        assert np.mean(hits) >= floor, style
    images, specs = S.scenes(rng, 60)          # plain scenes: as good as the plain classifier
    assert np.mean([M.classify_drawn_shape(im) == s.shape for im, s in zip(images, specs)]) >= 0.95


def test_drawn_colour_matches_the_rendered_colour():
    # each style keeps the hue of the colour it was drawn with; the RGB classifier does not see it
    # in neon's glowing lines or toon's pastel fills (its own test images would score ~6% / ~25%)
    rng = np.random.default_rng(12)
    for style in ("neon", "halftone", "toon"):
        drawn, rgb = [], []
        for i in range(36):
            colour = list(S.COLOURS)[i % 6]
            image, _ = MS.render(style, MS.style_scene(style, rng, colour, S.SHAPES[i % 3]))
            drawn.append(M.follows_colour(image, colour))
            rgb.append(M.classify_colour(image) == colour)
        assert np.mean(drawn) >= 0.95, style
        if style != "halftone":
            assert np.mean(rgb) < 0.5, style
    images, specs = S.scenes(rng, 60)          # plain scenes: as good as the RGB classifier
    assert np.mean([M.classify_drawn_colour(im) == s.colour for im, s in zip(images, specs)]) >= 0.95


def test_no_preset_on_the_embedded_base_uses_its_defaults():
    cfg = build_config(overrides={"data_dir": NEON, "output": "x.safetensors"})
    assert cfg.resolution in (0, 64) and cfg.steps < 1600 and cfg.rank <= 32


def test_default_training_moves_the_style_metric(tmp_path):
    metric, colour = E.default_metrics()
    report = E.evaluate(TOON, metric=metric, colour_metric=colour, shape_metric=E.default_shape_metric(),
                        preset=None, overrides={"trigger": "toonstyle", "steps": 150},
                        prompts=["a large red circle on a white background", "a yellow circle on a blue background"],
                        prompt_prefix="toonstyle, ", seeds=(0, 1), out_dir=tmp_path, steps=12,
                        distance=E.default_distance())
    assert report.lora_mean > report.base_mean + 0.05
    assert report.wins >= 0.75
    assert report.nearer >= 0.75      # nearer the style images, not only further along the score
    assert report.train_seconds > 0 and len(report.shape_followed) == 4
