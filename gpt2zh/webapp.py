"""The web page: continue a beginning with any model folder under model/, the text streaming in as it is
sampled. Starlette serves it (server-sent events over a POST); each continuation runs in a worker thread, one
at a time (the CPU is the bottleneck), so the page keeps loading while a request waits its turn."""
import asyncio
import functools
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .articles import ARTICLE_END, TextStream, encode_prefix, missing_characters
from .errors import UserError
from .openai_api import ApiError, Cancelled, chat_prompt, parse_completion, run_completion, server_sent
from .sampling import Writer

PAGE = Path(__file__).with_name("web_page.html")
# setting: (lowest, highest, kind)
LIMITS = {"length": (1, 2000, int), "nsamples": (1, 4, int), "temperature": (0.05, 5.0, float),
          "topk": (0, 1000, int), "topp": (0.0, 1.0, float), "repetition_penalty": (0.5, 5.0, float),
          "repetition_window": (0, 2000, int)}
SKIPPED_FOLDERS = {"checkpoint"}


class SettingsError(Exception):
    """A setting the page sent that cannot be used: the message is shown on the page."""


def model_folders(models_dir):
    """Model folders under models_dir (final_model, model_epochN, best_model, ...), as paths relative to it."""
    root = Path(models_dir)
    found = [p.parent for p in root.rglob("config.json")
             if not SKIPPED_FOLDERS & set(p.parent.relative_to(root).parts) and not p.parent.name.startswith(".")]
    return sorted(str(p.relative_to(root)) for p in found)


def check_settings(body, folders):
    """The page's settings as numbers, or SettingsError naming the one that is wrong and its range."""
    if not isinstance(body, dict):
        raise SettingsError("the request must be a JSON object of settings")
    prefix = str(body.get("prefix", ""))
    if not prefix.strip():
        raise SettingsError("请先输入开头 / type a beginning first")
    settings = {"prefix": prefix, "stop_at_end": bool(body.get("stop_at_end", False))}
    for name, (low, high, kind) in LIMITS.items():
        try:
            value = kind(body[name])
        except (KeyError, TypeError, ValueError):
            raise SettingsError(f"{name}: 需要一个数 / must be a number from {low} to {high}") from None
        if not low <= value <= high:
            raise SettingsError(f"{name} {value}: 超出范围 / must be from {low} to {high}")
        settings[name] = value
    seed = body.get("seed")
    if seed in (None, ""):
        settings["seed"] = random.randrange(2**31)
    else:
        try:
            settings["seed"] = int(seed)
        except (TypeError, ValueError):
            raise SettingsError(f"seed {seed!r}: 需要一个整数或留空 / must be a whole number, or empty") from None
    model = body.get("model")
    if model not in folders:
        raise SettingsError(f"model {model!r}: 不是模型文件夹 / not a model folder under the models folder")
    settings["model"] = model
    return settings


class Admission:
    """At most `limit` requests waiting or being written at once (the model writes one at a time): past it a request
    is turned away (HTTP 429) instead of adding a thread that waits."""

    def __init__(self, limit):
        self.limit, self.count, self.lock = limit, 0, threading.Lock()

    def enter(self):
        with self.lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def leave(self):
        with self.lock:
            self.count -= 1


class Models:
    """Model folders loaded on first use (the last two kept), the turn that lets one continuation run, and the one
    thread that loads and samples (`run`). A continuation sampled on each request's own thread ran at two thirds of
    generate.py's speed on a 2-core Zen 4 (the C++ step on two threads 5.2 ms where it takes 2.4): every thread that
    has run OpenMP work keeps its own team of OpenMP threads, and where a process has more of them than cores, GNU
    OpenMP spins only 100 times before it puts a waiting thread to sleep (its GOMP_SPINCOUNT), to be woken at each of
    the step's ~50 parallel regions (docs/BENCHMARKS.md)."""

    def __init__(self, models_dir, device, precision):
        self.models_dir, self.device, self.precision = Path(models_dir), device, precision
        self.loaded = {}
        self.turn = threading.Lock()
        self.sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampling")

    def run(self, work, *args):
        """work(*args) on the sampling thread; its result, or its exception raised here."""
        return self.sampler.submit(work, *args).result()

    def writer(self, name):
        if name not in self.loaded:
            if len(self.loaded) >= 2:
                self.loaded.pop(next(iter(self.loaded)))
            # the kernel for one row first, the page's usual request (watched as it streams); others on first use
            self.loaded[name] = Writer(self.models_dir / name, None, self.device, self.precision)
        return self.loaded[name]

    def take_turn(self, cancelled, on_wait=None):
        """Wait for the turn; False if the client went away first (its place in the queue is freed at once)."""
        if self.turn.acquire(blocking=False):
            return True
        if on_wait:
            on_wait()
        while not self.turn.acquire(timeout=0.2):
            if cancelled.is_set():
                return False
        return True


def continue_beginning(models, admission, settings, emit, cancelled):
    """Run in a worker thread (the page): wait for the turn, sample, and emit events (dicts) as the text grows."""
    if not models.take_turn(cancelled, functools.partial(emit, {"queued": True})):
        admission.leave()
        emit(None)
        return
    try:
        if cancelled.is_set():
            return
        models.run(write_for_page, models, settings, emit, cancelled)
    except Cancelled:
        pass
    except UserError as error:
        emit({"error": str(error)})
    except Exception as error:  # noqa: BLE001 - shown on the page: a stream that just stopped would hang it
        emit({"error": f"出错了 / failed: {type(error).__name__}: {error}"})
        raise
    finally:
        models.turn.release()
        admission.leave()
        emit(None)


class PageRows:
    """The page's rows as they are sampled: after every step (sample()'s on_step), each row's new text goes out as
    an event until the row has written the article's end."""

    def __init__(self, tokenizer, prefix_ids, rows, end_id, emit, cancelled):
        self.streams = [TextStream(tokenizer, prefix_ids) for _ in range(rows)]
        self.ended = [False] * rows
        self.end_id, self.emit, self.cancelled = end_id, emit, cancelled

    def __call__(self, ids):
        if self.cancelled.is_set():
            raise Cancelled
        for row, stream in enumerate(self.streams):
            if not self.ended[row]:
                piece = stream.push(int(ids[row]))
                self.ended[row] = int(ids[row]) == self.end_id
                if piece:
                    self.emit({"row": row, "text": piece})


def write_for_page(models, settings, emit, cancelled):
    start = time.time()
    writer = models.writer(settings["model"])
    tokenizer = writer.tokenizer
    prefix_ids = encode_prefix(tokenizer, settings["prefix"])
    missing = missing_characters(tokenizer, settings["prefix"])
    if missing:
        emit({"warning": f"词表里没有这些字，会变成 [UNK] / not in the vocabulary: {''.join(missing)}"})
    end_id = tokenizer.convert_tokens_to_ids(ARTICLE_END) if settings["stop_at_end"] else None
    rows = PageRows(tokenizer, prefix_ids, settings["nsamples"], end_id, emit, cancelled)
    emit({"start": [s.text for s in rows.streams], "seed": settings["seed"]})
    processors = writer.processors(settings["temperature"], settings["topk"], settings["topp"],
                                   settings["repetition_penalty"], repetition_window=settings["repetition_window"])
    writer.write(prefix_ids, settings["length"], settings["nsamples"], processors, settings["seed"],
                 settings["stop_at_end"], rows)
    emit({"done": True, "seconds": round(time.time() - start, 2)})


def write_for_api(models, admission, request, cancelled, emit, chat=False):
    """Run in a worker thread (the API): the completion's chunks, then ("done", body) or ("error", ApiError);
    None at the end. Leaves the queue however it ends."""
    try:
        if not models.take_turn(cancelled):
            return
        try:
            body = models.run(lambda: run_completion(models.writer(request.model), request, cancelled,
                                                     lambda chunk: emit(("chunk", chunk)), chat))
            emit(("done", body))
        finally:
            models.turn.release()
    except ApiError as error:
        emit(("error", error))
    except UserError as error:
        emit(("error", ApiError(400, str(error))))
    except Exception as error:  # noqa: BLE001 - the client gets OpenAI's error shape, the log the traceback
        emit(("error", ApiError(500, f"{type(error).__name__}: {error}", kind="server_error")))
        raise
    finally:
        admission.leave()
        emit(None)


@dataclass
class ApiSettings:
    """web_demo.py's flags for the API."""
    api_key: str = ""
    max_tokens: int = 2048
    chat_as_text: bool = False
    page: bool = True
    max_queue: int = 8


@dataclass
class Server:
    """What every request handler reads (as request.app.state.server): the models, the queue and the flags."""
    models: Models
    admission: Admission
    models_dir: Path
    settings: ApiSettings
    default_model: str = None
    page: str = ""  # the web page's HTML, read once


def create_app(models_dir, device, precision, default_model=None, settings=None):
    from starlette.applications import Starlette
    from starlette.routing import Route

    settings = settings or ApiSettings()
    server = Server(Models(models_dir, device, precision), Admission(settings.max_queue), Path(models_dir), settings,
                    default_model, PAGE.read_text(encoding="utf-8") if settings.page else "")
    routes = [Route("/v1/models", list_models_api), Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    if settings.page:
        routes += [Route("/", index), Route("/api/models", list_models_page),
                   Route("/api/generate", generate_page, methods=["POST"])]
    if default_model:
        server.models.run(server.models.writer, default_model)  # the first continuation should not wait for loading
    app = Starlette(routes=routes)
    app.state.server = server
    return app


def start_writing(target, models, admission, request, **options):
    """`target(models, admission, request, cancelled=…, emit=…, **options)` in a worker thread; returns the queue its
    events arrive on (in this event loop) and the event that cancels it."""
    loop, events, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
    emit = functools.partial(loop.call_soon_threadsafe, events.put_nowait)
    threading.Thread(target=target, args=(models, admission, request), daemon=True,
                     kwargs={"cancelled": cancelled, "emit": emit, **options}).start()
    return events, cancelled


def api_error(error, headers=None):
    from starlette.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def check_key(request, settings):
    if settings.api_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
        raise ApiError(401, "Incorrect API key provided: send it as the header Authorization: Bearer <key>",
                       code="invalid_api_key")


async def read_json(request):
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "the request body must be JSON") from None


async def list_models_api(request):
    """GET /v1/models: the model folders, in OpenAI's list format."""
    from starlette.responses import JSONResponse

    server = request.app.state.server
    try:
        check_key(request, server.settings)
    except ApiError as error:
        return api_error(error)
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": int((server.models_dir / name / "config.json").stat().st_mtime),
         "owned_by": "gpt2zh"} for name in model_folders(server.models_dir)]})


def busy(settings):
    return api_error(ApiError(429, f"the server is busy: {settings.max_queue} requests are waiting or being written "
                                   f"(web_demo.py --max_queue); retry in a moment", kind="rate_limit_error",
                              code="rate_limit_exceeded"), {"Retry-After": "2"})


async def completions(request):
    """POST /v1/completions: a body, or server-sent chunks and [DONE]."""
    return await answer_completion(request, chat=False)


async def chat_completions(request):
    """POST /v1/chat/completions: 400 for a base model, unless started with --chat_as_text."""
    return await answer_completion(request, chat=True)


async def answer_completion(request, chat):
    from starlette.responses import StreamingResponse

    server = request.app.state.server
    try:
        check_key(request, server.settings)
        body = await read_json(request)
        if chat and not server.settings.chat_as_text:
            raise ApiError(400, "this model is a base model without a chat template: use /v1/completions with a "
                                "prompt (or start web_demo.py with --chat_as_text to continue the messages' text)")
        if chat:
            body = {**body, "prompt": chat_prompt(body)}
        completion = parse_completion(body, model_folders(server.models_dir), server.settings.max_tokens)
    except ApiError as error:
        return api_error(error)
    if not server.admission.enter():
        return busy(server.settings)
    events, cancelled = start_writing(write_for_api, server.models, server.admission, completion, chat=chat)
    if completion.stream:
        return StreamingResponse(stream_api(events, cancelled), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await answer_api(request, events, cancelled)


async def stream_api(events, cancelled):
    """The chunks as server-sent events, then [DONE]; a client that leaves ends the writing at its next step."""
    try:
        while (event := await events.get()) is not None:
            kind, value = event
            if kind == "chunk":
                yield server_sent(value)
            elif kind == "error":
                yield server_sent(value.body())
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()


async def answer_api(request, events, cancelled):
    """The whole body once written; a client that disconnects while it waits gives its place up."""
    from starlette.responses import JSONResponse

    result = None
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                cancelled.set()
            continue
        if event is None:
            break
        if event[0] in ("done", "error"):
            result = event
    if result is None:
        return api_error(ApiError(499, "the client went away", code="cancelled"))
    kind, value = result
    return JSONResponse(value) if kind == "done" else api_error(value)


async def index(request):
    """The web page."""
    from starlette.responses import HTMLResponse

    return HTMLResponse(request.app.state.server.page)


async def list_models_page(request):
    """The page's list of models, the one it starts with, and the limits of its settings."""
    from starlette.responses import JSONResponse

    server = request.app.state.server
    folders = model_folders(server.models_dir)
    default = server.default_model if server.default_model in folders else (folders[-1] if folders else None)
    return JSONResponse({"models": folders, "default": default, "limits": {k: v[:2] for k, v in LIMITS.items()}})


async def generate_page(request):
    """The page's continuations: server-sent events over a POST."""
    from starlette.responses import JSONResponse, StreamingResponse

    server = request.app.state.server
    try:
        try:
            body = await request.json()
        except ValueError:
            raise SettingsError("the request must be JSON") from None
        settings = check_settings(body, model_folders(server.models_dir))
    except SettingsError as error:
        return JSONResponse({"error": str(error)}, status_code=400)
    if not server.admission.enter():
        return JSONResponse({"error": "服务器忙，请稍后再试 / the server is busy: try again in a moment"},
                            status_code=429, headers={"Retry-After": "2"})
    events, cancelled = start_writing(continue_beginning, server.models, server.admission, settings)
    return StreamingResponse(stream_page(events, cancelled), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def stream_page(events, cancelled):
    try:
        while (event := await events.get()) is not None:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    finally:  # also when the browser closed the tab or pressed Stop: sampling ends at its next step
        cancelled.set()
