"""What a user of the web page or the OpenAI-compatible API waits for: web_demo.py serving the seed config (82M,
random weights saved as a model folder), one continuation of 1000 tokens streamed, timed from the request — the time
to the first character and the characters a second after it — against the memory roofline measured in this run
(generate_wall.py's: bf16 weights + bf16 cache over the read bandwidth). Also the server's start-up (command to
listening, the model loaded). The kernel trial runs at start-up; a second request per endpoint shows the remembered
state. Run from the project root: python bench/serve_wall.py
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, read_bandwidth  # noqa: E402
from generate_speed import roofline  # noqa: E402
from generate_wall import PREFIX, seed_model_folder  # noqa: E402

LENGTH = 1000
REQUESTS = {  # endpoint: the body of one 1000-token continuation, sampled as generate_wall.py samples (top-k 8)
    "/v1/completions": {"model": "seed_model", "prompt": PREFIX, "max_tokens": LENGTH, "stream": True, "top_p": 1,
                        "top_k": 8, "seed": 1},
    "/api/generate": {"model": "seed_model", "prefix": PREFIX, "length": LENGTH, "nsamples": 1, "temperature": 1.0,
                      "topk": 8, "topp": 1.0, "repetition_penalty": 1.0, "repetition_window": 0, "seed": 1},
}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(models, port, cache):
    """web_demo.py on `port`; returns (the process, seconds until it accepts connections)."""
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(ROOT / "web_demo.py"), "--model_path", str(models / "seed_model"),
                               "--models_dir", str(models), "--device", "cpu", "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONUNBUFFERED": "1"})
    for line in server.stdout:
        if line.startswith("serving"):  # said just before the server binds the port
            break
    while server.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, time.perf_counter() - start
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("web_demo.py ended before it listened")


def streamed_text(event):
    """The text one server-sent event carries (the API's chunk or the page's row update)."""
    if "choices" in event:
        return "".join(choice.get("text", "") for choice in event["choices"])
    return event.get("text", "")  # the page's {"row", "text"} events; its "start" event holds the prefix


def timed_request(port, path, body):
    """(seconds to the first character, characters, seconds from the first character to the end)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start, first, characters = time.perf_counter(), None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = streamed_text(json.loads(line[len("data: "):]))
            if text and first is None:
                first = time.perf_counter() - start
            characters += len(text)
    return first, characters, time.perf_counter() - start - (first or 0)


def main():
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="gpt2zh-serve-"))
    model = seed_model_folder(work / "models" / "seed_model")
    bandwidth = read_bandwidth(repeats=3)
    limit = roofline(model, 1, 8, LENGTH)[0] / bandwidth
    int8_limit = roofline(model, 1, 8, LENGTH, int8=True)[0] / bandwidth
    port = free_port()
    server, ready = start_server(work / "models", port, work / "cache")
    try:
        print(f"web_demo.py listening {ready:.1f} s after the command (model loaded, kernel trial of a new machine)")
        for path, body in REQUESTS.items():
            for attempt in ("first request", "second request"):
                first, characters, rest = timed_request(port, path, body)
                total = first + rest
                print(f"{path}, {attempt}: first character {first:.2f} s after the request, {characters} characters "
                      f"at {characters / rest:.0f} a second; {total:.1f} s in all, {total / limit:.2f}x the roofline "
                      f"of 1 x {LENGTH} ({limit:.1f} s at {bandwidth / 1e9:.0f} GB/s; {total / int8_limit:.2f}x the "
                      f"{int8_limit:.1f} s of int8 weights and cache)")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
