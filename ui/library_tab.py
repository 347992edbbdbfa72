"""The Library tab: every LoRA of the folder as a card (preview, family, algorithm, rank, alpha,
trigger words, base model, size, hash). Clicking a card adds `<lora:NAME:W>` and its trigger words
to the Generate prompt; a LoRA of another family than the loaded base model carries a badge and is
refused; "metadata" shows what `sdlora inspect` shows.
"""
from __future__ import annotations

import html

import gradio as gr

from sdlora.families import get_family
from sdlora.ui.common import status_html

# clicks anywhere in the card list: the card's name and which button (add / inspect)
CARD_JS = """
element.addEventListener('click', (e) => {
  const card = e.target.closest('[data-lora]');
  if (!card) return;
  const btn = e.target.closest('[data-action]');
  trigger('click', {lora: card.dataset.lora, action: btn ? btn.dataset.action : 'add'});
});
"""


def _spread(s: dict) -> str:
    if not s or s.get("min") is None:
        return "-"
    return f"{s['min']:g}" if s["min"] == s["max"] else f"{s['min']:g}–{s['max']:g}"


def card_html(entry, family: str, thumb: str | None) -> str:
    e = html.escape
    info = entry.info or {}
    fits = entry.fits(family)
    badges = []
    if entry.error:
        badges.append('<span class="sdl-badge sdl-badge-bad">unreadable</span>')
    elif not fits:
        badges.append(f'<span class="sdl-badge sdl-badge-bad" title="{e(entry.misfit_reason(family))}">'
                      f'{e(info.get("family_label", "?"))}: does not fit the loaded {e(get_family(family).label)} '
                      'model</span>')
    else:
        badges.append(f'<span class="sdl-badge">{e(info.get("family_label", ""))}</span>')
    meta = info.get("metadata", {})
    base_model = meta.get("ss_sd_model_name") or meta.get("modelspec.architecture") or "-"
    hashes = info.get("hashes", {})
    rows = [("format", f"{info.get('format', '-')} · {', '.join(info.get('algorithms', [])) or '-'}"),
            ("rank / alpha", f"{_spread(info.get('rank'))} / {_spread(info.get('alpha'))}"),
            ("triggers", ", ".join(entry.prompt_words()[:6]) or "-"),
            ("base model", base_model),
            ("size", f"{entry.size / 1e6:.2f} MB"),
            ("hash", hashes.get("addnet_short") or hashes.get("autov2") or "-")]
    if entry.error:
        rows = [("error", entry.error)]
    picture = f'<img src="{thumb}" alt="">' if thumb else '<div class="sdl-noimg">no preview</div>'
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in rows)
    cls = "sdl-card" + ("" if fits else " sdl-card-misfit")
    return (f'<div class="{cls}" data-lora="{e(entry.name)}" title="click: add to the prompt">'
            f'<div class="sdl-thumb">{picture}</div><div class="sdl-card-body">'
            f'<div class="sdl-card-name">{e(entry.name)}</div>{"".join(badges)}<dl>{dl}</dl>'
            f'<div class="sdl-card-actions"><button class="sdl-add" data-action="add">add to prompt</button>'
            f'<button class="sdl-inspect" data-action="inspect">metadata</button></div></div></div>')


def cards_html(ctx, query: str = "") -> str:
    q = (query or "").strip().lower()
    entries = ctx.catalog.entries()
    shown = [x for x in entries if not q or q in x.name.lower()
             or any(q in w.lower() for w in (x.info or {}).get("trigger_words", []))]
    if not entries:
        return f'<div class="sdl-empty">No LoRA files in {html.escape(str(ctx.loras_dir))} yet.</div>'
    cards = "".join(card_html(x, ctx.family, ctx.catalog.thumbnail(x.preview) if x.preview else None) for x in shown)
    return f'<div class="sdl-cards">{cards or "<div class=sdl-empty>nothing matches</div>"}</div>'


def add_to_prompt(ctx, name: str, prompt: str, weight: float) -> tuple[str, str]:
    """(new prompt, message). A LoRA that does not fit the loaded model is refused (prompt unchanged)."""
    entry = ctx.catalog.get(name)
    if entry is None:
        return prompt, status_html(f"{name} is not in {ctx.loras_dir} any more", "error")
    why = entry.misfit_reason(ctx.family)
    if why:
        return prompt, status_html(why, "error")
    tag = entry.prompt_tag(float(weight))
    text = (prompt or "").rstrip()
    new = f"{text}, {tag}" if text else tag
    return new, status_html(f"added {tag} to the Generate prompt", "ok")


def inspect_view(ctx, name: str) -> dict:
    entry = ctx.catalog.get(name)
    if entry is None:
        return {"error": f"{name} is not in {ctx.loras_dir}"}
    return entry.info or {"path": str(entry.path), "error": entry.error}


def build(ctx, gen: dict):
    with gr.Row():
        query = gr.Textbox(label="Filter", placeholder="name or trigger word", elem_id="lib-filter", scale=3)
        weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="weight of the added tag", elem_id="lib-weight", scale=2)
        rescan = gr.Button("Rescan folder", size="sm", elem_id="lib-rescan", scale=1)
    status = gr.HTML(elem_id="lib-status", js_on_load=None)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            cards = gr.HTML(cards_html(ctx), js_on_load=CARD_JS, elem_id="lib-cards")
        with gr.Column(scale=1, min_width=400):
            meta = gr.JSON(label="Metadata (sdlora inspect)", elem_id="lib-meta", open=True, max_height=700)

    def on_click(evt: gr.EventData, prompt, w):
        name, action = evt.lora, getattr(evt, "action", "add")
        if action == "inspect":
            return gr.skip(), status_html(f"metadata of {name}", "info"), inspect_view(ctx, name)
        new, msg = add_to_prompt(ctx, name, prompt, w)
        return new, msg, gr.skip()

    cards.click(on_click, [gen["prompt"], weight], [gen["prompt"], status, meta], show_progress="hidden")
    query.change(lambda q: cards_html(ctx, q), query, cards, show_progress="hidden")
    rescan.click(lambda q: cards_html(ctx, q), query, cards)
    return dict(cards=cards, query=query, status=status)
