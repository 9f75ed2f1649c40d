"""The web page: continue a beginning with any model folder under model/, the text streaming in as it is
sampled. Starlette serves it (server-sent events over a POST); each continuation runs in a worker thread, one
at a time (the CPU is the bottleneck), so the page keeps loading while a request waits its turn."""
import asyncio
import json
import random
import threading
import time
from pathlib import Path

from .articles import ARTICLE_END, TextStream, encode_prefix, missing_characters
from .errors import UserError
from .sampling import Writer

PAGE = Path(__file__).with_name("web_page.html")
# setting: (lowest, highest, kind)
LIMITS = {"length": (1, 2000, int), "nsamples": (1, 4, int), "temperature": (0.05, 5.0, float),
          "topk": (0, 1000, int), "topp": (0.0, 1.0, float), "repetition_penalty": (0.5, 5.0, float)}
SKIPPED_FOLDERS = {"checkpoint"}


class SettingsError(Exception):
    """A setting the page sent that cannot be used: the message is shown on the page."""


class Cancelled(Exception):
    """The browser went away or pressed Stop."""


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


class Models:
    """Model folders loaded on first use (the last two kept), and the lock that lets one continuation run."""

    def __init__(self, models_dir, device, precision):
        self.models_dir, self.device, self.precision = Path(models_dir), device, precision
        self.loaded = {}
        self.turn = threading.Lock()

    def writer(self, name):
        if name not in self.loaded:
            if len(self.loaded) >= 2:
                self.loaded.pop(next(iter(self.loaded)))
            # the kernel for one row first, the page's usual request (watched as it streams); others on first use
            self.loaded[name] = Writer(self.models_dir / name, None, self.device, self.precision)
        return self.loaded[name]


def continue_beginning(models, settings, emit, cancelled):
    """Run in a worker thread: wait for the turn, sample, and emit events (dicts) as the text grows."""
    if not models.turn.acquire(blocking=False):
        emit({"queued": True})
        models.turn.acquire()
    try:
        if cancelled.is_set():
            return
        start = time.time()
        writer = models.writer(settings["model"])
        tokenizer = writer.tokenizer
        prefix_ids = encode_prefix(tokenizer, settings["prefix"])
        missing = missing_characters(tokenizer, settings["prefix"])
        if missing:
            emit({"warning": f"词表里没有这些字，会变成 [UNK] / not in the vocabulary: {''.join(missing)}"})
        rows = settings["nsamples"]
        streams = [TextStream(tokenizer, prefix_ids) for _ in range(rows)]
        ended = [False] * rows
        end_id = tokenizer.convert_tokens_to_ids(ARTICLE_END) if settings["stop_at_end"] else None
        emit({"start": [s.text for s in streams], "seed": settings["seed"]})

        def on_step(ids):
            if cancelled.is_set():
                raise Cancelled
            for row, stream in enumerate(streams):
                if not ended[row]:
                    piece = stream.push(int(ids[row]))
                    ended[row] = int(ids[row]) == end_id
                    if piece:
                        emit({"row": row, "text": piece})

        processors = writer.processors(settings["temperature"], settings["topk"], settings["topp"],
                                       settings["repetition_penalty"])
        writer.write(prefix_ids, settings["length"], rows, processors, settings["seed"], settings["stop_at_end"],
                     on_step)
        emit({"done": True, "seconds": round(time.time() - start, 2)})
    except Cancelled:
        pass
    except UserError as error:
        emit({"error": str(error)})
    except Exception as error:  # noqa: BLE001 - shown on the page: a stream that just stopped would hang it
        emit({"error": f"出错了 / failed: {type(error).__name__}: {error}"})
        raise
    finally:
        models.turn.release()
        emit(None)


def create_app(models_dir, device, precision, default_model=None):
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.routing import Route

    models = Models(models_dir, device, precision)
    page = PAGE.read_text(encoding="utf-8")

    async def index(request):
        return HTMLResponse(page)

    async def list_models(request):
        folders = model_folders(models_dir)
        return JSONResponse({"models": folders, "default": default_model if default_model in folders else
                             (folders[-1] if folders else None), "limits": {k: v[:2] for k, v in LIMITS.items()}})

    async def generate(request):
        try:
            try:
                body = await request.json()
            except ValueError:
                raise SettingsError("the request must be JSON") from None
            settings = check_settings(body, model_folders(models_dir))
        except SettingsError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        loop, events, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)  # noqa: E731
        threading.Thread(target=continue_beginning, args=(models, settings, emit, cancelled), daemon=True).start()

        async def stream():
            try:
                while (event := await events.get()) is not None:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            finally:  # also when the browser closed the tab or pressed Stop: sampling ends at its next step
                cancelled.set()
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    if default_model:
        models.writer(default_model)  # the first continuation should not wait for loading
    return Starlette(routes=[Route("/", index), Route("/api/models", list_models),
                             Route("/api/generate", generate, methods=["POST"])])
