"""What the UNet is conditioned on: caption embeddings (SD1/SD2/SDXL) and SDXL's size/crop ids.

SD1/SD2: the text encoder's last hidden state (or the `clip_skip`-th last, re-normalised, as A1111
and kohya do). SDXL: both encoders' penultimate hidden states concatenated, plus text_encoder_2's
pooled projection and the six "time ids" (original size, crop top-left, target size).
"""
from __future__ import annotations

import torch


def _final_norm(te):
    inner = getattr(te, "text_model", te)      # transformers 5 CLIPTextModel has no text_model level
    return inner.final_layer_norm


def tokenize(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_captions(family: str, tokenizers, text_encoders: list, captions: list[str], clip_skip: int = 1):
    """(context [B, 77, D], pooled [B, P] or None) for a list of captions."""
    device = text_encoders[0].device
    if family == "sdxl":
        hidden, pooled = [], None
        for tok, te in zip(tokenizers, text_encoders):
            out = te(tokenize(tok, captions, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds
        return torch.cat(hidden, dim=-1), pooled
    te = text_encoders[0]
    ids = tokenize(tokenizers[0], captions, device)
    if clip_skip > 1:
        out = te(ids, output_hidden_states=True)
        return _final_norm(te)(out.hidden_states[-clip_skip]), None
    return te(ids).last_hidden_state, None


def sdxl_time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def count_truncated(tokenizer, captions) -> int:
    """How many captions are longer than the tokenizer's 75-token window (their tail is cut)."""
    limit = tokenizer.model_max_length
    return sum(len(tokenizer(c, truncation=False).input_ids) > limit for c in set(captions))
