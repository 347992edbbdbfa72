"""tools.eval_style's mechanics on a tiny random model (the real learning check needs the
embedded base model and sample_data/styles: run `python -m tools.eval_style` then)."""
import numpy as np
import pytest
from PIL import Image

from sdlora.errors import SdloraError
from tools import eval_style as E
from tiny import tiny_pipeline
from trainkit import make_folder


def redness(image, style_dir):
    a = np.asarray(image, dtype=np.float64)
    return float(a[..., 0].mean() - a[..., 1:].mean())


def greyness(image, style_dir):
    """A distance: how far the image is from mid-grey (lower is "nearer")."""
    return float(np.abs(np.asarray(image, dtype=np.float64) - 128).mean())


def test_evaluate_scores_base_and_lora_on_held_out_prompts(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")                    # nothing may land in the caller's folder
    style = make_folder(tmp_path / "style", n=4)          # captions "a red square, noise", ...
    prompts = ["a red square", "a large red circle on a white background", "a blue square on a yellow background"]
    report = E.evaluate(style, metric=redness, colour_metric=lambda im, c: c == "red", base=tiny_pipeline("sd1"),
                        overrides={"resolution": 32, "steps": 2, "batch_size": 2}, prompts=prompts, seeds=(0, 1),
                        out_dir=tmp_path / "eval", steps=2, weights=(0.0, 1.0), distance=greyness)
    assert report.prompts == prompts[1:] and "dropped 1 prompt" in report.notes[0]
    assert len(report.base_scores) == len(report.lora_scores) == 4
    again = redness(Image.open(tmp_path / "eval" / "base-seed1-p0.png"), style)
    assert report.base_scores[2] == pytest.approx(again)     # seed-major order, scores of the saved images
    assert report.colour_followed == [True, False, True, False]
    # "nearer" compares the distances of the saved base and LoRA images pair by pair
    dist = {tag: [greyness(Image.open(tmp_path / "eval" / f"{tag}-seed{s}-p{i}.png"), style)
                  for s in (0, 1) for i in (0, 1)] for tag in ("base", "lora")}
    assert report.base_distances == pytest.approx(dist["base"]) and report.lora_distances == pytest.approx(dist["lora"])
    assert report.nearer == sum(lo < b for b, lo in zip(dist["base"], dist["lora"])) / 4
    assert "LoRA nearer on" in report.summary()
    # weight 0 is the base model again (same seeds, same images), weight 1 the LoRA
    assert report.at_weights["0"]["style"] == pytest.approx(report.base_scores)
    assert report.at_weights["0"]["colour"] == report.base_colour_followed
    assert report.at_weights["1"]["style"] == report.lora_scores and "LoRA weight 0:" in report.summary()
    assert (tmp_path / "eval" / "report.json").exists() and "style metric" in report.summary()
    assert list((tmp_path / "cwd").iterdir()) == [] and (tmp_path / "eval" / "checkpoints").is_dir()
    with pytest.raises(SdloraError, match="every evaluation prompt"):
        E.evaluate(style, metric=redness, base=tiny_pipeline("sd1"), prompts=["a red square"], out_dir=tmp_path / "e2")


def test_prompts_follow_what_the_captions_name(tmp_path):
    """A folder whose captions name backgrounds is scored on grounded prompts; one whose captions never
    do (the ground is the style) on the same colours and shapes placed instead."""
    grounded, bare = tmp_path / "grounded", tmp_path / "bare"
    for folder, caption in ((grounded, "zz, a red circle on a blue background"), (bare, "zz, a red circle at the left")):
        folder.mkdir()
        (folder / "a.txt").write_text(caption + "\n")
    assert E.prompts_for(grounded) == E.DEFAULT_PROMPTS
    assert E.prompts_for(bare) == E.GROUNDLESS_PROMPTS
    assert not any("background" in p for p in E.GROUNDLESS_PROMPTS)
    assert [(E.colour_of(p), E.shape_of(p)) for p in E.GROUNDLESS_PROMPTS] == \
        [(E.colour_of(p), E.shape_of(p)) for p in E.DEFAULT_PROMPTS]
