"""The OpenAI-compatible HTTP API, as llama.cpp's and vLLM's servers speak it: GET /v1/models, POST /v1/completions
(and, opted in, /v1/chat/completions), errors in OpenAI's shape, an optional API key. Each completion is written by
the model folder's Writer in a worker thread, one at a time, behind the server's bounded queue (webapp.Admission)."""
import functools
import json
import random
import time
import uuid
from dataclasses import dataclass, field

from .articles import ARTICLE_END, TextStream, encode_prefix, missing_characters

MAX_N = 8  # completions a request may ask for (n), each a row of one batch
MAX_STOPS = 4  # stop strings, as OpenAI allows
UNSUPPORTED = ("logprobs", "echo", "best_of", "suffix", "logit_bias", "tools", "functions", "response_format")


class ApiError(Exception):
    """A request the API refuses: HTTP status and OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class Cancelled(Exception):
    """The client went away."""


class Finished(Exception):
    """Every row of a completion has stopped (an end marker or a stop string)."""


@dataclass
class CompletionRequest:
    model: str
    prompts: list
    max_tokens: int = 16
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    repetition_window: int = 0
    stream: bool = False


def number(body, name, kind, low, high, default):
    """body[name] as `kind` within [low, high] (`default` when absent), or an ApiError naming the field."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ApiError(400, f"{name}: must be {'an integer' if kind is int else 'a number'} from {low} to {high}",
                       param=name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} {value}: must be from {low} to {high}", param=name)
    return kind(value)


def strings(body, name, most):
    """body[name] as a list of non-empty strings (a string is a list of one)."""
    value = body.get(name)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values) or len(values) > most:
        raise ApiError(400, f"{name}: must be a non-empty string or a list of at most {most} of them", param=name)
    return values


def parse_completion(body, folders, max_tokens):
    """A /v1/completions request body as a CompletionRequest, or the ApiError of its first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, 0):
            raise ApiError(400, f"{name}: not supported by this server", param=name)
    model = body.get("model")
    if model not in folders:
        raise ApiError(404, f"The model `{model}` does not exist; GET /v1/models lists the models here", param="model",
                       code="model_not_found")
    prompts = strings(body, "prompt", 64)
    if not prompts:
        raise ApiError(400, "prompt: must be a non-empty string or a list of them", param="prompt")
    if "max_tokens" in body and isinstance(body["max_tokens"], int) and body["max_tokens"] > max_tokens:
        raise ApiError(400, f"max_tokens {body['max_tokens']}: this server writes at most {max_tokens} tokens a "
                            f"completion (web_demo.py --max_tokens)", param="max_tokens")
    return CompletionRequest(
        model, prompts, number(body, "max_tokens", int, 1, max_tokens, 16), number(body, "n", int, 1, MAX_N, 1),
        number(body, "temperature", float, 0.0, 2.0, 1.0), number(body, "top_p", float, 1e-6, 1.0, 1.0),
        number(body, "top_k", int, -1, 100000, 0), strings(body, "stop", MAX_STOPS),
        number(body, "seed", int, -(2**63), 2**63 - 1, None), number(body, "presence_penalty", float, -2.0, 2.0, 0.0),
        number(body, "frequency_penalty", float, -2.0, 2.0, 0.0),
        number(body, "repetition_penalty", float, 0.01, 10.0, 1.0),
        number(body, "repetition_window", int, 0, 1_000_000, 0), bool(body.get("stream", False)))


def chat_prompt(body):
    """The opt-in reading of a chat request (web_demo.py --chat_as_text): the messages' text, one a line, is the
    beginning to continue."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise ApiError(400, "messages: must be a non-empty list of {role, content} objects", param="messages")
    return "\n".join(m["content"] for m in messages)


class Row:
    """One completion as it is sampled: its text (what a TextStream adds, cut at a stop string), its tokens, and
    why it ended."""

    def __init__(self, tokenizer, prefix_ids, stops):
        self.stream, self.stops = TextStream(tokenizer, prefix_ids), stops
        self.text, self.tokens, self.reason = "", 0, None
        self.sent = 0  # characters already streamed
        self.hold = max(map(len, stops), default=1) - 1  # a stop string may still be forming in the last characters

    def push(self, token_id, end_id):
        self.tokens += 1
        if token_id == end_id:
            self.reason = "stop"
            return
        start = max(0, len(self.text) - self.hold)
        self.text += self.stream.push(token_id)
        found = [i for i in (self.text.find(stop, start) for stop in self.stops) if i >= 0]
        if found:
            self.text, self.reason = self.text[:min(found)], "stop"

    def unsent(self):
        """Text that can be streamed now: all of it once the row ended, else all but what a stop could still take."""
        ready = len(self.text) if self.reason else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:ready], ready
        return piece


class CompletionStep:
    """Called by sample() after every step: each unfinished row takes its new token; `on_piece(row index, text)`
    gets the text that can be streamed. Stops the sampling once every row has ended."""

    def __init__(self, rows, end_id, cancelled, on_piece):
        self.rows, self.end_id, self.cancelled, self.on_piece = rows, end_id, cancelled, on_piece

    def __call__(self, ids):
        if self.cancelled.is_set():
            raise Cancelled
        for index, row in enumerate(self.rows):
            if row.reason is None:
                row.push(int(ids[index]), self.end_id)
                if self.on_piece and (piece := row.unsent()):
                    self.on_piece(index, piece)
        if all(row.reason for row in self.rows):
            raise Finished


def complete(writer, request, prompt, cancelled, on_piece=None):
    """The rows of `request.n` completions of one prompt: sampled in one batch by `writer` (the same draws as
    generate.py --stop_at_end with the same settings and seed), each ending at the article's end, a stop string or
    max_tokens. `on_piece(row index, text)` gets streamed text as it comes. Returns ([Row], prompt tokens)."""
    tokenizer = writer.tokenizer
    missing = missing_characters(tokenizer, prompt)
    if missing:
        raise ApiError(400, f"prompt: these characters are not in the model's vocabulary: {''.join(missing)}",
                       param="prompt", code="unknown_characters")
    prefix_ids = encode_prefix(tokenizer, prompt)
    end_id = tokenizer.convert_tokens_to_ids(ARTICLE_END)
    step = CompletionStep([Row(tokenizer, prefix_ids, request.stop) for _ in range(request.n)], end_id, cancelled,
                          on_piece)
    greedy = request.temperature == 0
    processors = writer.processors(1.0 if greedy else request.temperature, max(request.top_k, 0), request.top_p,
                                   request.repetition_penalty, request.presence_penalty, request.frequency_penalty,
                                   len(prefix_ids), repetition_window=request.repetition_window)
    seed = request.seed if request.seed is not None else random.randrange(2**31)
    try:
        writer.write(prefix_ids, request.max_tokens, request.n, processors, seed, True, step, greedy=greedy)
    except Finished:
        pass
    rows = step.rows
    for index, row in enumerate(rows):
        row.reason = row.reason or "length"
        if on_piece and (piece := row.unsent()):
            on_piece(index, piece)
    return rows, len(prefix_ids)


def chunk_or_body(request, choices, usage, created, ident, chat, streamed):
    """A response body (or, `streamed`, a chunk) of a completion, or of a chat completion with `chat`."""
    if chat:
        key = "delta" if streamed else "message"
        choices = [{"index": c["index"], key: {"role": "assistant", "content": c["text"]},
                    "finish_reason": c["finish_reason"]} for c in choices]
        kind = "chat.completion.chunk" if streamed else "chat.completion"
    else:
        kind = "text_completion"
    body = {"id": ident, "object": kind, "created": created, "model": request.model, "choices": choices}
    return {**body, "usage": usage} if usage else body


def emit_piece(emit, request, first, created, ident, chat, index, text):
    """A streamed chunk: the new text of the prompt's row `index` (choice first + index)."""
    choice = {"index": first + index, "text": text, "logprobs": None, "finish_reason": None}
    emit(chunk_or_body(request, [choice], None, created, ident, chat, True))


def run_completion(writer, request, cancelled, emit, chat=False):
    """Write every prompt's `n` completions; with `request.stream`, `emit` gets each chunk (a dict) as the text
    grows and the last chunk of each choice with its finish_reason. Returns the whole response body."""
    prefix = "chatcmpl" if chat else "cmpl"
    ident, created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for number_of_prompt, prompt in enumerate(request.prompts):
        first = number_of_prompt * request.n
        on_piece = functools.partial(emit_piece, emit, request, first, created, ident, chat)
        rows, used = complete(writer, request, prompt, cancelled, on_piece if request.stream else None)
        prompt_tokens += used
        completion_tokens += sum(row.tokens for row in rows)
        for index, row in enumerate(rows):
            choices.append({"index": first + index, "text": row.text, "logprobs": None, "finish_reason": row.reason})
            if request.stream:
                last = {**choices[-1], "text": ""}
                emit(chunk_or_body(request, [last], None, created, ident, chat, True))
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return chunk_or_body(request, choices, usage, created, ident, chat, False)


def server_sent(chunk):
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
