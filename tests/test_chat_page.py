"""The chat page at / (nextbit/serve/chat.html) in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium; nothing downloads a browser).

A real server runs in-process on 127.0.0.1 with a tiny trained checkpoint. Its replies are scripted (Choice.text is
patched to reveal a fixed text a few characters per generated token, and the engine steps are slowed a little), so
the page's rendering of code and of markup can be checked exactly and Stop can be pressed mid-reply. Everything
else (the HTTP API, streaming, the engine, auth, /tokenize) is the real server.

NEXTBIT_SCREENSHOTS=1 also writes docs/img/chat.png.
"""

import os
import re
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

from live import CHROMEDRIVER, CHROMIUM, chromium, uvicorn_in_thread, wait_for  # noqa: E402
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
                                reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")

PAGE = ROOT / "nextbit" / "serve" / "chat.html"
KEY = "page-test-key"
MODEL = "tiny-chat"
CHARS_PER_TOKEN = 4
STEP_DELAY = 0.025  # seconds added to every engine step: replies take about a second, so Stop has time

# Scripted replies, chosen by a word in the last user message; {n} counts the replies the server has made.
REPLIES = {
    "fib": "Here is a small recursive version:\n\n```python\ndef fib(n):\n    \"\"\"The n-th Fibonacci number.\"\"\"\n"
           "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n```\n\nCall `fib(10)` and you get `55`.",
    "slow": "Each call makes two more, so the work doubles with every step of `n`. Caching the results makes it "
            "linear:\n\n```python\nfrom functools import cache\n\n@cache\ndef fib(n):\n    return n if n < 2 else "
            "fib(n - 1) + fib(n - 2)\n```\n\nNow `fib(90)` returns at once.",
    "markup": 'Markup stays text: <script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> <b>not bold</b>'
              '\n\n```html\n<script>window.__pwned=3</script>\n<img src=x onerror="window.__pwned=4">\n```\n\n'
              'and inline `<img src=x onerror="window.__pwned=5">` too.',
}
LONG = " ".join(["(reply {n}) This answer goes on for a while, so that there is time to press Stop."] * 5)


# ---- the server ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat_page") / "run"
    r = run_cli("train", "--data", dataset, "--out", out, "--steps", "3", "--depth", "1", "--width", "64", "--n-head", "2",
                "--seq-len", "512", "--batch-tokens", "1024", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def server(checkpoint):
    pytest.importorskip("uvicorn")
    import nextbit.serve.protocol as protocol_mod
    import nextbit.serve.serving as serving_mod
    from nextbit.infer.engine import Engine
    from nextbit.serve.choices import Choice
    from nextbit.serve.server import ServeConfig, build_app

    seen = {"render": [], "chats": [], "n": 0}
    real_render, real_params, real_init, real_step = serving_mod.render_messages, protocol_mod.SamplingParams, Choice.__init__, Engine.step

    def render(tok, messages, add_generation_prompt=False):
        seen["render"] = messages
        return real_render(tok, messages, add_generation_prompt)

    def params(**kw):  # no stop tokens: a reply runs until its script is out, however the tiny model samples
        kw["stop_token_ids"] = kw.get("stop_token_ids") or []
        return real_params(**kw)

    def init(self, index, req, tokenizer, stops):
        real_init(self, index, req, tokenizer, stops)
        msgs = seen["render"]  # rendered by the same handler just before, with no await in between
        last = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
        seen["n"] += 1
        word = next((w for w in REPLIES if w in last.lower()), None)
        self.script = REPLIES.get(word, LONG).replace("{n}", str(seen["n"]))
        need = -(-len(self.script) // CHARS_PER_TOKEN)
        seen["chats"].append({"messages": msgs, "temperature": req.params.temperature, "max_tokens": req.params.max_new_tokens})
        req.params.max_new_tokens = min(req.params.max_new_tokens, need)

    def text(self):
        return self.script[: CHARS_PER_TOKEN * len(self.tokens)]

    def finish_reason(self):
        return None if self.finish is None else ("stop" if self.text() == self.script else "length")

    def step(self, admit=True):
        time.sleep(STEP_DELAY)
        return real_step(self, admit)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serving_mod, "render_messages", render)
        mp.setattr(protocol_mod, "SamplingParams", params)
        mp.setattr(Choice, "__init__", init)
        mp.setattr(Choice, "text", text)
        mp.setattr(Choice, "finish_reason", property(finish_reason))
        mp.setattr(Engine, "step", step)
        app, runner, _ = build_app(ServeConfig(checkpoint=str(checkpoint), api_key=KEY, max_batch=4, device="cpu",
                                               served_model_name=MODEL, engine="thread"))  # the patches above apply
        runner.start()
        try:
            with uvicorn_in_thread(app, join=10) as srv:
                yield {"url": srv.url + "/", "seen": seen, "runner": runner}
        finally:
            runner.stop()


# ---- the browser --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def open_fresh(driver, url, key=KEY):
    """The page with empty storage (and the API key stored, unless key is None)."""
    driver.get(url)
    driver.execute_script("localStorage.clear(); if (arguments[0]) localStorage.setItem('nextbit.chat.apiKey', arguments[0]);", key)
    driver.refresh()
    if key:
        wait_for(lambda: driver.find_element("id", "model-name").text == MODEL, what="the model name")


def messages(driver) -> list[tuple[str, str]]:
    """(role, visible text of the body) of every message on the page."""
    return [tuple(x) for x in driver.execute_script(
        "return [...document.querySelectorAll('#messages .msg')].map(m => [m.classList.contains('user') ? 'user' : "
        "'assistant', m.querySelector('.body') ? m.querySelector('.body').innerText : null])")]


def last_reply(driver) -> str:
    msgs = messages(driver)
    return msgs[-1][1] if msgs and msgs[-1][0] == "assistant" else ""


def busy(driver) -> bool:
    return driver.execute_script("return !document.getElementById('stop').hidden")


def wait_idle(driver, timeout=15.0):
    wait_for(lambda: not busy(driver), timeout, "the reply to finish")


def send(driver, text):
    from selenium.webdriver.common.keys import Keys

    before = len(messages(driver))
    box = driver.find_element("id", "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait_for(lambda: len(messages(driver)) == before + 2, 5, "the message and its reply to appear")


def set_field(driver, id_, value):
    from selenium.webdriver.common.keys import Keys

    f = driver.find_element("id", id_)
    f.send_keys(Keys.CONTROL, "a")
    f.send_keys(value, Keys.TAB)


def chat_roles(chat) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in chat["messages"]]


# ---- the tests ----------------------------------------------------------------------------------------------------
def test_the_page_is_one_offline_file_that_never_parses_text_as_html():
    html = PAGE.read_text(encoding="utf-8")
    offline = html.replace('<link rel="icon" href="data:,">', "")  # no favicon request
    assert not re.search(r"https?://|<link|\bsrc=|@import|url\(", offline), "the page must not load anything from elsewhere"
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "DOMParser"):
        assert sink not in html, sink


def test_a_missing_key_is_a_clear_error_and_the_key_is_kept(server, browser):
    d = browser
    open_fresh(d, server["url"], key=None)
    notice = d.find_element("id", "notice")
    wait_for(lambda: notice.is_displayed() and "401" in notice.text, what="the 401 notice")
    assert "invalid or missing API key" in notice.text and "Settings" in notice.text
    assert d.find_element("id", "api-key").is_displayed()

    send(d, "fib, without a key")
    wait_idle(d)
    err = d.find_elements("css selector", "#messages .msg.assistant .error")
    assert err and "401" in err[0].text and "invalid or missing API key" in err[0].text

    set_field(d, "api-key", KEY)
    wait_for(lambda: d.find_element("id", "model-name").text == MODEL, what="the model name once the key is in")
    assert not notice.is_displayed()
    assert d.execute_script("return localStorage.getItem('nextbit.chat.apiKey')") == KEY
    d.find_element("css selector", "#messages .msg.assistant .regen").click()  # the failed reply, again, with the key
    wait_for(lambda: busy(d), 5, "the reply to start")
    wait_idle(d)
    assert "def fib(n):" in last_reply(d)
    assert not d.find_elements("css selector", "#messages .error")


def test_streaming_stop_regenerate_edit_and_reload(server, browser):
    d, seen = browser, server["seen"]
    open_fresh(d, server["url"])
    d.find_element("id", "system").send_keys("You are terse.")
    set_field(d, "temperature", "0.5")
    set_field(d, "max-tokens", "400")

    # Tokens arrive: the reply grows while it streams, then shows as text with a code block.
    send(d, "Show me fib in Python")
    lengths = []
    while busy(d):
        n = len(last_reply(d))
        if not lengths or n != lengths[-1]:
            lengths.append(n)
        time.sleep(0.03)
    grew = [n for n in lengths if n > 0]  # (not strictly monotonic: a ``` line turns into a code block as it completes)
    assert len(grew) >= 5 and grew[0] < grew[-1] / 2 and grew[-1] == max(grew), lengths
    reply = last_reply(d)
    assert "Here is a small recursive version:" in reply and "Call fib(10) and you get 55." in reply
    code = d.find_elements("css selector", "#messages .msg.assistant pre code")
    assert len(code) == 1 and code[0].text.startswith("def fib(n):") and "return n if n < 2" in code[0].text
    assert [c.text for c in d.find_elements("css selector", "#messages .msg.assistant .text code")] == ["fib(10)", "55"]
    assert d.find_element("css selector", "#messages .codeblock .lang").text == "python"
    chat = seen["chats"][-1]
    assert chat_roles(chat) == [("system", "You are terse."), ("user", "Show me fib in Python")]
    assert chat["temperature"] == 0.5 and chat["max_tokens"] == 400

    # Stop: the reply stops growing, is marked stopped, and the server frees the request.
    d.find_element("id", "input").send_keys("Now write a long answer")
    d.find_element("id", "send").click()
    wait_for(lambda: len(last_reply(d)) > 20, 5, "the long reply to start")
    d.find_element("id", "stop").click()
    wait_idle(d, 3)
    cut = last_reply(d)
    time.sleep(0.3)
    assert last_reply(d) == cut and 0 < len(cut) < len(LONG) - 20
    assert d.find_elements("css selector", "#messages .msg.assistant:last-child .tag.stopped")
    wait_for(lambda: server["runner"].load == (0, 0), 5, "the server to drop the stopped request")

    # Regenerate: the stopped reply is replaced by a new one, from the same conversation without it.
    n_before = seen["n"]
    d.find_element("css selector", "#messages .msg.assistant:last-child .regen").click()
    wait_for(lambda: busy(d), 5, "the regenerated reply to start")
    wait_idle(d)
    assert seen["n"] == n_before + 1
    assert [r for r, _ in messages(d)] == ["user", "assistant", "user", "assistant"]
    assert f"(reply {seen['n']})" in last_reply(d) and not d.find_elements("css selector", "#messages .tag.stopped")
    assert [r for r, _ in chat_roles(seen["chats"][-1])] == ["system", "user", "assistant", "user"]
    assert chat_roles(seen["chats"][-1])[-1] == ("user", "Now write a long answer")

    # Edit and resend the first message: what came after it goes, and the server sees only the edited message.
    d.find_elements("css selector", "#messages .msg.user .edit")[0].click()
    box = wait_for(lambda: d.find_element("css selector", "#messages .edit-box textarea"), what="the edit box")
    from selenium.webdriver.common.keys import Keys
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("Show me fib in Python, with a docstring")
    d.find_element("css selector", "#messages .edit-send").click()
    wait_for(lambda: busy(d), 5, "the reply to the edited message")
    wait_idle(d)
    assert messages(d)[0] == ("user", "Show me fib in Python, with a docstring")
    assert [r for r, _ in messages(d)] == ["user", "assistant"]
    assert chat_roles(seen["chats"][-1]) == [("system", "You are terse."), ("user", "Show me fib in Python, with a docstring")]
    assert "def fib(n):" in last_reply(d)

    send(d, "Why is the recursive version slow?")
    wait_idle(d)
    shown = messages(d)
    assert len(shown) == 4 and "Caching the results" in shown[-1][1]

    # The conversation, its system prompt and the settings survive a reload.
    d.refresh()
    wait_for(lambda: d.find_element("id", "model-name").text == MODEL, what="the page after the reload")
    assert messages(d) == shown
    titles = [e.text for e in d.find_elements("css selector", "#conversations .conv")]
    assert titles == ["Show me fib in Python, with a docstring"]
    assert d.find_element("id", "system").get_attribute("value") == "You are terse."
    assert d.find_element("id", "temperature").get_attribute("value") == "0.5"
    assert d.find_element("id", "max-tokens").get_attribute("value") == "400"
    assert len(d.find_elements("css selector", "#messages pre code")) == 2

    if os.environ.get("NEXTBIT_SCREENSHOTS") == "1":
        d.set_window_size(1280, 1040)
        d.execute_script("document.getElementById('messages').scrollTop = 1e6; document.activeElement.blur()")
        out = ROOT / "docs" / "img" / "chat.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(out))
        d.set_window_size(1280, 860)


def test_markup_from_the_model_is_shown_as_text(server, browser):
    d = browser
    open_fresh(d, server["url"])
    send(d, "fib please")
    wait_idle(d)
    first = d.find_element("css selector", "#conversations li.current").get_attribute("data-id")

    d.find_element("id", "new-chat").click()
    assert messages(d) == []
    user = 'Echo some markup <img src=x onerror="window.__pwned=6"><script>window.__pwned=7</script>'
    send(d, user)
    wait_idle(d)

    def check():
        assert d.execute_script("return window.__pwned") is None
        assert d.execute_script("return document.querySelectorAll('img').length") == 0
        assert d.execute_script("return document.querySelectorAll('script').length") == 1  # the page's own
        assert not d.find_elements("css selector", "#messages b, #messages i")
        msgs = messages(d)
        assert msgs[0] == ("user", user)
        reply = msgs[1][1]
        assert 'Markup stays text: <script>window.__pwned=1</script><img src=x onerror="window.__pwned=2"> <b>not bold</b>' in reply
        code = d.find_element("css selector", "#messages .msg.assistant pre code").text
        assert code == '<script>window.__pwned=3</script>\n<img src=x onerror="window.__pwned=4">'
        inline = d.find_element("css selector", "#messages .msg.assistant .text code").text
        assert inline == '<img src=x onerror="window.__pwned=5">'
        assert d.find_element("css selector", "#conversations li.current .conv").text.startswith("Echo some markup <img")

    check()
    d.refresh()  # rendered again from localStorage
    wait_for(lambda: d.find_element("id", "model-name").text == MODEL, what="the page after the reload")
    check()

    # Switch back to the first conversation, then delete the markup one.
    d.find_element("css selector", f'#conversations li[data-id="{first}"] .conv').click()
    assert messages(d)[0] == ("user", "fib please")
    from selenium.webdriver import ActionChains

    markup = d.find_elements("css selector", "#conversations li:not(.current)")
    assert len(markup) == 1
    ActionChains(d).move_to_element(markup[0]).click(markup[0].find_element("css selector", ".delete")).perform()
    assert "Echo some markup" in d.switch_to.alert.text
    d.switch_to.alert.accept()
    wait_for(lambda: len(d.find_elements("css selector", "#conversations li")) == 1, what="the deleted conversation to go")
    assert messages(d)[0] == ("user", "fib please")
    assert d.execute_script("return JSON.parse(localStorage.getItem('nextbit.chat.v1')).conversations.length") == 1
