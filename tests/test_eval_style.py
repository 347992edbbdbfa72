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


def test_evaluate_scores_base_and_lora_on_held_out_prompts(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")                    # nothing may land in the caller's folder
    style = make_folder(tmp_path / "style", n=4)          # captions "a red square, noise", ...
    prompts = ["a red square", "a large red circle on a white background", "a blue square on a yellow background"]
    report = E.evaluate(style, metric=redness, colour_metric=lambda im, c: c == "red", base=tiny_pipeline("sd1"),
                        overrides={"resolution": 32, "steps": 2, "batch_size": 2}, prompts=prompts, seeds=(0, 1),
                        out_dir=tmp_path / "eval", steps=2, weights=(0.0, 1.0))
    assert report.prompts == prompts[1:] and "dropped 1 prompt" in report.notes[0]
    assert len(report.base_scores) == len(report.lora_scores) == 4
    again = redness(Image.open(tmp_path / "eval" / "base-seed1-p0.png"), style)
    assert report.base_scores[2] == pytest.approx(again)     # seed-major order, scores of the saved images
    assert report.colour_followed == [True, False, True, False]
    # weight 0 is the base model again (same seeds, same images), weight 1 the LoRA
    assert report.at_weights["0"]["style"] == pytest.approx(report.base_scores)
    assert report.at_weights["0"]["colour"] == report.base_colour_followed
    assert report.at_weights["1"]["style"] == report.lora_scores and "LoRA weight 0:" in report.summary()
    assert (tmp_path / "eval" / "report.json").exists() and "style metric" in report.summary()
    assert list((tmp_path / "cwd").iterdir()) == [] and (tmp_path / "eval" / "checkpoints").is_dir()
    with pytest.raises(SdloraError, match="every evaluation prompt"):
        E.evaluate(style, metric=redness, base=tiny_pipeline("sd1"), prompts=["a red square"], out_dir=tmp_path / "e2")
