"""`sdlora ui`: the browser UI (Generate, Mix, Train, Library).

    sdlora ui [--base SPEC] [--loras DIR] [--outputs DIR] [--data-root DIR] [--port 7860] [--listen]
              [--auth USER:PASS] [--device cuda] [--dtype float16]

Binds to 127.0.0.1 (`--listen`: every interface), never opens a public share link, loads the
embedded tiny model when no --base is given, and prints the URL. Every button calls the library
functions the CLI commands call; see ui/jobs.py for how training runs beside generation.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

CSS_PATH = Path(__file__).with_name("style.css")
MAX_UPLOAD = "50mb"          # per file (gradio refuses bigger uploads before they reach a handler)
CATALOG_POLL_S = 2.0         # how often a page looks for new LoRA files (training outputs, saved mixes)
TRAIN_POLL_S = 1.0


def build_app(ctx):
    """The Blocks of the whole UI for one UiContext."""
    import gradio as gr

    from sdlora.ui import generate_tab, library_tab, mix_tab, train_tab
    from sdlora.ui.common import status_html

    with gr.Blocks(title="sdlora", analytics_enabled=False) as demo:
        gr.HTML(f'<div class="sdl-header"><h1>sdlora</h1><span class="sdl-sub">base model: '
                f'{_escape(ctx.describe_base())} · LoRAs: {_escape(str(ctx.loras_dir))} · outputs: '
                f'{_escape(str(ctx.outputs_dir))}</span></div>', js_on_load=None, elem_id="sdl-header")
        catalog_timer = gr.Timer(CATALOG_POLL_S)
        train_timer = gr.Timer(TRAIN_POLL_S)
        with gr.Tabs(elem_id="sdl-tabs"):
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                gen = generate_tab.build(ctx)
            with gr.Tab("Mix", id="mix", elem_id="tab-mix"):
                mix = mix_tab.build(ctx)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab.build(ctx, train_timer)
            with gr.Tab("Library", id="library", elem_id="tab-library"):
                lib = library_tab.build(ctx, gen)

        # new or changed LoRA files reach every picker of every open page without a restart
        seen_catalog = gr.State(None)
        pickers = [gen["picker"], *mix["pickers"]]

        def refresh(seen, query):
            sig = ctx.catalog.signature()
            if sig == seen:
                return [gr.skip()] * (len(pickers) + 1) + [seen]
            names = ctx.catalog.names(ctx.family)
            return [gr.update(choices=names) for _ in pickers] + [library_tab.cards_html(ctx, query), sig]

        catalog_timer.tick(refresh, [seen_catalog, lib["query"]], [*pickers, lib["cards"], seen_catalog],
                           show_progress="hidden", concurrency_limit=None)
        # a page opened (or reloaded) while a training runs shows it at once
        demo.load(train["view"], train["seen"], train["outs"], show_progress="hidden")
        # ... with the form it was started with, so Resume (or a restart) works without retyping
        demo.load(train["refill"], None, train["form"], show_progress="hidden")
        demo.load(lambda: status_html(""), None, gen["status"], show_progress="hidden")
    return demo


def _escape(text: str) -> str:
    import html
    return html.escape(text)


def theme():
    """The default theme with system fonts: the page loads nothing from the internet."""
    import gradio as gr
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])


def launch(demo, ctx, *, host: str = "127.0.0.1", port: int = 7860, auth: tuple[str, str] | None = None,
           block: bool = True):
    """Start the server (queue for long events, no share link); returns the local URL."""
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=False, auth=auth, inbrowser=False,
                            prevent_thread_lock=True, quiet=True, show_error=True, max_file_size=MAX_UPLOAD,
                            allowed_paths=[str(ctx.outputs_dir)], theme=theme(), css_paths=[CSS_PATH],
                            footer_links=["api", "settings"], run_history=False, mcp_server=False, ssr_mode=False,
                            enable_monitoring=False)
    return url


def server_name(listen: bool) -> str:
    """127.0.0.1 unless the user asked to be reachable from other machines."""
    return "0.0.0.0" if listen else "127.0.0.1"


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth {text!r}: expected USER:PASS (both non-empty)")
    return user, password


def add_arguments(parser, name: str = "ui") -> None:
    parser.add_argument("--base", default=None, metavar="SPEC",
                        help="base model: a diffusers folder, a .safetensors/.ckpt checkpoint or a hub id "
                             "(default: the embedded tiny model)")
    parser.add_argument("--loras", default="loras", metavar="DIR",
                        help="LoRA folder: pickers, <lora:NAME> tags, trained and mixed LoRAs (default: ./loras)")
    parser.add_argument("--outputs", default="outputs", metavar="DIR",
                        help="where images, grids, uploads and training work folders go (default: ./outputs)")
    parser.add_argument("--data-root", action="append", default=[], metavar="DIR",
                        help="a folder the page may train from (repeatable; the outputs folder always is; "
                             "default adds the shipped sample style folders)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--listen", action="store_true",
                        help="listen on every network interface (0.0.0.0) instead of 127.0.0.1 only")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="ask for this user name and password")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="dtype of the generation model (default: float16 on CUDA, float32 on CPU)")
    from sdlora.generate import add_base_precision_argument
    add_base_precision_argument(parser)


def run(args) -> int:
    import time

    import torch

    from sdlora.ui.context import UiContext
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    auth = parse_auth(args.auth)
    ctx = UiContext(base=args.base, loras=args.loras, outputs=args.outputs, data_roots=args.data_root,
                    device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                    base_precision=args.base_precision)
    print(f"loading the base model {args.base or '(embedded tiny model)'} ...", flush=True)
    print(f"base model: {ctx.describe_base()}", flush=True)
    demo = build_app(ctx)
    url = launch(demo, ctx, host=server_name(args.listen), port=args.port, auth=auth)
    shown = url.replace("0.0.0.0", "127.0.0.1") if url else f"http://127.0.0.1:{args.port}/"
    print(f"sdlora UI running at {shown}" + (" (listening on every interface)" if args.listen else ""), flush=True)
    if args.listen and not auth:
        print("warning: --listen without --auth: anyone who can reach this machine can use the UI, train and "
              "write files into the output and LoRA folders", file=sys.stderr, flush=True)
    print("press Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping: a running training saves a checkpoint first ...", file=sys.stderr, flush=True)
        ctx.jobs.shutdown()
        demo.close()
    return 0
