"""The embedded base's text encoder: a CLIPTextModel whose attention is set by construction.

Why: a style LoRA's prompts start with its trigger word ("toonstyle, a red circle ..."), a word the
base has never seen. In a frozen *random* CLIP encoder every token attends to every earlier token,
so such a word changes the state of every later token, and the base measured here lost half its
colour and most of its shape after one ("zqx, "). Real SD gets its robustness from CLIP's training
on 400M captions; a 2-core CPU cannot do that, so this encoder is built to have it:

  * hidden = word dims | two marker dims | position dims. Token embeddings (seeded random, zero-sum,
    all of one norm) live in the word dims, the start and end tokens also carry a marker, position
    embeddings live in the position dims.
  * layer 1's first three heads read only the position dims for queries and keys, and those weights
    are fitted (`fit_attention`, seconds) so that they attend to the token itself, the one before and
    the one two before; every head of layer 2 attends to the token itself. A word's state is a fixed
    mix of itself and the two words before it ("circle" carries "red", "background" carries "blue"
    and "on"): colour/shape/background binding, and a word three or more places back cannot change it.
  * layer 1's last head reads only the markers (`_set_summary_head`): words attend to the start
    token (a constant), and the end/padding tokens, ~70 of the 77, to the mean of all words before
    them. So the caption reaches most of the UNet's cross-attention keys, as in real SD; a word in
    front only adds one term to that mean.
  * values, outputs and MLPs read and write the word dims only (seeded random, zero-sum so the
    layer norms' means stay independent of the words); the final layer norm drops the marker and
    position dims, so the output depends on the words around a token, not on where the caption starts.

`prefix_change` measures it: a prefix changes the first two caption words' states and the padding
tokens' mean, nothing else (tests/test_text_encoder.py). It is a genuine CLIPTextModel (SD1.5's
modules and names at width 64), so LoRAs, clip skip and fp16 work on it as on any CLIP encoder;
the UNet is trained on it frozen.
"""
from __future__ import annotations

import math

import torch

CONTENT, MARKERS, POSITION = 46, 2, 16    # hidden dims: words | start/end-of-text markers | position
BOS_ID, EOS_ID = 49406, 49407              # CLIP's start and end (= padding) tokens
OFFSETS = (0, 1, 2)       # layer 1's first heads: the token itself, the one before, the one two before
SUMMARY = 3               # layer 1's last head: the end-of-text (padding) tokens average the words
MARKER = 4.0              # the markers' value in the embeddings of BOS and EOS


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
    emb.token_embedding.weight[BOS_ID, c] = MARKER
    emb.token_embedding.weight[EOS_ID, c + 1] = MARKER
    heads = model.config.num_attention_heads
    head_dim = hidden // heads
    for li, layer in enumerate(model.encoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        # values read the word dims; each head's output is written back into them. Gains: the word
        # before and the one before that come in at about 0.6 and 0.45 of a word's own norm; the
        # summary (a mean of n words has about 1/sqrt(n) of a word's norm) at about twice a word's norm.
        gains = (0.3, 0.6, 0.45, 5.0) if li == 0 else (0.25,) * heads
        for h in range(heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            attn.v_proj.weight[rows, :c] = _zero_sum(_random(gen, head_dim, c), 1)
            attn.out_proj.weight[:c, rows] = _zero_sum(_random(gen, c, head_dim, gain=gains[h]), 0)
        mlp.fc1.weight[:, :c] = _zero_sum(_random(gen, mlp.fc1.out_features, c), 1)
        mlp.fc2.weight[:c] = _zero_sum(_random(gen, c, mlp.fc1.out_features, gain=0.3), 0)
    _set_summary_head(model.encoder.layers[0].self_attn, head_dim)
    final = model.final_layer_norm
    final.weight.zero_()
    final.bias.zero_()
    final.weight[:c] = 1.0


@torch.no_grad()
def _set_summary_head(attn, head_dim: int, strength: float = 10.0) -> None:
    """Layer 1's SUMMARY head reads only the two markers: a word's query goes to the start token (a
    constant, so words stay independent of what precedes them); an end/padding token's query goes
    evenly to every word before it and to neither marker. So the ~70 padding tokens each carry the
    mean of the words (in SD the padding states carry the caption too), and a word in front of the
    caption only dilutes that mean. Scores reach +-strength^2 / 4 = 25: sharp, and safe in fp16."""
    bos, eos = CONTENT, CONTENT + 1
    # a marker's value after layer norm 1 (the embedding's norms are fixed, so this is exact)
    hidden = attn.q_proj.in_features
    words_sq = CONTENT + POSITION // 2 * 2          # |word|^2 + |position|^2
    mean = MARKER / hidden
    unit = (MARKER - mean) / math.sqrt((words_sq + MARKER ** 2) / hidden - mean ** 2)
    q, k = attn.q_proj, attn.k_proj
    r = SUMMARY * head_dim
    q.bias[r] = strength                            # words: query 1 on the "is the start token" key
    q.weight[r, eos] = -strength / unit             # end tokens: 0 there
    q.weight[r + 1, eos] = strength / unit          # end tokens: query 1 on the "is a marker" key
    k.weight[r, bos] = strength / unit
    k.weight[r + 1, bos] = k.weight[r + 1, eos] = -strength / unit


def _balance_positions_(pos: torch.Tensor) -> None:
    """Position rows as (x, -x) with |x| fixed: zero sum and one norm, so the layer norms' mean and
    variance are the same at every position and the word dims carry no trace of where a token is."""
    start, half = CONTENT + MARKERS, POSITION // 2
    x = (pos[:, start:start + half] - pos[:, start + half:]) / 2
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(half)
    pos[:, start:] = torch.cat([x, -x], 1)


def _wanted(n: int, heads: int) -> list[tuple[list[int], torch.Tensor]]:
    """Per layer: (the heads fitted to attend a fixed offset back, the key index for each query)."""
    i = torch.arange(n)
    back = lambda offsets: torch.stack([(i - d).clamp(min=0) for d in offsets])  # noqa: E731
    return [(list(range(len(OFFSETS))), back(OFFSETS)), (list(range(heads)), back((0,) * heads))]


def _captions(gen, batch: int, n: int) -> torch.Tensor:
    """Token ids shaped like the tokenizer's: start token, 1-30 random words, end tokens to the end."""
    ids = torch.randint(0, BOS_ID, (batch, n), generator=gen)
    ids[:, 0] = BOS_ID
    ends = torch.randint(2, 32, (batch, 1), generator=gen)
    ids[torch.arange(n)[None] >= ends] = EOS_ID
    return ids


def _offset_loss(model, ids, wanted) -> torch.Tensor:
    out = model(ids, output_attentions=True)
    loss = 0.0
    for attn, (heads, target) in zip(out.attentions, wanted):
        attn = attn[:, heads]
        picked = attn.gather(-1, target[None, :, :, None].expand(len(ids), -1, -1, 1))
        loss = loss - picked.clamp_min(1e-12).log().mean()
    return loss


def fit_attention(model, gen, steps: int = 1200, lr: float = 0.05, batch: int = 16) -> float:
    """Fit position embeddings and the query/key weights on the position dims so that the offset
    heads attend where `_wanted` says; returns the smallest attention weight on a target (~1)."""
    start, hidden = CONTENT + MARKERS, model.config.hidden_size
    n = model.config.max_position_embeddings
    heads = model.config.num_attention_heads
    head_dim = hidden // heads
    layers = model.encoder.layers
    wanted = _wanted(n, heads)
    pos = model.embeddings.position_embedding.weight
    params, masks = [pos], [torch.zeros_like(pos, dtype=torch.bool)]
    masks[0][:, start:] = True
    with torch.no_grad():
        angles = torch.arange(n)[:, None] * (math.pi / 2 ** torch.arange(POSITION // 4))[None]
        pos.zero_()
        pos[:, start:start + POSITION // 2] = torch.cat([angles.cos(), angles.sin()], 1)
        _balance_positions_(pos)
        for layer, (fitted, _) in zip(layers, wanted):
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                mask = torch.zeros_like(lin.weight, dtype=torch.bool)
                for h in fitted:
                    mask[h * head_dim:(h + 1) * head_dim, start:] = True
                lin.weight[mask] = _random(gen, hidden, POSITION, gain=2.0).flatten()[:int(mask.sum())]
                params.append(lin.weight)
                masks.append(mask)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = _offset_loss(model, _captions(gen, batch, n), wanted)
        opt.zero_grad()
        loss.backward()
        for p, m in zip(params, masks):
            p.grad *= m
        opt.step()
        with torch.no_grad():
            _balance_positions_(pos)
    model.requires_grad_(False)
    return min_target_weight(model, gen)


@torch.no_grad()
def min_target_weight(model, gen, batch: int = 16) -> float:
    """The smallest attention weight an offset head puts on its target, over random captions."""
    n, heads = model.config.max_position_embeddings, model.config.num_attention_heads
    out = model(_captions(gen, batch, n), output_attentions=True)
    return min(float(a[:, h].gather(-1, t[None, :, :, None].expand(batch, -1, -1, 1)).min())
               for a, (h, t) in zip(out.attentions, _wanted(n, heads)))


def build(config: dict, seed: int):
    """The encoder for `config` (a CLIPTextConfig dict with hidden_size CONTENT + MARKERS + POSITION
    and 4 heads), built from `seed`."""
    from transformers import CLIPTextConfig, CLIPTextModel
    assert config["hidden_size"] == CONTENT + MARKERS + POSITION and config["num_attention_heads"] == len(OFFSETS) + 1
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
