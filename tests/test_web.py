"""The web page (web_demo.py) through HTTP on the tiny trained model, and in a real browser."""
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT

pytest.importorskip("starlette", reason="the web page's extra is not installed (pip install -r requirements-web.txt)")
pytest.importorskip("uvicorn", reason="the web page's extra is not installed (pip install -r requirements-web.txt)")

SETTINGS = {"prefix": "小明", "model": "final_model", "length": 30, "nsamples": 2, "temperature": 1.0, "topk": 40,
            "topp": 1.0, "repetition_penalty": 1.1, "repetition_window": 0, "seed": 1}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """web_demo.py serving the shared tiny model (and its epoch folders) on a free port of 127.0.0.1."""
    trained = request.getfixturevalue("trained")
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "web_demo.py"), "--device", "cpu", "--port", str(port)],
                               cwd=trained, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    started = time.time()
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1)
            break
        except OSError:
            if process.poll() is not None or time.time() - started > 60:
                raise AssertionError(f"web_demo.py did not start:\n{process.stdout.read()}") from None
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=30)


def post(url, settings):
    return urllib.request.urlopen(urllib.request.Request(url + "/api/generate", data=json.dumps(settings).encode(),
                                                         headers={"Content-Type": "application/json"}), timeout=60)


def events(response):
    """The server-sent events of a response, as dicts, while they arrive."""
    for line in response:
        line = line.decode("utf-8").strip()
        if line.startswith("data: "):
            yield json.loads(line[6:])


def test_page_and_models_are_served(server):
    page = urllib.request.urlopen(server + "/").read().decode("utf-8")
    assert "续写 Go" in page and "停止 Stop" in page and "top-p" in page
    models = json.loads(urllib.request.urlopen(server + "/api/models").read())
    assert models["default"] == "final_model"
    assert {"final_model", "model_epoch1", "model_epoch2"} <= set(models["models"])
    assert "checkpoint" not in models["models"]


def test_a_continuation_streams_in(server):
    received = list(events(post(server, SETTINGS)))
    assert received[0]["start"] == ["小明", "小明"] and received[0]["seed"] == 1
    pieces = [e for e in received if "row" in e]
    assert len(pieces) >= 20 and {e["row"] for e in pieces} == {0, 1}
    assert received[-1]["done"] is True
    again = list(events(post(server, SETTINGS)))  # the same seed writes the same text
    assert [e for e in again if "row" in e] == pieces


@pytest.mark.parametrize("change,message", [
    ({"prefix": "  "}, "type a beginning first"),
    ({"temperature": 0}, "temperature 0.0: 超出范围 / must be from 0.05 to 5.0"),
    ({"length": 99999}, "length 99999: 超出范围 / must be from 1 to 2000"),
    ({"nsamples": "many"}, "nsamples: 需要一个数"),
    ({"seed": "abc"}, "seed 'abc': 需要一个整数或留空"),
    ({"model": "../../etc"}, "not a model folder"),
])
def test_bad_settings_get_a_message(server, change, message):
    with pytest.raises(urllib.error.HTTPError) as error:
        post(server, {**SETTINGS, **change})
    assert error.value.code == 400 and message in json.loads(error.value.read())["error"]


def test_stop_and_a_second_user(server):
    """Closing the connection (Stop, or a closed tab) ends sampling; a request made meanwhile waits its turn,
    and the page still loads at once."""
    long = {**SETTINGS, "length": 2000, "nsamples": 4}
    first = post(server, long)
    assert "start" in next(events(first))
    second_events = []
    second = threading.Thread(target=lambda: second_events.extend(events(post(server, SETTINGS))))
    second.start()
    time.sleep(0.5)
    started = time.time()
    urllib.request.urlopen(server + "/").read()
    assert time.time() - started < 1
    first.close()  # what the Stop button does
    second.join(timeout=30)
    assert not second.is_alive() and second_events[0] == {"queued": True} and second_events[-1]["done"] is True
    assert time.time() - started < 20  # did not wait for 2000 tokens x 4 samples


def test_in_a_real_browser(server, trained):
    """Headless Chromium types a beginning, presses Go and sees the text stream in; the screenshot is saved to
    mnt/web_demo/ of the project."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (see README)")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser_path:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    shots = ROOT / "mnt" / "web_demo"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(server + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.fill("#prefix", "小明每天早上")
        page.fill("#length", "120")
        page.fill("#seed", "3")
        clicked = time.time()
        page.click("#go")
        page.wait_for_function("document.querySelector('.sample') && "
                               "document.querySelector('.sample').innerText.length > 20")
        first_text = time.time() - clicked
        page.wait_for_function("document.querySelector('#status').innerText.includes('done')", timeout=60000)
        texts = page.locator(".sample").all_inner_texts()
        page.screenshot(path=str(shots / "continuation.png"), full_page=True)
        page.fill("#temperature", "0")
        page.click("#go")
        page.wait_for_function("document.querySelector('#status').className === 'error'")
        error = page.inner_text("#status")
        page.screenshot(path=str(shots / "bad_setting.png"))
        browser.close()
    assert len(texts) == 2 and all("小明每天早上" in t for t in texts)
    assert "temperature 0.0" in error
    print(f"first characters {first_text:.2f} s after Go; screenshots in {shots}")
    assert Path(shots / "continuation.png").stat().st_size > 10000


def test_a_broken_model_folder_gets_a_message_not_a_hang(server, trained):
    broken = trained / "model" / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text((trained / "model" / "final_model" / "config.json").read_text())
    shutil.copy(trained / "model" / "final_model" / "tokenizer.json", broken)
    shutil.copy(trained / "model" / "final_model" / "tokenizer_config.json", broken)
    try:
        received = list(events(post(server, {**SETTINGS, "model": "broken"})))
    finally:
        shutil.rmtree(broken)
    assert len(received) == 1 and "weights cannot be loaded" in received[0]["error"], received


def test_every_continuation_is_loaded_and_sampled_on_one_thread(trained, monkeypatch):
    """Each request has its own thread, but the model is loaded and every continuation sampled on the one sampling
    thread (Models.run): a thread that runs OpenMP work keeps a team of OpenMP threads, and with more of them than
    cores GNU OpenMP wakes its threads from sleep at every parallel region (a continuation at two thirds of
    generate.py's speed). Simulated without HTTP: the page's handler on two request threads and the API's on a third,
    one after the other."""
    import torch

    from gpt2zh import openai_api, sampling, webapp

    threads = []
    load, write = sampling.Writer.__init__, sampling.Writer.write

    def loading(self, *args, **kwargs):
        threads.append(("load", threading.get_ident()))
        load(self, *args, **kwargs)

    def writing(self, *args, **kwargs):
        threads.append(("write", threading.get_ident()))
        return write(self, *args, **kwargs)

    monkeypatch.setattr(sampling.Writer, "__init__", loading)
    monkeypatch.setattr(sampling.Writer, "write", writing)
    models, admission = webapp.Models(trained / "model", torch.device("cpu"), "auto"), webapp.Admission(4)
    models.run(models.writer, "final_model")
    settings = webapp.check_settings(SETTINGS, webapp.model_folders(trained / "model"))
    completion = openai_api.parse_completion({"model": "final_model", "prompt": "小明", "max_tokens": 10},
                                             webapp.model_folders(trained / "model"), 100)
    events = []

    def on_a_request_thread(handler, *arguments):  # as start_writing runs them
        assert admission.enter()
        thread = threading.Thread(target=handler, args=(models, admission, *arguments))
        thread.start()
        thread.join(timeout=120)

    on_a_request_thread(webapp.continue_beginning, settings, events.append, threading.Event())
    on_a_request_thread(webapp.continue_beginning, settings, events.append, threading.Event())
    on_a_request_thread(webapp.write_for_api, completion, threading.Event(), events.append)
    assert [kind for kind, _ in threads] == ["load", "write", "write", "write"]
    assert len({ident for _, ident in threads}) == 1 and threads[0][1] != threading.get_ident()
    ends = [event for event in events if isinstance(event, dict) and "done" in event or
            isinstance(event, tuple) and event[0] == "done"]
    assert len(ends) == 3, events
