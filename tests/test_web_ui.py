"""The web chat page at `/`, driven end to end in headless Chromium (Debian's chromium + chromium-driver,
through selenium; no browser download). One test talks to the real tiny model (random weights: a garbage
reply, streamed through the real engine, and exactly what the API answers to the same seeded request); the
other to the `--script` testing aid so that the page gets reasoning, a tool call (run by the page's own
calculator) and a final answer; those tokens still stream through the real tokenizer, parser and SSE code."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request

import pytest

from moonlet.server_bench import spawn_server, stop_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")

SCRIPT = [
    {"when": "What is 6*7", "completion": (
        "<think>I will use the calculator for this multiplication.</think>Let me compute it."
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.calculator:0<|tool_call_argument_begin|>"
        '{"expression": "6*7"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')},
    {"when": "## Return of functions.calculator:0\n42", "completion": (
        "<think>The calculator returned 42.</think>The answer is 42, which is six times seven.<|im_end|>")},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    script = tmp_path_factory.mktemp("web") / "script.json"
    script.write_text(json.dumps(SCRIPT))
    proc, url = spawn_server(["--model", "tiny", "--script", str(script), "--script-delay", "0.03"])
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def real_server():
    proc, url = spawn_server(["--model", "tiny", "--max-model-len", "1024", "--max-batch-size", "4"])
    yield url
    stop_server(proc)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def open_and_send(browser, url: str, text: str, max_tokens: int | None = None, seed: int | None = None) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(url + "/")
    deadline = time.monotonic() + 15
    while "tiny" not in browser.find_element(By.ID, "model").text:  # the page asked /v1/models
        assert time.monotonic() < deadline, "the page did not load the model list"
        time.sleep(0.05)
    for field_id, value in (("max_tokens", max_tokens), ("seed", seed)):
        if value is not None:
            field = browser.find_element(By.ID, field_id)
            field.clear()
            field.send_keys(str(value))
    # record every change of the reply's text inside the page, from before sending (polling over webdriver is too coarse under load)
    browser.execute_script("""
        window.__bodies = [];  // the request bodies the page sends, to replay them through the API
        const fetch0 = window.fetch;
        window.fetch = (u, o) => { if (o && o.body) window.__bodies.push(o.body); return fetch0(u, o); };
        window.__lengths = new Set();
        new MutationObserver(() => {
            const b = document.querySelector('.msg.assistant');
            if (b) window.__lengths.add(b.textContent.length);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});""")
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def test_chat_page_streams_a_reply_from_the_real_model(real_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    open_and_send(browser, real_server, "Hello, moon!", max_tokens=96, seed=1234)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        bubble = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if bubble and bubble[0].find_element(By.CSS_SELECTOR, ".stats").text:  # the usage chunk: the stream ended
            break
        time.sleep(0.02)
    else:
        pytest.fail("the reply never finished")
    lengths = browser.execute_script("return Array.from(window.__lengths)")
    browser.save_screenshot(str(tmp_path / "real.png"))
    stats = bubble[0].find_element(By.CSS_SELECTOR, ".stats").text
    assert re.search(r"\b([1-9]\d*) completion", stats), stats
    assert len(lengths) > 2, f"the reply did not stream (only {len(lengths)} distinct lengths)"
    # textContent, not .text: once an answer or a tool call follows the reasoning, its block collapses and .text
    # (only what is visible) is empty; a random model may emit </think> or a tool-call token at any step
    shown = {sel: bubble[0].find_element(By.CSS_SELECTOR, sel).get_attribute("textContent")
             for sel in (".reasoning .text", ".content", ".calls")}
    # the page shows exactly what the model produced: the same request (seeded), replayed without streaming
    body = json.loads(browser.execute_script("return window.__bodies[0]"))
    assert body["seed"] == 1234 and body["max_tokens"] == 96 and body["stream"] is True
    body.update(stream=False)
    body.pop("stream_options")
    req = urllib.request.Request(real_server + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        message = json.load(r)["choices"][0]["message"]
    assert shown[".reasoning .text"] == (message.get("reasoning_content") or "")
    assert shown[".content"] == (message.get("content") or "")
    calls = [c["function"]["name"] for c in message.get("tool_calls") or []]
    assert [line.split("(")[0] for line in shown[".calls"].split("→ ")[1:]] == calls
    assert "".join(shown.values()).strip(), "the reply is empty"
    assert (tmp_path / "real.png").stat().st_size > 1000


def test_chat_page_streams_reasoning_tool_call_result_and_answer(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    open_and_send(browser, server, "What is 6*7?")
    seen = []  # distinct states of the conversation while it streams
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = browser.find_element(By.ID, "messages").text
        if not seen or seen[-1] != text:
            seen.append(text)
        if "six times seven" in text and browser.find_element(By.ID, "send").is_enabled():
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"no final answer in the page; it shows:\n{seen[-1] if seen else ''}")
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 1000
    assert len(seen) >= 5, f"the reply did not stream (only {len(seen)} distinct states)"
    bubbles = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    assert len(bubbles) == 2
    first, second = bubbles
    reasoning = first.find_element(By.CSS_SELECTOR, ".reasoning")
    assert reasoning.get_attribute("open") is None  # collapsed once the turn ended
    assert "I will use the calculator" in reasoning.get_attribute("textContent")
    assert "calculator" in first.find_element(By.CSS_SELECTOR, ".toolcall").text
    assert first.find_element(By.CSS_SELECTOR, ".toolresult").text.endswith("42")
    assert second.find_element(By.CSS_SELECTOR, ".content").text == "The answer is 42, which is six times seven."
    assert "completion" in second.find_element(By.CSS_SELECTOR, ".stats").text


def test_clear_during_a_turn_stops_it_and_leaves_an_empty_conversation(server, browser):
    from selenium.webdriver.common.by import By

    open_and_send(browser, server, "What is 6*7?")
    deadline = time.monotonic() + 30
    while not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant") and time.monotonic() < deadline:
        time.sleep(0.01)
    browser.find_element(By.ID, "clear").click()
    while not browser.find_element(By.ID, "send").is_enabled() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # the scripted turn would have gone on to its tool round and answer by now
    assert browser.find_element(By.ID, "messages").text == ""
    assert browser.execute_script("return state.messages") == []


def test_stop_keeps_the_partial_reply_in_the_conversation_and_marks_it(server, browser):
    from selenium.webdriver.common.by import By

    open_and_send(browser, server, "What is 6*7?")
    deadline = time.monotonic() + 30
    while "calculator" not in browser.execute_script(  # mid-reasoning: some of it is on screen
            "return document.querySelector('.msg.assistant .reasoning .text')?.textContent || ''"):
        assert time.monotonic() < deadline, "no reasoning streamed"
        time.sleep(0.01)
    browser.find_element(By.ID, "stop").click()
    while not browser.find_element(By.ID, "send").is_enabled():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    shown = browser.execute_script("return document.querySelector('.msg.assistant .reasoning .text').textContent")
    messages = browser.execute_script("return state.messages")
    assert [m["role"] for m in messages] == ["user", "assistant"]  # the next turn's model sees what the user saw
    assert messages[1]["reasoning_content"] == shown and "stopped" in browser.find_element(
        By.CSS_SELECTOR, ".msg.assistant .stats").text
