"""The web playground in headless Chromium (Debian's `chromium`, driven by Playwright):
type a prompt, press Generate, watch the text stream in; task mode; the Stop button."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from serve_helpers import live_server, make_model_dir, offline

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def find_chromium() -> str | None:
    candidates = [os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]
    return next((path for c in candidates if c and (path := shutil.which(c))), None)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    browser_path = find_chromium()
    if browser_path is None:
        reason = "no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/it)"
        print(f"SKIPPED test_playground: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    from gptkit.tasks import get_task

    # a long context, so that a 1,000-token answer is still running when Stop is pressed
    model_dir = make_model_dir(tmp_path_factory.mktemp("playground") / "tiny", block_size=1024)
    (model_dir / "gptkit_task.json").write_text(json.dumps(get_task("summarize").to_dict()))
    with live_server(model_dir) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        page.model_dir, page.url_base = model_dir, url
        yield page
        browser.close()


def generate(page, expected: str) -> int:
    """Press Generate, wait for `expected` in the output; returns at how many moments the
    output changed (mutation callbacks, one per batch of changes)."""
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(
            document.getElementById('output'), {childList: true, subtree: true, characterData: true});
    }""")
    page.click("#generate")
    page.wait_for_function("(text) => document.getElementById('output').textContent === text",
                           arg=expected, timeout=60_000)
    page.wait_for_function("!document.getElementById('generate').disabled")
    return page.evaluate("window.updates")


def test_text_streams_in_for_a_typed_prompt(page):
    page.select_option("#mode", "completion")
    page.fill("#prompt", "hello")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "200")
    updates = generate(page, "hello" + offline(page.model_dir, "hello", 200))
    assert updates >= 2  # the text arrived in pieces, not at once
    assert page.text_content("#error") == ""


def test_task_mode_uses_the_models_template(page):
    from gptkit.tasks import get_task

    assert page.eval_on_selector("#mode", "m => m.value") == "completion"
    page.select_option("#mode", "task")
    assert page.is_hidden("#prompt") and page.is_visible("textarea[data-field=document]")
    page.fill("textarea[data-field=document]", "the lazy dog")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "20")
    prompt = get_task("summarize").format_prompt({"document": "the lazy dog"})
    generate(page, prompt + offline(page.model_dir, prompt, 20))


def test_stop_button_ends_the_stream(page):
    import httpx

    before = httpx.get(f"{page.url_base}/health").json()["cancelled"]
    page.select_option("#mode", "completion")
    page.fill("#prompt", "fox")
    page.fill("#max-tokens", "1000")
    page.click("#generate")
    page.wait_for_function("document.getElementById('output').textContent.length > 5")
    page.click("#stop")
    page.wait_for_function("!document.getElementById('generate').disabled")
    assert len(page.text_content("#output")) < 3 + 1000
    assert page.text_content("#error") == ""
    page.wait_for_function(f"fetch('/health').then(r => r.json()).then(h => h.cancelled > {before})")
