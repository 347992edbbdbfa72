"""The embedded base's local-attention text encoder (tools/text_encoder.py): a word put in front of
a caption (a LoRA's trigger word) leaves every caption token from the third on exactly as it was,
in the shipped model and in a freshly built one; it is a plain CLIPTextModel that diffusers loads."""
import torch

from sdlora.pipelines import EMBEDDED_MODEL
from tools import text_encoder as T
from tools.make_base_model import load_tokenizer, text_encoder_config

CAPTIONS = [("a small red circle at the left on a blue background", "zqx, "),
            ("a large green triangle on a white background", "toonstyle, "),
            ("a purple square", "masterpiece best quality ")]


def _changes(model):
    tok = load_tokenizer()
    return [T.prefix_change(model, tok, caption, prefix) for caption, prefix in CAPTIONS]


def test_shipped_encoder_ignores_a_leading_word_past_the_first_two_tokens():
    from transformers import CLIPTextModel
    model = CLIPTextModel.from_pretrained(str(EMBEDDED_MODEL / "text_encoder")).eval()
    for changes in _changes(model):
        assert all(d < 1e-3 for _, d in changes[2:]), changes   # the frozen random CLIP before it: 0.46-1.3
        assert changes[0][1] > 0.1          # the first word does see what is in front of it


def test_built_encoder_attends_where_it_was_built_to():
    cfg = {k: v for k, v in text_encoder_config().items() if k != "architectures"}
    model = T.build(cfg, seed=3)
    assert T.min_target_weight(model, torch.Generator().manual_seed(1)) > 0.9
    for changes in _changes(model):
        assert all(d < 1e-3 for _, d in changes[2:]), changes   # the frozen random CLIP before it: 0.46-1.3
    # the words around a token matter: "circle" after "red" is not "circle" after "green"
    tok = load_tokenizer()
    ids = tok(["a red circle", "a green circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids)[0]
    assert torch.cosine_similarity(out[0, 3], out[1, 3], dim=0) < 0.95
