"""The web playground in headless Chromium (Debian's `chromium`, driven by Playwright):
type a prompt, press Generate, watch the text stream in; task mode; the Stop button; chat
mode: a conversation with roles, streamed answers, tokens/s, the system message and
sampling settings, edit-and-resend, stop, clear, code in monospace, a phone-width screen."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_helpers import live_server, make_model_dir, offline

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def find_chromium() -> str | None:
    candidates = [os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]
    return next((path for c in candidates if c and (path := shutil.which(c))), None)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module's pages (Playwright runs one sync instance)."""
    browser_path = find_chromium()
    if browser_path is None:
        reason = "no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/it)"
        print(f"SKIPPED test_playground: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_playground(browser, model_dir: Path) -> Iterator:
    """A page on a live server of `model_dir`, once it shows the model's name; the page
    knows its `model_dir` and `url_base`. For a module fixture to `yield from`."""
    with live_server(model_dir) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function(f"document.getElementById('model').textContent === '{model_dir.name}'")
        page.model_dir, page.url_base = model_dir, url
        yield page
        page.close()


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    from gptkit.tasks import get_task

    # a long context, so that a 1,000-token answer is still running when Stop is pressed
    model_dir = make_model_dir(tmp_path_factory.mktemp("playground") / "tiny", block_size=1024)
    (model_dir / "gptkit_task.json").write_text(json.dumps(get_task("summarize").to_dict()))
    yield from open_playground(browser, model_dir)


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


def press_when_text_appears(page, watched: str, text_js: str, button: str) -> None:
    """Arm the page to click `button` the moment the text that `text_js` evaluates to is
    longer than 5 characters, checked on every change under `watched`: a click sent from
    the test process arrives a round trip late, when a fast machine may have finished."""
    page.evaluate("""([watched, textJs, button]) => {
        const observer = new MutationObserver(() => {
            if (eval(textJs).length > 5) { observer.disconnect(); document.querySelector(button).click(); }
        });
        observer.observe(document.querySelector(watched),
                         {childList: true, subtree: true, characterData: true});
    }""", [watched, text_js, button])


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
    press_when_text_appears(page, "#output", "document.getElementById('output').textContent",
                            "#stop")
    page.click("#generate")
    page.wait_for_function("!document.getElementById('generate').disabled")
    assert len(page.text_content("#output")) < 3 + 1000
    assert page.text_content("#error") == ""
    page.wait_for_function(f"fetch('/health').then(r => r.json()).then(h => h.cancelled > {before})")


# -- chat mode -------------------------------------------------------------------------------

USER_COLOR, ASSISTANT_COLOR = (219, 234, 254), (241, 243, 245)  # the page's --user, --assistant


@pytest.fixture(scope="module")
def chat_page(browser, tmp_path_factory):
    """The playground of a (random) chat model: ChatML tokens and template added, and as
    make_model_dir does for end-of-text, never chosen, so every answer runs to its limit."""
    import torch

    from gptkit import GPT, Tokenizer
    from gptkit.conversation import add_chat_tokens
    from gptkit.vocab import grow_vocab

    model_dir = make_model_dir(tmp_path_factory.mktemp("chat_playground") / "talker", block_size=512)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    model = GPT.from_pretrained(model_dir)
    add_chat_tokens(tokenizer)
    new = range(model.config.vocab_size, tokenizer.vocab_size)
    grow_vocab(model, tokenizer.vocab_size, new)
    with torch.no_grad():
        model.transformer.wte.weight[new.start:] = 0.0
        model.transformer.wte.weight[new.start:, 0] = -100.0
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    yield from open_playground(browser, model_dir)


def greedy_answer(model_dir, messages: list[dict], max_new_tokens: int) -> str:
    """What `gptkit chat` (a `ChatSession`) answers to the last of `messages`."""
    from gptkit import GPT, Tokenizer
    from gptkit.chat import ChatSession

    session = ChatSession(GPT.from_pretrained(model_dir), Tokenizer.from_pretrained(model_dir),
                          max_new_tokens=max_new_tokens)
    session.messages = messages[:-1]
    return session.respond(messages[-1]["content"], lambda piece: None)[0]


def ask(page, text: str) -> dict:
    """Type `text`, press Enter, wait for the whole answer; returns the request's body."""
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(
            document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    answers = page.locator(".message.assistant").count()
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#chat-input", text)
        page.press("#chat-input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.message.assistant .stats').length > {answers}"
                           " && document.querySelectorAll('.message.assistant .stats')"
                           f"[{answers}].textContent !== ''", timeout=60_000)
    return json.loads(request.value.post_data)


def answers(page) -> list[str]:
    return page.locator(".message.assistant .content").all_text_contents()


def test_chat_mode_streams_answers_with_roles_system_message_and_speed(chat_page):
    page = chat_page
    assert page.eval_on_selector("#mode", "m => m.value") == "chat"  # a chat model opens in chat
    assert page.is_visible("#chat-input") and page.is_hidden("#prompt")
    page.fill("#system", "be brief")
    page.fill("#temperature", "0")
    page.fill("#top-p", "0.9")
    page.fill("#max-tokens", "30")
    body = ask(page, "hello")
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hello"}]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["stream"]) == (0, 0.9, 30, True)
    assert answers(page) == [greedy_answer(page.model_dir, body["messages"], 30)]
    assert page.evaluate("window.updates") >= 3  # the answer arrived in pieces
    stats = page.text_content(".message.assistant .stats")
    assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s", stats), stats
    user, assistant = (page.eval_on_selector(f".message.{role}", """m => {
        const s = getComputedStyle(m); return [s.backgroundColor, s.alignSelf]; }""")
        for role in ("user", "assistant"))
    assert user == ["rgb(219, 234, 254)", "flex-end"] and assistant == ["rgb(241, 243, 245)", "flex-start"]
    assert page.text_content(".message.user .role") == "You"
    assert page.text_content(".message.assistant .role") == "talker"
    # a second turn sends the whole history
    body = ask(page, "again")
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert answers(page)[-1] == greedy_answer(page.model_dir, body["messages"], 30)
    assert page.text_content("#error") == ""


def test_edit_and_resend_the_last_user_turn(chat_page):
    page = chat_page
    assert page.locator(".message.user .edit").count() == 1  # only the last user turn
    before = page.locator(".message").count()
    page.click(".message.user .edit")
    page.fill(".edit-input", "changed")
    with page.expect_request("**/v1/chat/completions") as request:
        page.click(".resend")
    page.wait_for_function("!document.getElementById('send').disabled")
    body = json.loads(request.value.post_data)
    assert body["messages"][-1] == {"role": "user", "content": "changed"}
    assert page.locator(".message").count() == before
    assert page.locator(".message.user .content").all_text_contents()[-1] == "changed"
    assert answers(page)[-1] == greedy_answer(page.model_dir, body["messages"], 30)


def test_stop_ends_the_answer_and_clear_empties_the_conversation(chat_page):
    import httpx

    page = chat_page
    cancelled = httpx.get(f"{page.url_base}/health").json()["cancelled"]
    page.click("#chat-clear")
    page.fill("#max-tokens", "400")
    page.fill("#chat-input", "tell me a long story")
    press_when_text_appears(page, "#messages",
                            "(a => a.length ? a[a.length - 1].textContent : '')("
                            "document.querySelectorAll('.message.assistant .content'))", "#chat-stop")
    page.click("#send")
    page.wait_for_function("!document.getElementById('send').disabled")
    stats = page.locator(".message.assistant .stats").last.text_content()
    assert stats.endswith("· stopped") and 5 < int(stats.split()[0]) < 400, stats
    page.wait_for_function(f"fetch('/health').then(r => r.json()).then(h => h.cancelled > {cancelled})")
    page.click("#chat-clear")
    assert page.locator(".message").count() == 0


def test_code_in_monospace_on_a_phone_width_screen(chat_page, tmp_path):
    from io import BytesIO

    from PIL import Image

    page = chat_page
    page.set_viewport_size({"width": 375, "height": 740})
    page.fill("#max-tokens", "60")
    ask(page, "run ```python\nprint(1)\n``` and then `x`")
    assert page.text_content(".message.user pre code") == "print(1)\n"
    assert page.get_attribute(".message.user pre code", "data-language") == "python"
    assert page.text_content(".message.user .content > code") == "x"
    for selector in (".message.user pre code", ".message.user .content > code"):
        assert "monospace" in page.eval_on_selector(selector, "c => getComputedStyle(c).fontFamily")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
    assert page.is_visible("#send") and page.is_visible("#chat-input")
    # the screenshot shows the conversation: both bubbles' colours and the code block's
    png = page.screenshot(full_page=True)
    (tmp_path / "chat.png").write_bytes(png)
    if os.environ.get("GPTKIT_SCREENSHOTS"):  # a folder to keep the screenshot in, to look at
        (Path(os.environ["GPTKIT_SCREENSHOTS"]) / "playground-chat-phone.png").write_bytes(png)
    image = Image.open(BytesIO(png)).convert("RGB")
    assert image.width == 375
    colors = {color: count for count, color in image.getcolors(maxcolors=1 << 24)}
    counts = {color: colors.get(color, 0) for color in (USER_COLOR, ASSISTANT_COLOR, (31, 35, 40))}
    assert all(count > 1000 for count in counts.values()), counts
