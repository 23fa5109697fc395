"""The web playground in headless Chromium (Debian's `chromium`, driven by Playwright):
type a prompt, press Generate, watch the text stream in; task mode; the Stop button; chat
mode: a conversation with roles, streamed answers, prompt and generation speed, the system
message and sampling settings, edit any turn, regenerate, stop, clear, code in monospace, a
phone-width screen; a long chat on a 128-token model (the oldest turns dropped, not an
error), a failed turn retried, conversations, settings and theme kept across a reload
(export and import too), Markdown rendering with hostile model output."""

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
    """The playground of a (random) chat model whose answers run to their limit."""
    model_dir = make_chat_model(tmp_path_factory.mktemp("chat_playground") / "talker", 512)
    yield from open_playground(browser, model_dir)


def make_chat_model(directory: Path, block_size: int) -> Path:
    """A random chat model: ChatML tokens and template added, and as make_model_dir does for
    end-of-text, never chosen, so every answer runs to its limit."""
    import torch

    from gptkit import GPT, Tokenizer
    from gptkit.conversation import add_chat_tokens
    from gptkit.vocab import grow_vocab

    model_dir = make_model_dir(directory, block_size=block_size)
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
    return model_dir


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
    assert re.fullmatch(r"30 tokens · prompt [\d.]+ tokens/s · generation [\d.]+ tokens/s", stats), stats
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


def test_edit_any_user_turn_and_regenerate_the_last_answer(chat_page):
    """Edit on the first of two user turns goes on from there (what followed it is gone);
    Regenerate asks the same messages again for the last answer."""
    page = chat_page
    assert page.locator(".message.user .edit").count() == 2  # every user turn
    assert page.locator(".message.assistant .regenerate").count() == 1  # the last answer
    page.locator(".message.user .edit").first.click()
    page.fill(".edit-input", "changed")
    with page.expect_request("**/v1/chat/completions") as request:
        page.click(".resend")
    page.wait_for_function("!document.getElementById('send').disabled")
    body = json.loads(request.value.post_data)
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "changed"}]
    assert page.locator(".message").count() == 2
    assert answers(page) == [greedy_answer(page.model_dir, body["messages"], 30)]
    with page.expect_request("**/v1/chat/completions") as again:
        page.click(".message.assistant .regenerate")
    page.wait_for_function("!document.getElementById('send').disabled")
    assert json.loads(again.value.post_data)["messages"] == body["messages"]
    assert page.locator(".message").count() == 2 and len(answers(page)) == 1


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
    ask(page, "run\n```python\nprint(1)\n```\nand then `x`")
    assert page.text_content(".message.user pre code") == "print(1)"
    assert page.get_attribute(".message.user pre code", "data-language") == "python"
    assert page.text_content(".message.user .content p > code") == "x"
    for selector in (".message.user pre code", ".message.user .content p > code"):
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


@pytest.fixture(scope="module")
def small_chat_page(browser, tmp_path_factory):
    """The playground of a chat model with a context of 128 tokens, as the demo's."""
    model_dir = make_chat_model(tmp_path_factory.mktemp("small_chat") / "small", 128)
    yield from open_playground(browser, model_dir)


def test_a_long_chat_on_a_small_model_drops_the_oldest_turns_not_an_error(small_chat_page):
    """Six turns of 32-token answers in a 128-token context: as `gptkit chat` does, the
    oldest exchanges are dropped (shown dimmed, said in the answer's line) and the answer
    is clamped rather than refused."""
    page = small_chat_page
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "32")
    sent = []
    for turn in range(6):
        sent.append(ask(page, f"turn {turn} of a chat"))
        assert page.text_content("#error") == ""
    assert not page.locator(".message.failed").count()
    assert len(sent[-1]["messages"]) < 11 and sent[-1]["messages"][-1]["content"] == "turn 5 of a chat"
    assert page.locator(".message.outside").count() >= 2
    assert "oldest messages to fit the context of 128 tokens" in " ".join(
        page.locator(".message.assistant .stats").all_text_contents())
    expected = greedy_answer(page.model_dir, sent[-1]["messages"], sent[-1]["max_tokens"])
    assert answers(page)[-1] == expected


def test_a_failed_turn_is_not_sent_again_and_can_be_retried(small_chat_page):
    page = small_chat_page
    page.click("#chat-clear")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body=json.dumps({"error": {"message": "The server is busy."}})))
    page.fill("#chat-input", "first try")
    page.press("#chat-input", "Enter")
    page.wait_for_selector(".message.assistant.failed .retry")
    assert page.text_content(".message.assistant.failed .content") == "The server is busy."
    page.unroute("**/v1/chat/completions")
    body = ask(page, "another message")  # the failed turn is not part of it
    assert [m["content"] for m in body["messages"] if m["role"] == "user"] == ["another message"]
    with page.expect_request("**/v1/chat/completions") as request:
        page.click(".message.assistant.failed .retry")
    page.wait_for_function("!document.getElementById('send').disabled")
    retried = json.loads(request.value.post_data)["messages"]
    assert [m["content"] for m in retried if m["role"] == "user"] == ["another message", "first try"]
    assert page.locator(".message.failed").count() == 0


def test_conversations_settings_and_theme_persist_across_reload(small_chat_page, tmp_path):
    """Conversations (with their list: new, rename, delete, export and import as JSON),
    the sampling settings, the system message and the theme are kept in the browser."""
    page = small_chat_page
    page.once("dialog", lambda dialog: dialog.accept("Saved chat"))  # Rename's prompt
    page.click("#chat-new")
    assert page.locator(".message").count() == 0
    for selector, value in (("#temperature", "0"), ("#top-k", "3"), ("#repetition-penalty", "1.2"),
                            ("#max-tokens", "12"), ("#system", "be kind")):
        page.fill(selector, value)
    page.select_option("#theme", "dark")
    body = ask(page, "hello there")
    assert (body["top_k"], body["repetition_penalty"], body["max_tokens"]) == (3, 1.2, 12)
    assert body["messages"][0] == {"role": "system", "content": "be kind"}
    page.click("#chat-list li.current .rename")
    titles = page.locator("#chat-list .title").all_text_contents()
    shown = answers(page)
    stats = page.locator(".message.assistant .stats").all_text_contents()
    gauge = page.text_content("#gauge-text")
    page.reload()
    page.wait_for_function("document.getElementById('model').textContent === 'small'")
    assert page.locator("#chat-list .title").all_text_contents() == titles
    assert page.text_content("#chat-list li.current .title") == "Saved chat"
    assert answers(page) == shown and page.text_content(".message.user .content") == "hello there"
    assert page.locator(".message.assistant .stats").all_text_contents() == stats
    assert page.text_content("#gauge-text") == gauge != "0 / 128 tokens"
    assert [page.input_value(s) for s in ("#temperature", "#top-k", "#repetition-penalty",
                                          "#max-tokens", "#system")] == ["0", "3", "1.2", "12", "be kind"]
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    assert page.eval_on_selector("body", "b => getComputedStyle(b).backgroundColor") == "rgb(13, 17, 23)"
    # export, delete, import: the conversations come back
    with page.expect_download() as download:
        page.click("#chat-export")
    exported = tmp_path / "chats.json"
    download.value.save_as(exported)
    assert [c["title"] for c in json.loads(exported.read_text())] == titles
    page.click("#chat-list li.current .delete")
    assert page.locator("#chat-list li").count() == len(titles) - 1
    page.set_input_files("#chat-import", str(exported))
    page.wait_for_function(f"document.querySelectorAll('#chat-list li').length === {2 * len(titles) - 1}")
    assert page.text_content("#chat-list li.current .title") == "Saved chat"
    assert answers(page) == shown
    (tmp_path / "bad.json").write_text('[{"title": "x", "messages": [{"role": "robot"}]}]')
    page.set_input_files("#chat-import", str(tmp_path / "bad.json"))
    page.wait_for_function("document.getElementById('error').textContent.startsWith('Cannot import bad.json')")
    page.select_option("#theme", "light")
    assert page.eval_on_selector("body", "b => getComputedStyle(b).backgroundColor") == "rgb(255, 255, 255)"
    page.select_option("#theme", "system")  # follows the system's scheme
    page.emulate_media(color_scheme="dark")
    assert page.eval_on_selector("body", "b => getComputedStyle(b).backgroundColor") == "rgb(13, 17, 23)"
    page.emulate_media(color_scheme="light")
    assert page.eval_on_selector("body", "b => getComputedStyle(b).backgroundColor") == "rgb(255, 255, 255)"


MARKDOWN = """Here is **bold**, *emphasis*, ~~gone~~ and a [link](https://example.com/a?b=1).

1. first
2. second

- apple
- pear

| name | size |
| --- | ---: |
| owl | 3 |

```python
def f(x):  # a comment
    return "text" + 42
```
"""
HOSTILE = """<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script>
[click](javascript:window.pwned=3) [data](data:text/html,<script>window.pwned=4</script>)
<a href="javascript:window.pwned=5">raw</a> **<b onmouseover=window.pwned=6>x</b>**
| <img src=x onerror=window.pwned=7> | b |
| --- | --- |
| <svg onload=window.pwned=8> | c |
```"><img src=x onerror=window.pwned=9>
<script>window.pwned=10</script>
```
"""


def canned(route, text: str) -> None:
    """Answer a chat request with `text`, streamed as the server streams."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": text[i:i + 7]}, "finish_reason": None}]}
              for i in range(0, len(text), 7)]
    chunks.append({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 20,
                                            "total_tokens": 29}})
    route.fulfill(status=200, content_type="text/event-stream",
                  body="".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n")


def test_markdown_renders_and_model_output_cannot_run_script(small_chat_page, tmp_path):
    page = small_chat_page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.on("dialog", lambda dialog: (_ for _ in ()).throw(AssertionError(dialog.message)))
    page.click("#chat-new")
    page.route("**/v1/chat/completions", lambda route: canned(route, MARKDOWN))
    ask(page, "show me markdown")
    last = ".message.assistant:last-child .content"
    assert page.text_content(f"{last} strong") == "bold"
    assert page.text_content(f"{last} em") == "emphasis" and page.text_content(f"{last} del") == "gone"
    link = page.locator(f"{last} a")
    assert (link.get_attribute("href"), link.get_attribute("target")) == ("https://example.com/a?b=1", "_blank")
    assert "noopener" in link.get_attribute("rel")
    assert page.locator(f"{last} ol li").all_text_contents() == ["first", "second"]
    assert page.locator(f"{last} ul li").all_text_contents() == ["apple", "pear"]
    assert page.locator(f"{last} table th").all_text_contents() == ["name", "size"]
    assert page.locator(f"{last} table td").all_text_contents() == ["owl", "3"]
    code = page.locator(f"{last} pre code")
    assert code.get_attribute("data-language") == "python"
    assert code.text_content() == 'def f(x):  # a comment\n    return "text" + 42'
    assert page.locator(f"{last} pre code .tok-k").all_text_contents() == ["def", "return"]
    assert page.locator(f"{last} pre code .tok-s").all_text_contents() == ['"text"']
    assert page.locator(f"{last} pre code .tok-c").all_text_contents() == ["# a comment"]
    page.click(f"{last} pre .copy")
    page.wait_for_function("document.querySelector('.message.assistant:last-child pre .copy')"
                           ".textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == code.text_content()
    shots = {"desktop": page.screenshot(full_page=True)}
    page.set_viewport_size({"width": 375, "height": 740})  # a phone opens with settings folded
    page.reload()
    page.wait_for_function("document.getElementById('model').textContent === 'small'")
    assert page.eval_on_selector_all("details", "all => all.map(d => d.open)") == [False, False]
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    shots["phone"] = page.screenshot()
    if os.environ.get("GPTKIT_SCREENSHOTS"):  # the docs' screenshots
        for name, png in shots.items():
            (Path(os.environ["GPTKIT_SCREENSHOTS"]) / f"playground-{name}.png").write_bytes(png)
    # hostile output: shown as text, nothing runs, loads or links to script
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: canned(route, HOSTILE))
    ask(page, "<img src=x onerror=window.pwned=11> [me](javascript:window.pwned=12)")
    page.unroute("**/v1/chat/completions")
    page.wait_for_timeout(300)  # time for an image error handler to fire, were there one
    assert page.evaluate("window.pwned") is None
    assert page.locator("#messages img, #messages script, #messages svg, #messages iframe, "
                        "#messages b").count() == 0
    hrefs = page.eval_on_selector_all("#messages a", "links => links.map(a => a.href)")
    assert all(href.startswith("https://") for href in hrefs), hrefs
    text = page.text_content(".message.assistant:last-child .content")
    assert '<img src=x onerror="window.pwned=1">' in text and "<script>window.pwned=2</script>" in text
    assert "[click](javascript:window.pwned=3)" in text
    assert "<img src=x onerror=window.pwned=11>" in page.locator(".message.user .content").last.text_content()


def test_stopped_before_any_answer_the_message_returns_to_the_input(small_chat_page):
    """As in `gptkit chat`: Stop before the first piece of an answer drops the turn, and the
    message goes back into the input box to be sent again or changed."""
    page = small_chat_page
    page.click("#chat-clear")
    held = []
    page.route("**/v1/chat/fit", lambda route: held.append(route))  # waits until Stop
    page.fill("#chat-input", "never answered")
    page.press("#chat-input", "Enter")
    page.wait_for_function("!document.getElementById('chat-stop').disabled")
    page.click("#chat-stop")
    page.wait_for_function("!document.getElementById('send').disabled")
    assert held and page.locator(".message").count() == 0
    assert page.input_value("#chat-input") == "never answered"
    page.unroute("**/v1/chat/fit")
    body = ask(page, "answered")
    assert [m["content"] for m in body["messages"] if m["role"] == "user"] == ["answered"]
