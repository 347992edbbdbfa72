"""Metrics: colour/shape classifiers against the scene generator's ground truth; the style metric
separates each sample style folder from the base scenes on images it was not fitted on."""
from pathlib import Path

import numpy as np
import pytest

from tools.metrics import (StyleMetric, background_noise, classify_background, classify_colour, classify_shape,
                            foreground, load_images)
from tools import make_styles
from tools import scenes as S

STYLES_DIR = Path(__file__).resolve().parent.parent / "sample_data" / "styles"


def test_classifiers_on_scenes():
    images, specs = S.scenes(np.random.default_rng(2024), 150)
    held, held_specs = S.scenes(np.random.default_rng(7), 30, held_out=True)
    for img, spec in zip(list(images) + list(held), specs + held_specs):
        assert classify_colour(img) == spec.colour, spec
        assert classify_shape(img) == spec.shape, spec
        assert classify_background(img) == spec.background, spec
        assert background_noise(img) < 1.0, spec             # the scenes' backgrounds are flat


def test_shape_survives_the_flaws_of_generated_shapes():
    """A generated square is rarely exact: its edges wave, it tilts a little, a bump sticks out.
    Each flaw lowers a bounding-box fill ratio (1 for a square, pi/4 for a circle), which called such
    squares circles; the whole-outline match must still call them squares, and must not turn a
    circle with the same flaws into a square. Ground truth: how the pictures are drawn here."""
    from PIL import Image, ImageDraw
    n, sup = 64, 4

    def draw(points, bump=False):
        big = Image.new("RGB", (n * sup, n * sup), (240, 240, 240))
        d = ImageDraw.Draw(big)
        d.polygon([(x * sup, y * sup) for x, y in points], fill=(215, 35, 35))
        if bump:   # a 3 x 5 px lump on the top edge, which stretches the bounding box
            top = min(y for _, y in points)
            d.rectangle([30 * sup, (top - 5) * sup, 33 * sup, (top + 1) * sup], fill=(215, 35, 35))
        return np.asarray(big.resize((n, n), Image.BOX))

    def outline(radius_at, tilt=0.0):
        angles = np.linspace(0, 2 * np.pi, 240, endpoint=False)
        return [(32 + radius_at(a) * np.cos(a + tilt), 32 + radius_at(a) * np.sin(a + tilt)) for a in angles]

    square = lambda a: 14 / max(abs(np.cos(a)), abs(np.sin(a)))                    # half-side 14
    wavy_square = lambda a: square(a) * (1 - 0.06 * np.cos(4 * a) ** 2 + 0.04 * np.sin(12 * a))
    circle = lambda a: 15 * (1 + 0.04 * np.sin(12 * a))
    for name, points, bump in [("wavy", outline(wavy_square), False), ("bump", outline(square), True),
                               ("tilted 8 degrees", outline(square, np.radians(8)), False)]:
        img = draw(points, bump)
        assert classify_shape(img) == "square", name
    assert _bbox_fill(draw(outline(square), True)) < 0.885 and _bbox_fill(draw(outline(square, np.radians(8)))) < 0.885
    for points, bump in [(outline(circle), False), (outline(circle), True)]:
        assert classify_shape(draw(points, bump)) == "circle"


def _bbox_fill(img) -> float:
    """The old single-number shape feature (squares needed > 0.885): shows these flaws defeat it."""
    m = foreground(img)
    ys, xs = np.nonzero(m)
    return m.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def test_background_noise_is_the_std_of_the_background():
    rng = np.random.default_rng(0)
    img = np.full((64, 64, 3), 128.0)
    img[20:40, 20:40] = (215, 35, 35)                      # a red square, excluded from the background
    noise = rng.normal(0, 10, (64, 64, 3))
    noisy = np.clip(img + noise, 0, 255).round().astype(np.uint8)   # images are 8-bit
    outside = np.ones((64, 64), bool)
    outside[18:42, 18:42] = False                          # the square grown by 2 px
    want = noisy[outside].astype(np.float64).std(axis=0).mean()
    assert background_noise(noisy) == pytest.approx(want, rel=1e-5)
    assert 8 < want < 12 and background_noise(img.astype(np.uint8)) == 0.0


def test_classifiers_on_blank_image():
    blank = np.full((64, 64, 3), 200, np.uint8)
    assert classify_colour(blank) is None and classify_shape(blank) is None


@pytest.mark.parametrize("style", sorted(make_styles.STYLES))
def test_style_folder(style):
    folder = STYLES_DIR / style
    images = sorted(folder.glob("*.png"))
    assert 10 <= len(images) <= 20
    for p in images:
        caption = p.with_suffix(".txt").read_text().strip()
        assert caption.startswith(make_styles.TRIGGERS[style] + ", ")


@pytest.mark.parametrize("style", sorted(make_styles.STYLES))
def test_style_metric_separates(style):
    metric = StyleMetric.for_folder(STYLES_DIR / style)
    # fresh images (other seeds than the folder's and the metric's reference scenes)
    rng = np.random.default_rng(99)
    fresh_style = [make_styles.render(style, make_styles.style_scene(
        style, rng, str(rng.choice(list(S.COLOURS))), str(rng.choice(S.SHAPES))))[0] for _ in range(30)]
    fresh_scenes, _ = S.scenes(np.random.default_rng(123), 100)
    on_style, on_scenes = metric.scores(fresh_style), metric.scores(list(fresh_scenes))
    assert abs(on_scenes.mean()) < 0.1 and abs(on_style.mean() - 1) < 0.2   # scaled: scenes 0, style 1
    assert on_style.min() > on_scenes.max() + 0.1                            # every image on its side
    assert on_style.mean() - on_scenes.mean() > 0.8
    # distance: typical of this style, not of the scenes or of the other styles
    others = [make_styles.render(o, make_styles.style_scene(o, rng, "red", "circle"))[0]
              for o in make_styles.STYLES if o != style for _ in range(5)]
    near = metric.distances(fresh_style).mean()
    assert near < 1.5
    assert metric.distances(list(fresh_scenes)).mean() > 2 * near
    assert metric.distances(others).mean() > 2 * near


def test_style_metric_is_deterministic():
    a = StyleMetric.for_folder(STYLES_DIR / "neon")
    b = StyleMetric.for_folder(STYLES_DIR / "neon")
    img = load_images(STYLES_DIR / "toon")[0]
    assert a.score(img) == b.score(img)


def test_plain_functions_for_eval_style():
    from tools.metrics import follows_colour, style_score
    folder = STYLES_DIR / "halftone"
    style_image = load_images(folder)[0]
    scene = S.render_scene(S.sample_scene(np.random.default_rng(5), colour="blue", shape="square"))
    expected = StyleMetric.for_folder(folder)
    assert style_score(style_image, folder) == pytest.approx(expected.score(style_image))
    assert style_score(scene, str(folder)) == pytest.approx(expected.score(scene))
    assert follows_colour(scene, "blue") and not follows_colour(scene, "red")


def test_eval_base_model_reports_which_shape_was_drawn(monkeypatch):
    """A model that draws every square as a circle: the shape score counts it wrong and `shape_drawn`
    names the confusion (the renderer and the classifier are the ground truth, checked above)."""
    from tools import eval_base_model as E

    def draw(pipe, prompts, seeds, **_):
        out = []
        for prompt in prompts:
            colour = next(c for c in S.COLOURS if f" {c} " in f" {prompt} ")
            shape = next(s for s in S.SHAPES if s in prompt)
            drawn = "circle" if shape == "square" else shape
            out += [np.asarray(S.render_scene(S.sample_scene(np.random.default_rng(seed), colour=colour,
                                                                shape=drawn, background="white")))
                    for seed in seeds]
        return out

    monkeypatch.setattr(E, "generate_images", draw)
    pairs = [("red", "circle"), ("red", "square"), ("red", "triangle")]
    result = E.evaluate(None, seeds=2, pairs=pairs, log=None)
    per_shape = 4 * 2                       # bare and three backgrounds, 2 seeds
    assert result["shape_drawn"]["square"] == {"circle": per_shape, "square": 0, "triangle": 0}
    assert result["shape_drawn"]["circle"]["circle"] == result["shape_drawn"]["triangle"]["triangle"] == per_shape
    assert result["shape"] == pytest.approx(2 / 3)
