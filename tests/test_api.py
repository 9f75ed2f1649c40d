"""The OpenAI-compatible API (web_demo.py, /v1) through the official openai client against the real server on
127.0.0.1, on the tiny trained model."""
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, run

pytest.importorskip("starlette", reason="the web extra is not installed (pip install -r requirements-web.txt)")
pytest.importorskip("uvicorn", reason="the web extra is not installed (pip install -r requirements-web.txt)")
openai = pytest.importorskip("openai", reason="the web extra is not installed (pip install -r requirements-web.txt)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cwd, *flags):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "web_demo.py"), "--device", "cpu", "--port", str(port),
                                "--api_only", *flags], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    url, started = f"http://127.0.0.1:{port}", time.time()
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=1)
            return process, url
        except urllib.error.HTTPError:  # 401 with a key: up
            return process, url
        except OSError:
            if process.poll() is not None or time.time() - started > 120:
                raise AssertionError(f"web_demo.py did not start:\n{process.stdout.read()}") from None
            time.sleep(0.2)


def stop_server(process):
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def api(trained):
    process, url = start_server(trained)
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), url
    stop_server(process)


def test_models_completions_streams_n_and_stop(api):
    client, _ = api
    assert "final_model" in [model.id for model in client.models.list().data]
    answer = client.completions.create(model="final_model", prompt="小明", max_tokens=12, n=2, seed=3)
    assert [choice.index for choice in answer.choices] == [0, 1] and answer.choices[0].text != answer.choices[1].text
    usage = answer.usage
    assert usage.prompt_tokens == 2 and 2 <= usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    again = client.completions.create(model="final_model", prompt="小明", max_tokens=12, n=2, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in answer.choices]  # a seed gives the same text
    streamed = client.completions.create(model="final_model", prompt="小明", max_tokens=12, n=2, seed=3, stream=True)
    pieces = {0: "", 1: ""}
    reasons = {}
    for chunk in streamed:
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert [pieces[0], pieces[1]] == [c.text for c in answer.choices]
    assert reasons == {c.index: c.finish_reason for c in answer.choices}
    long = client.completions.create(model="final_model", prompt="小明", max_tokens=40, seed=1, temperature=0)
    stop = next(ch for ch in long.choices[0].text[3:] if ch.strip())  # a character it writes, after a few
    cut = client.completions.create(model="final_model", prompt="小明", max_tokens=40, seed=1, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == long.choices[0].text.split(stop)[0]
    listed = client.completions.create(model="final_model", prompt=["小明", "白鹅"], max_tokens=4, n=2, seed=1)
    assert [c.index for c in listed.choices] == [0, 1, 2, 3]


def test_the_same_draws_as_generate_py(api, trained):
    """n completions with a seed are generate.py's --nsamples samples with that seed (--stop_at_end: the API ends a
    completion at the article's end), the repetition penalty and its window included."""
    client, _ = api
    penalty = {"top_k": 8, "repetition_penalty": 1.5}  # llama.cpp's and vLLM's extras
    answer = client.completions.create(model="final_model", prompt="小明", max_tokens=30, n=2, seed=5,
                                       temperature=1.0, extra_body=penalty | {"repetition_window": 3})
    run("generate.py", "--device", "cpu", "--prefix", "小明", "--nsamples", "2", "--length", "30", "--seed", "5",
        "--topk", "8", "--repetition_penalty", "1.5", "--repetition_window", "3", "--stop_at_end", "--save_samples",
        "--save_samples_path", "mnt_api", cwd=trained)
    saved = re.findall(r"SAMPLE \d+ =+\n(.*?)\n=+\n", (trained / "mnt_api" / "samples.txt").read_text(encoding="utf-8"),
                       flags=re.S)
    assert saved == ["小明" + choice.text for choice in answer.choices]
    whole_text = client.completions.create(model="final_model", prompt="小明", max_tokens=30, n=2, seed=5,
                                           temperature=1.0, extra_body=penalty)
    assert [c.text for c in whole_text.choices] != [c.text for c in answer.choices]  # the window is used


def test_two_clients_at_once_each_get_their_own_text(api):
    client, _ = api
    alone = {seed: client.completions.create(model="final_model", prompt="白鹅", max_tokens=15, seed=seed)
             .choices[0].text for seed in (1, 2)}
    together = {}

    def ask(seed):
        together[seed] = client.completions.create(model="final_model", prompt="白鹅", max_tokens=15,
                                                   seed=seed).choices[0].text

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone


@pytest.mark.parametrize("call, status, words", [
    (lambda c: c.completions.create(model="no_such_model", prompt="小明", max_tokens=5), 404, "does not exist"),
    (lambda c: c.completions.create(model="final_model", prompt="小明", max_tokens=5, temperature="hot"), 400,
     "temperature: must be a number"),
    (lambda c: c.completions.create(model="final_model", prompt="小明", max_tokens=99999), 400,
     "this server writes at most 2048 tokens"),
    (lambda c: c.completions.create(model="final_model", prompt="小明𠀀", max_tokens=5), 400,
     "not in the model's vocabulary: 𠀀"),
    (lambda c: c.chat.completions.create(model="final_model", messages=[{"role": "user", "content": "小明"}]), 400,
     "use /v1/completions"),
])
def test_errors_in_openais_shape(api, call, status, words):
    client, _ = api
    with pytest.raises(openai.APIStatusError) as caught:
        call(client)
    assert caught.value.status_code == status and words in caught.value.message
    error = caught.value.body
    assert set(error) == {"message", "type", "param", "code"}


def test_an_api_key_is_required_when_set_and_the_queue_turns_the_excess_away(trained):
    """--api_key: without the header, 401. --max_queue: 50 clients at once each get text or a 429 with Retry-After,
    within bounded time; the server answers afterwards and its memory is back near where it was. A streaming client
    that leaves frees its place."""
    process, url = start_server(trained, "--api_key", "sesame", "--max_queue", "3")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        for _ in range(3):
            client.completions.create(model="final_model", prompt="小明", max_tokens=5)  # warm: kernels, allocator
        before = resident_memory(process.pid)
        statuses = load(url, clients=50)
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 3 and 429 in statuses, statuses
        assert client.completions.create(model="final_model", prompt="小明", max_tokens=5).choices
        assert resident_memory(process.pid) < before * 1.25 + 20e6
        leaving = client.completions.create(model="final_model", prompt="小明", max_tokens=2000, stream=True)
        next(iter(leaving))
        leaving.close()  # gone after its first chunk: its place is freed at the server's next step
        time.sleep(1)
        quick = [client.completions.create(model="final_model", prompt="小明", max_tokens=3) for _ in range(3)]
        assert all(answer.choices for answer in quick)
    finally:
        stop_server(process)


def load(url, clients):
    """HTTP statuses of `clients` completions asked for at once (plain HTTP: no client-side retries)."""
    statuses = []

    def ask():
        request = urllib.request.Request(url + "/v1/completions", data=json.dumps(
            {"model": "final_model", "prompt": "小明", "max_tokens": 5}).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sesame"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                statuses.append(response.status)
        except urllib.error.HTTPError as error:
            assert error.status != 429 or error.headers["Retry-After"]
            statuses.append(error.status)

    threads = [threading.Thread(target=ask) for _ in range(clients)]
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert time.time() - started < 180
    return statuses


def resident_memory(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
