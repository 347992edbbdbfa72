"""The embedded base's text encoder: a CLIPTextModel whose attention is set by construction.

Why: a style LoRA's prompts start with its trigger word ("toonstyle, a red circle ..."), a word the
base has never seen. In a frozen *random* CLIP encoder every token attends to every earlier token,
so such a word changes the state of every later token, and the base measured here lost half its
colour and most of its shape after one ("zqx, "). Real SD gets its robustness from CLIP's training
on 400M captions; a 2-core CPU cannot do that, so this encoder is built to have it:

  * hidden = word dims | position dims. Token embeddings (seeded random, zero-sum, all of one norm)
    live in the word dims, position embeddings in the position dims.
  * every attention head reads only the position dims for its queries and keys, and those weights
    are fitted (`fit_attention`, seconds) so that layer 1's heads attend to the token itself, the
    one before, the one two before and itself again, and every head of layer 2 to the token itself.
    A word's state is then a fixed mix of itself and the two words before it ("circle" carries
    "red", "background" carries "blue" and "on"): colour/shape/background binding, and a word three
    or more places back cannot change it.
  * values, outputs and MLPs read and write the word dims only (seeded random, zero-sum so the
    layer norms' means stay independent of the words); the final layer norm drops the position
    dims, so the output depends on the words around a token, not on where the caption starts.

`prefix_change` measures it: a prefix changes the first two caption words' states and nothing else
(tests/test_text_encoder.py). It is a genuine CLIPTextModel (SD1.5's
modules and names at width 64), so LoRAs, clip skip and fp16 work on it as on any CLIP encoder;
the UNet is trained on it frozen.
"""
from __future__ import annotations

import math

import torch

CONTENT, POSITION = 48, 16     # hidden dims: words | position
OFFSETS = (0, 1, 2, 0)         # layer 1's heads: the token itself, the one before, the one two before, itself


def _zero_sum(w: torch.Tensor, dim: int) -> torch.Tensor:
    """`w` with its mean along `dim` removed (vectors orthogonal to the all-ones vector)."""
    return w - w.mean(dim=dim, keepdim=True)


def _random(gen, *shape, gain=1.0):
    return torch.randn(*shape, generator=gen) * gain / math.sqrt(shape[-1])


@torch.no_grad()
def _set_content_weights(model, gen) -> None:
    """Token embeddings, values, outputs and MLPs: seeded random maps within the word dims."""
    c, hidden = CONTENT, model.config.hidden_size
    emb = model.embeddings
    tok = _zero_sum(torch.randn(emb.token_embedding.weight.shape[0], c, generator=gen), 1)
    tok = tok / tok.norm(dim=1, keepdim=True) * math.sqrt(c)     # one norm: layer norm stats do not vary
    emb.token_embedding.weight.zero_()
    emb.token_embedding.weight[:, :c] = tok
    heads = model.config.num_attention_heads
    head_dim = hidden // heads
    for li, layer in enumerate(model.encoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        # values read the word dims; each head's output is written back into them. Gains: the word
        # before and the one before that come in at about 0.6 and 0.45 of a word's own norm.
        gains = (0.3, 0.6, 0.45, 0.3) if li == 0 else (0.25,) * heads
        for h in range(heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            attn.v_proj.weight[rows, :c] = _zero_sum(_random(gen, head_dim, c), 1)
            attn.out_proj.weight[:c, rows] = _zero_sum(_random(gen, c, head_dim, gain=gains[h]), 0)
        mlp.fc1.weight[:, :c] = _zero_sum(_random(gen, mlp.fc1.out_features, c), 1)
        mlp.fc2.weight[:c] = _zero_sum(_random(gen, c, mlp.fc1.out_features, gain=0.3), 0)
    final = model.final_layer_norm
    final.weight.zero_()
    final.bias.zero_()
    final.weight[:c] = 1.0


def _balance_positions_(pos: torch.Tensor) -> None:
    """Position rows as (x, -x) with |x| fixed: zero sum and one norm, so the layer norms' mean and
    variance are the same at every position and the word dims carry no trace of where a token is."""
    half = POSITION // 2
    x = (pos[:, CONTENT:CONTENT + half] - pos[:, CONTENT + half:]) / 2
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(half)
    pos[:, CONTENT:] = torch.cat([x, -x], 1)


def _targets(n: int, heads: int) -> list[torch.Tensor]:
    """Per layer, (heads, n): the key each head's query should attend to, OFFSETS back (layer 1) or
    the token itself (layer 2), the first token at most."""
    i = torch.arange(n)
    return [torch.stack([(i - d).clamp(min=0) for d in offsets]) for offsets in (OFFSETS, (0,) * heads)]


def _target_weights(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, (batch, heads, n): the attention weight each query puts on its target key."""
    out = model(ids, output_attentions=True)
    wanted = _targets(ids.shape[1], model.config.num_attention_heads)
    return [a.gather(-1, t[None, :, :, None].expand(len(ids), -1, -1, 1)) for a, t in zip(out.attentions, wanted)]


def fit_attention(model, gen, steps: int = 1200, lr: float = 0.05, batch: int = 16) -> float:
    """Fit position embeddings and the query/key weights on the position dims so that each head
    attends where `_targets` says (random token ids: the weights cannot depend on the words);
    returns `min_target_weight`."""
    c, hidden = CONTENT, model.config.hidden_size
    n = model.config.max_position_embeddings
    pos = model.embeddings.position_embedding.weight
    with torch.no_grad():
        angles = torch.arange(n)[:, None] * (math.pi / 2 ** torch.arange(POSITION // 4))[None]
        pos.zero_()
        pos[:, c:c + POSITION // 2] = torch.cat([angles.cos(), angles.sin()], 1)
        _balance_positions_(pos)
        for layer in model.encoder.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                lin.weight[:, c:] = _random(gen, hidden, POSITION, gain=2.0)
    params = [pos] + [lin.weight for layer in model.encoder.layers
                      for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj)]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, n), generator=gen)
        loss = -sum(w.clamp_min(1e-12).log().mean() for w in _target_weights(model, ids))
        opt.zero_grad()
        loss.backward()
        for p in params:
            p.grad[:, :c] = 0                     # the word dims stay out of positions, queries and keys
        opt.step()
        with torch.no_grad():
            _balance_positions_(pos)
    model.requires_grad_(False)
    return min_target_weight(model, gen)


@torch.no_grad()
def min_target_weight(model, gen, batch: int = 16) -> float:
    """The smallest attention weight any head puts on its target, over random token ids."""
    ids = torch.randint(0, model.config.vocab_size, (batch, model.config.max_position_embeddings), generator=gen)
    return min(float(w.min()) for w in _target_weights(model, ids))


def build(config: dict, seed: int):
    """The encoder for `config` (a CLIPTextConfig dict with hidden_size CONTENT + POSITION and
    len(OFFSETS) heads), built from `seed`."""
    from transformers import CLIPTextConfig, CLIPTextModel
    assert config["hidden_size"] == CONTENT + POSITION and config["num_attention_heads"] == len(OFFSETS)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**config, attn_implementation="eager")).eval()
    _set_content_weights(model, gen)
    fit_attention(model, gen)
    return model


@torch.no_grad()
def prefix_change(model, tokenizer, caption: str, prefix: str) -> list[tuple[str, float]]:
    """For each token of `caption`: how much its output state changes (relative norm) when `prefix`
    goes in front. The measure of what this encoder is built for."""
    ids = tokenizer([caption, prefix + caption], return_tensors="pt", padding="max_length",
                    max_length=tokenizer.model_max_length).input_ids
    out = model(ids)[0]
    k = len(tokenizer(caption).input_ids) - 1
    shift = len(tokenizer(prefix + caption).input_ids) - 1 - k
    words = tokenizer.convert_ids_to_tokens(ids[0, 1:k])
    a, b = out[0, 1:k], out[1, 1 + shift:k + shift]
    return [(w, float((x - y).norm() / x.norm())) for w, x, y in zip(words, a, b)]
