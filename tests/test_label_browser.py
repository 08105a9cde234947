"""The labeling page (nextbit/label/page.html) and the admin page in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium; nothing downloads a browser), against a real `label serve` app on 127.0.0.1.

A labeler logs in with a token, labels five pairs with the keyboard (one with a comment, one whose response is lost
and is sent again), undoes the last one, and the database then holds exactly the four expected labels, each mapped
from the side shown on the left or right to the pair's a/b; an answer left pending at a reload is sent on return. Every response holds markup (<script>, <img onerror>), which must show as text and never run. An
admin then logs in and opens /admin: counts, agreement between labelers, agreement with a (tiny) reward model.

NEXTBIT_SCREENSHOTS=1 also writes docs/img/label_page.png and docs/img/label_admin.png.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from conftest import ROOT, peaky_model
from nextbit.label import store
from nextbit.label.db import open_db
from nextbit.label.server import LabelServeConfig

from live import CHROMEDRIVER, CHROMIUM, chromium, wait_for  # noqa: E402
from live import label_app_in_thread as live  # noqa: E402
pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
                                reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")
PAGES = [ROOT / "nextbit" / "label" / name for name in ("page.html", "admin.html", "not_admin.html")]

REVIEWS = [("The pacing drags, but the lead carries every scene.", "A triumph: warm, funny and honest from start to end."),
           ("I walked out after twenty minutes.", "Flawed, yet I keep thinking about its final shot."),
           ("Beautifully shot and surprisingly tender.", "It looks nice. That is all."),
           ("The script is lazy and the jokes land flat.", "Sharp writing and a cast that clearly had fun."),
           ("An honest small film about a family.", "Loud, long and forgettable."),
           ("Two hours I will not get back.", "Quietly moving; the ending earns its tears."),
           ("A clever premise wasted on a dull plot.", "Inventive, generous and often very funny."),
           ("Solid, if a little safe.", "A mess of a movie with one great song.")]


def pair_records() -> list[dict]:
    out = []
    for i, (a, b) in enumerate(REVIEWS):
        out.append({"prompt": f"Write a one-line review of film #{i + 1}. <b>bold?</b>",
                    "a": f"{a} <script>window.__pwned={i}</script>",
                    "b": f'{b} <img src=x onerror="window.__pwned={i}">'})
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory, tokenizer):
    import torch

    from nextbit.align.reward import HEAD
    from nextbit.core.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("label_browser")
    model = peaky_model(seq_len=64)
    torch.manual_seed(3)
    model.add_scalar_head(HEAD).weight.data.normal_(0, 1.0)
    rm = save_checkpoint(tmp / "rm", model, tokenizer, meta={"kind": "reward_model", "pool": "last"})

    url = f"sqlite:///{tmp / 'labels.db'}"
    db = open_db(url)
    tokens = {n: store.add_user(db, n, admin=n == "root") for n in ("lena", "max", "zoe", "root")}
    store.import_pairs(db, pair_records(), source="test")
    users = {u.name: u for u in store.list_users(db)}
    t0 = time.time() - 1800
    for who, sides in (("max", "lllrrlr"), ("zoe", "lrlrrtl")):  # two others, so the admin page has agreement to show
        for j, side in enumerate(sides):
            shown = store.next_pair(db, users[who].id, overlap=3, timeout_s=600, now=t0 + 40 * j)
            store.answer(db, users[who].id, shown.pair_id, {"l": "left", "r": "right", "t": "tie"}[side],
                         idempotency_key=f"{who}-{j}-key", now=t0 + 40 * j + 25)
    db.close()
    with live(LabelServeConfig(db=url, overlap=3, timeout=600, reward=str(rm))) as (base, state):
        yield {"url": base, "db": state.db, "tokens": tokens, "users": users}


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def shown(d) -> dict:
    """The pair on screen, as the page shows it (visible text)."""
    return d.execute_script(
        "const t = document.getElementById('task'); if (t.hidden) return null;"
        "return {id: Number(t.dataset.pairId), left: document.getElementById('left').textContent,"
        " right: document.getElementById('right').textContent, prompt: document.getElementById('prompt-body').textContent,"
        " busy: document.getElementById('undo').disabled, done: Number(document.getElementById('progress').dataset.doneToday)}")


def press(d, key):
    from selenium.webdriver import ActionChains

    ActionChains(d).send_keys(key).perform()


def login(d, url, token):
    d.get(url + "/")
    box = wait_for(lambda: d.find_element("id", "token") if d.find_element("id", "login").is_displayed() else None,
                   what="the login form")
    box.send_keys(token)
    d.find_element("id", "login-button").click()


def no_markup_ran(d):
    assert d.execute_script("return window.__pwned") is None
    assert d.execute_script("return document.querySelectorAll('img').length") == 0
    assert d.execute_script("return document.querySelectorAll('script').length") == 1  # the page's own
    assert not d.find_elements("css selector", "main b")


def test_the_pages_are_offline_files_that_never_parse_text_as_html():
    for page in PAGES:
        html = page.read_text(encoding="utf-8")
        offline = html.replace('<link rel="icon" href="data:,">', "")
        assert not re.search(r"https?://|<link|\bsrc=|@import|url\(", offline), f"{page.name} loads something from elsewhere"
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function", "DOMParser"):
            assert sink not in html, (page.name, sink)


def test_label_five_with_the_keyboard_undo_one_then_the_admin_page(site, browser):
    from selenium.webdriver.common.keys import Keys

    d, db = browser, site["db"]
    pairs = {p.id: p for p in store.pairs(db)}
    login(d, site["url"], "wrong-token")
    wait_for(lambda: "unknown token" in d.find_element("id", "login-error").text, what="the refused login")
    d.find_element("id", "token").clear()
    d.find_element("id", "token").send_keys(site["tokens"]["lena"], Keys.ENTER)
    wait_for(lambda: (s := shown(d)) and s["left"] and not s["busy"], what="the first pair")
    assert d.find_element("id", "user").text == "lena" and not d.find_element("id", "admin-link").is_displayed()
    d.execute_script("document.activeElement.blur()")

    answered = []  # (pair id, side pressed, what was on the left)
    for i, (key, side) in enumerate([("1", "left"), ("2", "right"), ("3", "tie"), ("0", "cant_tell"), ("1", "left")]):
        now = shown(d)
        p = pairs[now["id"]]
        # the model's markup is on screen as text, in the store's left/right order
        assert {now["left"], now["right"]} == {p.a, p.b} and p.prompt in now["prompt"]
        no_markup_ran(d)
        if i == 1:  # a comment: typing in the box (digits included) is not answering
            box = d.find_element("id", "comment")
            box.click()
            box.send_keys("the right one 1 2 3 is kinder")
            assert shown(d)["id"] == now["id"]
            box.send_keys(Keys.ESCAPE)
        if i == 2:  # the answer reaches the server but its response is lost: the page sends it again, same key
            d.execute_script("""
                const real = window.fetch; let lose = 1; window.__answers = [];
                window.fetch = async (url, opts) => {
                  if (url === '/api/answer') window.__answers.push(JSON.parse(opts.body));
                  const r = await real(url, opts);
                  if (url === '/api/answer' && lose-- > 0) throw new TypeError('Failed to fetch');
                  return r;
                };""")
        press(d, key)
        answered.append((now["id"], side, now["left"]))
        wait_for(lambda: (s := shown(d)) and s["id"] != now["id"] and not s["busy"] and s["done"] == i + 1,
                 what=f"the pair after answer {i + 1}")
    assert d.find_element("id", "status").text == "Saved: A."
    sent = d.execute_script("return window.__answers")
    assert [a["side"] for a in sent] == ["tie", "tie", "cant_tell", "left"] and sent[0] == sent[1]

    press(d, "u")  # undo the fifth: it comes back, in the same left/right order
    last_id, _, last_left = answered[-1]
    wait_for(lambda: (s := shown(d)) and s["id"] == last_id and not s["busy"] and s["done"] == 4, what="the undone pair")
    assert shown(d)["left"] == last_left
    no_markup_ran(d)

    mine = [lab for lab in store.all_labels(db) if lab.user_name == "lena"]
    assert len(mine) == 4
    want = {}
    for pid, side, left in answered[:4]:
        left_is_a = left == pairs[pid].a
        want[pid] = {"left": "a" if left_is_a else "b", "right": "b" if left_is_a else "a"}.get(side, side), left_is_a
    assert {lab.pair_id: (lab.choice, lab.left_is_a) for lab in mine} == want
    assert [lab.comment for lab in sorted(mine, key=lambda lab: lab.id)] == ["", "the right one 1 2 3 is kinder", "", ""]
    assert len({lab.idempotency_key for lab in mine}) == 4
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", lab.idempotency_key)
               for lab in mine)

    if os.environ.get("NEXTBIT_SCREENSHOTS") == "1":
        save(d, "label_page.png")

    # An answer still unacknowledged when the page went away is sent again, with its key, when the page comes back.
    key = "0f1e2d3c-4b5a-4697-8877-665544332211"
    d.execute_script("localStorage.setItem('nextbit.label.pending', JSON.stringify({user: 'lena', body: "
                     "{pair_id: arguments[0], side: 'right', idempotency_key: arguments[1], comment: ''}}))", last_id, key)
    d.refresh()
    wait_for(lambda: (s := shown(d)) and s["done"] == 5 and not s["busy"], what="the resent answer")
    assert d.execute_script("return localStorage.getItem('nextbit.label.pending')") is None
    [resent] = [lab for lab in store.all_labels(db) if lab.idempotency_key == key]
    assert (resent.user_name, resent.pair_id, resent.choice) == ("lena", last_id, "b" if last_left == pairs[last_id].a else "a")

    # A labeler's session cannot open the admin page; an admin's can.
    d.get(site["url"] + "/admin")
    assert "You are signed in as lena, who is not an admin." in d.find_element("tag name", "body").text
    assert d.title == "nextbit label: not an admin"
    d.get(site["url"] + "/")
    wait_for(lambda: d.find_element("id", "logout").is_displayed(), what="the page")
    d.find_element("id", "logout").click()
    wait_for(lambda: d.find_element("id", "login").is_displayed(), what="the login form after logging out")
    d.find_element("id", "token").send_keys(site["tokens"]["root"], Keys.ENTER)
    link = wait_for(lambda: d.find_element("id", "admin-link") if d.find_element("id", "admin-link").is_displayed() else None,
                    what="the admin link")
    link.click()
    wait_for(lambda: d.execute_script("return document.body.dataset.loaded") == "1", 20, "the admin page")
    rows = {r.get_attribute("data-name"): [c.text for c in r.find_elements("tag name", "td")]
            for r in d.find_elements("css selector", "#labelers tbody tr")}
    assert set(rows) == {"lena", "max", "zoe", "root"}
    assert rows["lena"][1:3] == ["5", "5"] and rows["max"][1] == "7" and rows["root"][0].replace(" ", "") == "rootadmin"
    assert re.fullmatch(r"\d+\.\d% \(n=\d\)", rows["lena"][8]), rows["lena"]  # agreement with the reward model
    pairwise = [[c.text for c in r.find_elements("tag name", "td")] for r in d.find_elements("css selector", "#pairwise tbody tr")]
    assert {(r[0], r[1]) for r in pairwise} >= {("lena", "max"), ("max", "zoe")}
    assert re.fullmatch(r"-?\d\.\d{3}|–", d.find_element("id", "alpha").text)
    assert d.find_element("id", "n-labels").text == "19"
    if os.environ.get("NEXTBIT_SCREENSHOTS") == "1":
        d.set_window_size(1280, 900)  # the whole admin page
        save(d, "label_admin.png")


def save(d, name: str) -> None:
    out = ROOT / "docs" / "img" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    d.execute_script("document.activeElement.blur()")
    d.save_screenshot(str(out))
