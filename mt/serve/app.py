"""`mt serve`: an HTTP JSON service over one loaded model (or ensemble), on FastAPI and uvicorn.

    POST /translate  {"text": "..." | [...], "beam_size": 4, "nbest": 1, "prefix": "..." | [...], "alignment": false}
    GET  /health     {"status": "ok", ...}
    GET  /           page.html: paste text, see the translation, the n-best list and the attention

Every search runs on one worker thread. Requests wait in a queue, and the worker translates all the waiting
sentences that share search settings as one call of `translate_nbest`, up to a token budget, so a hundred
callers sending one sentence each cost about what one caller sending a hundred does. A bad request is a 4xx
with {"error": one line}; a failed search is a 500 with the same shape; the service keeps serving either way.
"""

import asyncio
import dataclasses
import importlib
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from mt.errors import MTError
from mt.runtime import decode_batch_tokens
from mt.translate import Hypothesis, Translator, align, translate_nbest, why_no_alignments

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")
FIELDS = ("text", "beam_size", "nbest", "prefix", "alignment")


def require_serve() -> None:
    """Stop with one line naming the `pip install` when FastAPI or uvicorn is missing."""
    try:
        for module in ("fastapi", "uvicorn"):
            importlib.import_module(module)
    except ImportError:
        raise MTError('mt serve needs fastapi and uvicorn: pip install -e ".[serve]"') from None


@dataclass
class Limits:
    max_sentences: int = 64  # per request
    max_tokens: int = 256  # source pieces per sentence
    max_beam: int = 32


class BadRequest(Exception):
    """A request the service refuses: HTTP `status` with a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One request's sentences, waiting for the worker."""

    lines: list[str]
    prefixes: list[str] | None
    beam_size: int
    nbest: int
    alignment: bool
    tokens: int  # source pieces in all, for the batch budget
    future: Future = field(default_factory=Future)

    @property
    def settings(self) -> tuple[int, int]:
        return self.beam_size, self.nbest


def parse_request(body: bytes, translator: Translator, limits: Limits) -> Job:
    """The body of POST /translate -> a Job, or BadRequest naming the field."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None
    if not isinstance(request, dict):
        raise BadRequest(422, "the body must be a JSON object with a 'text' field")
    unknown = sorted(set(request) - set(FIELDS))
    if unknown:
        raise BadRequest(422, f"unknown field {unknown[0]!r}; expected some of {', '.join(FIELDS)}")
    if "text" not in request:
        raise BadRequest(422, "missing field 'text' (a string or a list of strings)")
    lines = _strings(request["text"], "text")
    if not lines:
        raise BadRequest(422, "'text' is an empty list")
    if len(lines) > limits.max_sentences:
        raise BadRequest(413, f"'text' has {len(lines)} sentences; the limit is {limits.max_sentences}")
    prefixes = None
    if request.get("prefix") is not None:
        prefixes = _strings(request["prefix"], "prefix")
        if len(prefixes) != len(lines):
            raise BadRequest(422, f"'prefix' has {len(prefixes)} entries for {len(lines)} sentences")
    beam = _integer(request, "beam_size", translator.decode.beam_size, 1, limits.max_beam)
    nbest = _integer(request, "nbest", 1, 1, beam)
    alignment = request.get("alignment", False)
    if not isinstance(alignment, bool):
        raise BadRequest(422, "'alignment' must be true or false")
    if alignment and (reason := why_no_alignments(translator)) is not None:
        raise BadRequest(422, f"'alignment': {reason}")
    for name, strings in (("text", lines), ("prefix", prefixes or [])):
        if "\n" in "".join(strings):
            raise BadRequest(422, f"an item of '{name}' contains a line break; send one sentence per list item")
    lengths = [len(ids) for ids in translator.vocab.src.encode(lines)]
    # A prefix is forced into the translation: as long a one would make the search as long, so it has the limit too.
    prefix_lengths = [len(ids) for ids in translator.vocab.tgt.encode(prefixes)] if prefixes else []
    for name, counts in (("text", lengths), ("prefix", prefix_lengths)):
        for i, n in enumerate(counts):
            if n > limits.max_tokens:
                raise BadRequest(413, f"'{name}'[{i}] has {n} tokens; the limit is {limits.max_tokens}")
    return Job(lines, prefixes, beam, nbest, alignment, sum(lengths) + len(lines))


def _strings(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BadRequest(422, f"'{name}' must be a string or a list of strings")


def _integer(request: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(422, f"'{name}' must be an integer")
    if not lo <= value <= hi:
        raise BadRequest(422, f"'{name}' must be between {lo} and {hi}, got {value}")
    return value


def response(hyps: list[Hypothesis], nbest: int, alignment: bool) -> dict:
    """One sentence's part of the answer."""
    best = hyps[0]
    out = {"text": best.text, "score": round(best.score, 4)}
    if nbest > 1:
        out["nbest"] = [{"text": h.text, "score": round(h.score, 4), "log_prob": round(h.log_prob, 4)}
                        for h in hyps[:nbest]]
    if alignment:
        out["alignment"] = best.alignment or ""
        out["attention"] = best.attention
    return out


class Batcher:
    """The worker thread and its queue: each round takes the oldest waiting job and every other waiting job
    with the same search settings, up to `max_tokens` source tokens, and translates them in one call."""

    def __init__(self, translator: Translator, max_tokens: int):
        self.translator, self.max_tokens = translator, max_tokens
        self.queue: "queue.Queue[Job]" = queue.Queue()
        self.waiting: list[Job] = []  # taken from the queue, left for a later round
        self.batches: list[int] = []  # sentences per round, for tests and benchmarks
        threading.Thread(target=self._run, name="mt-serve-worker", daemon=True).start()

    def submit(self, job: Job) -> Future:
        self.queue.put(job)
        return job.future

    def _take(self) -> list[Job]:
        """The next round's jobs (blocks until there is one)."""
        if not self.waiting:
            self.waiting.append(self.queue.get())
        while True:  # everything that has arrived meanwhile
            try:
                self.waiting.append(self.queue.get_nowait())
            except queue.Empty:
                break
        first = self.waiting[0]
        jobs, budget, rest = [], self.max_tokens, []
        for job in self.waiting:
            if job.settings == first.settings and (not jobs or job.tokens <= budget):
                jobs.append(job)
                budget -= job.tokens
            else:
                rest.append(job)
        self.waiting = rest
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            try:
                results = self._translate(jobs)
            except Exception as e:  # a failed search fails its requests, not the service
                log.exception("search failed")
                for job in jobs:
                    job.future.set_exception(e)
                continue
            for job, result in zip(jobs, results):
                job.future.set_result(result)

    def _translate(self, jobs: list[Job]) -> list[list[list[Hypothesis]]]:
        beam, nbest = jobs[0].settings
        decode = dataclasses.replace(self.translator.decode, beam_size=beam, nbest=nbest)
        translator = dataclasses.replace(self.translator, decode=decode)
        lines = [line for job in jobs for line in job.lines]
        prefixes = ([p for job in jobs for p in (job.prefixes or [""] * len(job.lines))]
                    if any(job.prefixes for job in jobs) else None)
        self.batches.append(len(lines))
        hyps = translate_nbest(translator, lines, prefixes)
        results, start = [], 0
        for job in jobs:
            mine = hyps[start:start + len(job.lines)]
            start += len(job.lines)
            if job.alignment:
                src = translator.vocab.src.encode(job.lines)
                for ids, line, nbest_list in zip(src, job.lines, mine):
                    if line.strip():
                        align(translator, ids, nbest_list[:1])
            results.append(mine)
        return results


def create_app(translator: Translator, limits: Limits | None = None, name: str = "mt"):
    """The FastAPI application serving `translator`. (No `from __future__ import annotations` in this module:
    FastAPI reads the handlers' annotations, and `Request` is imported here, not at the top.)"""
    require_serve()
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    limits = limits or Limits()
    batcher = Batcher(translator, decode_batch_tokens(translator.decode.max_tokens, translator.device))
    app = FastAPI(title=f"mt serve: {name}", docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    started = time.time()

    @app.exception_handler(404)
    async def not_found(request: Request, exc):
        return JSONResponse({"error": f"no such page: {request.url.path}"}, status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc):
        return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}"}, status_code=405)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "uptime_s": round(time.time() - started, 1),
                "waiting": batcher.queue.qsize() + len(batcher.waiting), "beam_size": translator.decode.beam_size,
                "alignment": why_no_alignments(translator) is None, "limits": dataclasses.asdict(limits)}

    @app.post("/translate")
    async def translate(request: Request):
        try:
            job = parse_request(await request.body(), translator, limits)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        try:
            hyps = await asyncio.wrap_future(batcher.submit(job))
        except Exception as e:
            return JSONResponse({"error": f"search failed: {type(e).__name__}: {e}".splitlines()[0]}, status_code=500)
        return {"translations": [response(h, job.nbest, job.alignment) for h in hyps]}

    return app


def serve(translator: Translator, host: str, port: int, limits: Limits, name: str) -> None:
    """Run the service until interrupted."""
    app = create_app(translator, limits, name)
    import uvicorn

    log.info("serving %s on http://%s:%d", name, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
