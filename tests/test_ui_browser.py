"""The UI end to end in a real browser: Debian's chromium driven by playwright, against the app
started on 127.0.0.1 with the tiny base model. Screenshots of every tab go to
test-output/screenshots/.

chromium missing is a failure (CI installs it: `apt-get install -y chromium`); set
SDLORA_SKIP_BROWSER_TESTS=1 to skip these tests on a machine without it.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdlora.formats import read_lora
from sdlora.hashes import addnet_hash
from sdlora.infotext import read_png
from tiny import base_spec
from loras import write_lora, write_sdxl_lora

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "test-output" / "screenshots"
NEON = REPO / "sample_data" / "styles" / "neon"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WAIT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> list[str]:
    """Local IPv4/IPv6 addresses (hex, as in /proc/net/tcp*) listening on `port`; [] without /proc."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.partition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.append(addr)
    return sorted(set(found))


def _no_browser(reason: str):
    if os.environ.get("SDLORA_SKIP_BROWSER_TESTS") == "1":
        pytest.skip(f"{reason} (SDLORA_SKIP_BROWSER_TESTS=1)")
    pytest.fail(f"{reason}: install Debian's chromium (apt-get install -y chromium) and PyPI playwright, or set "
                "SDLORA_SKIP_BROWSER_TESTS=1 to skip the browser tests")


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium")
    if exe is None:
        _no_browser("chromium not found on PATH")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("the playwright package is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from sdlora.ui.app import build_app, launch
    from sdlora.ui.context import UiContext
    root = tmp_path_factory.mktemp("ui-e2e")
    ctx = UiContext(base=base_spec(), loras=root / "loras", outputs=root / "outputs", device="cpu")
    configs = ctx.component_configs()
    write_lora(ctx.loras_dir / "style.safetensors", ctx.family, configs, seed=1,
               metadata={"modelspec.trigger_phrase": "neonstyle"})
    write_lora(ctx.loras_dir / "style2.safetensors", ctx.family, configs, seed=2)
    write_sdxl_lora(ctx.loras_dir / "xl_style.safetensors")
    shutil.copy(NEON / "neon_00.png", ctx.loras_dir / "style.png")           # a preview for the card
    demo = build_app(ctx)
    url = launch(demo, ctx, port=_free_port())
    assert url.startswith("http://127.0.0.1:")
    yield ctx, url
    ctx.jobs.shutdown(30)
    demo.close()


@pytest.fixture
def page(browser, app):
    _, url = app
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    pg.goto(url)
    pg.wait_for_selector("#gen-prompt textarea")
    yield pg
    context.close()


def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def images_loaded(page, selector, n=1):
    """Wait until `n` images under `selector` are decoded (not just in the DOM; galleries load lazily,
    so the element is scrolled into view first)."""
    page.locator(selector).scroll_into_view_if_needed()
    page.wait_for_function(f"[...document.querySelectorAll('{selector} img')].filter(i => i.complete && "
                           f"i.naturalWidth > 0).length >= {n}")


def tab(page, name):
    page.get_by_role("tab", name=name).click()


def close_lists(page):
    """Close an open dropdown list and wait until it is gone (the next dropdown must not see its options)."""
    page.keyboard.press("Escape")
    page.wait_for_function("document.querySelectorAll('[role=option]').length === 0")


def pick(page, selector, name):
    """Choose `name` in a gradio dropdown and check that it was chosen.

    The list filters as keys arrive; clicking before it has caught up with the last key can hit a row
    that moves under the pointer (typing "style2" once chose "style" on a loaded machine), so the click
    waits until every offered option contains the typed text.
    """
    box = page.locator(f"{selector} input").first
    for _ in range(3):
        box.click()
        box.fill("")
        page.keyboard.type(name)
        page.wait_for_function(
            "(t) => { const o = [...document.querySelectorAll('[role=option]')];"
            " return o.length > 0 && o.every(e => e.textContent.includes(t)); }", arg=name)
        page.get_by_role("option", name=name, exact=True).click()
        close_lists(page)
        if box.input_value() == name or name in page.inner_text(selector).split():
            return
    raise AssertionError(f"{selector}: could not choose {name!r}; it shows {box.input_value()!r}")


def options(page, selector, text, expect: str) -> list[str]:
    """The dropdown's options matching `text` once `expect` is among them (or after 3 s)."""
    page.click(f"{selector} input")
    page.keyboard.type(text)
    try:
        page.get_by_role("option", name=expect, exact=True).wait_for(timeout=3000)
    except Exception:  # noqa: BLE001 - not offered (yet)
        pass
    found = page.get_by_role("option").all_inner_texts()
    page.locator(f"{selector} input").fill("")
    close_lists(page)
    return [o.strip() for o in found]


def fill(page, selector, value):
    """Type into a gradio textbox (an <input> or a <textarea>, depending on its lines)."""
    page.locator(f"{selector} textarea, {selector} input").first.fill(str(value))


def set_number(page, selector, value):
    box = page.locator(f"{selector} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def status(page, selector, kind="ok"):
    page.wait_for_selector(f"{selector} .sdl-ok, {selector} .sdl-error")
    text = page.inner_text(selector)
    assert page.locator(f"{selector} .sdl-{kind}").count() == 1, text
    return text


# ---------------------------------------------------------------------------------------------

def test_generate_with_a_lora_and_reuse_parameters(page, app):
    ctx, _ = app
    page.fill("#gen-prompt textarea", "a red circle on a blue background")
    pick(page, "#gen-loras", "style")
    offered = options(page, "#gen-loras", "style", expect="style2")
    assert "style2" in offered and "xl_style" not in offered                # wrong family: not offered
    set_number(page, "#gen-slot-0-unet", 0.7)
    set_number(page, "#gen-slot-0-te", 0.4)
    set_number(page, "#gen-steps", 4)
    fill(page, "#gen-seed", "5")
    page.click("#gen-go")
    text = status(page, "#gen-status")
    assert "seed used: 5" in text
    infotext = page.input_value("#gen-infotext textarea")
    h = addnet_hash(ctx.loras_dir / "style.safetensors")[:12]
    assert infotext.startswith("a red circle on a blue background <lora:style:0.4:0.7>")
    assert f'Lora hashes: "style: {h}"' in infotext and "Seed: 5" in infotext and "Steps: 4" in infotext
    images_loaded(page, "#gen-gallery")
    pngs = sorted((ctx.outputs_dir / "txt2img").rglob("*-5.png"))
    assert pngs, "the image was not saved"
    assert read_png(pngs[-1]).build() == infotext
    shot(page, "generate")

    # reuse parameters from the dropped PNG
    page.fill("#gen-prompt textarea", "something else")
    fill(page, "#gen-seed", "-1")
    page.click("#gen-reuse-box")
    page.set_input_files("#gen-png input[type=file]", str(pngs[-1]))
    page.wait_for_function("document.querySelector('#gen-paste textarea').value.includes('Lora hashes')")
    page.click("#gen-reuse")
    page.wait_for_function("document.querySelector('#gen-prompt textarea').value.includes('<lora:style:0.4:0.7>')")
    assert page.input_value("#gen-seed input") == "5"
    assert page.input_value("#gen-steps input[type=number]") == "4"
    shot(page, "generate-reuse")


def test_compare_mixes_grid(page, app):
    """Generate tab, "Compare LoRA mixes": one routed batch, the labelled grid then each cell."""
    ctx, _ = app
    page.fill("#gen-prompt textarea", "a red circle")
    set_number(page, "#gen-steps", 3)
    fill(page, "#gen-seed", "9")
    page.click("#gen-compare-box")
    fill(page, "#gen-compare-mixes", "<lora:style:1>\n\n<lora:style2:-0.5>")
    page.click("#gen-compare")
    page.wait_for_function("document.querySelector('#gen-status').innerText.includes('compared 3 mixes')")
    assert "seed used: 9" in status(page, "#gen-status")
    assert page.input_value("#gen-infotext textarea").startswith("Compare 3 LoRA mixes, seed 9")
    images_loaded(page, "#gen-gallery", 4)
    cells = sorted((ctx.outputs_dir / "compare").rglob("*-9.png"))
    assert len(cells) == 4 and read_png(cells[0]).prompt == "a red circle <lora:style:1>"
    shot(page, "generate-compare")


def test_library_cards_and_wrong_family(page, app):
    tab(page, "Library")
    page.wait_for_selector('[data-lora="xl_style"]')
    assert "does not fit" in page.inner_text('[data-lora="xl_style"]')
    assert page.locator('[data-lora="style"] img').count() == 1                   # the preview
    page.click('[data-lora="xl_style"] [data-action="add"]')
    assert "SDXL" in status(page, "#lib-status", "error")
    page.click('[data-lora="style"] [data-action="inspect"]')
    page.wait_for_function("document.querySelector('#lib-meta').innerText.includes('neonstyle')")
    shot(page, "library")
    page.click('[data-lora="style"] .sdl-thumb')                                   # click the card itself
    page.wait_for_function("document.querySelector('#lib-status').innerText.includes('added')")
    tab(page, "Generate")
    assert page.input_value("#gen-prompt textarea") == "<lora:style:1>, neonstyle"
    # the wrong-family LoRA typed as a tag: refused with the reason, in the page
    page.fill("#gen-prompt textarea", "a red circle <lora:xl_style:1>")
    set_number(page, "#gen-steps", 2)
    page.click("#gen-go")
    text = status(page, "#gen-status", "error")
    assert "SDXL" in text and "SD1" in text
    shot(page, "generate-wrong-family")


def test_train_from_an_upload(page, app):
    ctx, _ = app
    tab(page, "Train")
    page.get_by_label("upload").check()
    files = [str(p) for p in sorted(NEON.glob("neon_0[0-3].*"))]                 # 4 images + 4 captions
    page.set_input_files("#train-upload input[type=file]", files)
    page.wait_for_function(r"document.querySelector('#train-upload').innerText.replace(/\s+/g, '').includes('neon_03.txt')")
    fill(page, "#train-name", "uitrained")
    fill(page, "#train-trigger", "neonstyle")
    set_number(page, "#train-steps", 4)
    page.click("#train-advanced")
    set_number(page, "#train-batch-size", 2)
    set_number(page, "#train-lr-warmup-steps", 0)
    set_number(page, "#train-sample-every", 2)
    set_number(page, "#train-sample-steps", 2)
    page.click("#train-start")
    page.wait_for_selector('#train-progress [data-status="done"], #train-progress [data-status="failed"]')
    assert page.locator('#train-progress [data-status="done"]').count() == 1, page.inner_text("#train-progress")
    assert "step 4/4" in page.inner_text("#train-progress")
    images_loaded(page, "#train-samples", 2)
    page.wait_for_function("document.querySelector('#train-loss').innerText.includes('smoothed loss')")  # legend: data drawn
    log_at_end = ("(() => { const t = document.querySelector('#train-log textarea');"
                  " return t.scrollHeight > t.clientHeight && t.scrollTop + t.clientHeight >= t.scrollHeight - 2; })()")
    page.wait_for_function(log_at_end, timeout=10_000)                         # the newest log line is in view
    out = ctx.loras_dir / "uitrained.safetensors"
    assert read_lora(out, family=ctx.family, configs=ctx.component_configs()).family == ctx.family
    assert len(list((ctx.outputs_dir / "train-data").glob("uitrained*/*"))) == 8
    shot(page, "train")
    page.reload()                              # a reopened page shows the job with the form it was started with
    page.wait_for_selector("#gen-prompt textarea")
    tab(page, "Train")
    page.wait_for_function("document.querySelector('#train-name input, #train-name textarea').value === 'uitrained'")
    assert page.input_value("#train-trigger input, #train-trigger textarea") == "neonstyle"
    assert page.input_value("#train-steps input[type=number]") == "4"
    assert page.is_checked("#train-source input[value=upload]")
    tab(page, "Generate")                      # the new LoRA is offered without a restart
    deadline = time.time() + 30
    while "uitrained" not in (offered := options(page, "#gen-loras", "uitr", expect="uitrained")) \
            and time.time() < deadline:
        pass
    assert "uitrained" in offered


def test_mix_preview_grid_and_save(page, app):
    ctx, _ = app
    tab(page, "Mix")
    pick(page, "#mix-lora-0", "style")
    pick(page, "#mix-lora-1", "style2")
    set_number(page, "#mix-weight-1", -0.5)
    page.fill("#mix-prompt textarea", "a red circle")
    set_number(page, "#mix-steps", 3)
    page.click("#mix-preview")
    assert "preview with seed 1" in status(page, "#mix-status")
    images_loaded(page, "#mix-image")          # the 64 px preview is scaled to the panel, as Generate does
    size = page.evaluate("(() => { const i = document.querySelector('#mix-image img');"
                         " return [i.naturalWidth, i.getBoundingClientRect().width, i.getBoundingClientRect().height]; })()")
    assert size[0] == 64 and max(size[1], size[2]) >= 4 * size[0], size
    assert "<lora:style2:-0.5>" in page.input_value("#mix-infotext textarea")
    page.click("#mix-grid")
    page.wait_for_function("document.querySelector('#mix-status').innerText.includes('XY grid of 6')")
    images_loaded(page, "#mix-image")
    shot(page, "mix")
    fill(page, "#mix-name", "uimix")
    page.click("#mix-save")
    page.wait_for_function("document.querySelector('#mix-status').innerText.includes('uimix')")
    assert "exact merge" in status(page, "#mix-status")
    out = ctx.loras_dir / "uimix.safetensors"
    assert read_lora(out, family=ctx.family, configs=ctx.component_configs()).family == ctx.family
    page.click("#mix-save")                    # the same name again: refused, visibly
    page.wait_for_function("document.querySelector('#mix-status').innerText.includes('already exists')")


def test_sdlora_ui_command(tmp_path):
    """`sdlora ui` loads the base, binds 127.0.0.1, asks for --auth, prints the URL, stops cleanly on Ctrl-C."""
    import http.cookiejar
    import urllib.error
    import urllib.parse
    port = _free_port()
    cmd = [sys.executable, "-m", "sdlora.cli", "ui", "--port", str(port), "--loras", str(tmp_path / "loras"),
           "--outputs", str(tmp_path / "outputs"), "--auth", "me:s3cret"]
    spec = base_spec()
    if spec:
        cmd += ["--base", spec]
    # Ctrl-C as in a terminal: a test run started in the background (`cmd &`, nohup) inherits SIGINT
    # ignored, and a child keeps that (POSIX), so the SIGINT below would do nothing
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url, lines = None, []
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"running at (\S+)", line)
            if m:
                url = m[1]
                break
        assert url == f"http://127.0.0.1:{port}/", "".join(lines)
        assert _listening_addresses(port) in ([], ["0100007F"])        # loopback only (or no /proc to tell)
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(f"{url}gradio_api/login_check", timeout=30)
        assert err.value.code == 401
        for password, ok in [("wrong", False), ("s3cret", True)]:
            form = urllib.parse.urlencode({"username": "me", "password": password}).encode()
            try:
                with opener.open(f"{url}login", data=form, timeout=30) as r:
                    assert ok and r.status == 200
            except urllib.error.HTTPError as e:
                assert not ok and e.code == 400
        with opener.open(f"{url}gradio_api/login_check", timeout=30) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_only_outputs_are_served(app):
    """gradio serves generated images (the outputs folder) but no LoRA, no repository file, nothing else."""
    import urllib.error
    ctx, url = app
    pngs = sorted(ctx.outputs_dir.rglob("*.png"))
    assert pngs, "run after a generation test"
    with urllib.request.urlopen(f"{url}gradio_api/file={pngs[0]}", timeout=30) as r:
        assert r.status == 200
    for path in ["/etc/hostname", ctx.loras_dir / "style.safetensors", REPO / "pyproject.toml", Path.cwd() / "x.png"]:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}gradio_api/file={path}", timeout=30)
        assert err.value.code in (403, 404), path
