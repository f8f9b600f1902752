"""`mt serve`: answers against `mt translate` on the same lines, request batching under concurrent callers,
4xx for bad requests and 500 for a failed search without a dead service, and the page in a real browser."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

import mt.serve.app as app_module
from mt.serve.app import Limits, create_app
from mt.decoder_only import DecoderOnlyTransformer
from mt.errors import MTError
from mt.translate import load_translator, translate_lines, translate_nbest, translate_stream

from conftest import MULTI30K

LINES = (MULTI30K / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:40]


@pytest.fixture(scope="module")
def translator(tiny_checkpoint):
    return load_translator(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def client(translator):
    return TestClient(create_app(translator, Limits(max_sentences=16, max_tokens=150)))


@pytest.fixture(scope="module")
def server(translator):
    """A real uvicorn server on a free loopback port, in a thread: (base URL, app)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(translator)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=10)


def post(url: str, body: dict) -> dict:
    """POST to the in-process server of the `server` fixture, on 127.0.0.1 (no network)."""
    request = urllib.request.Request(url + "/translate", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def test_the_service_answers_what_mt_translate_answers(client, translator):
    reply = client.post("/translate", json={"text": LINES[:12]})
    assert reply.status_code == 200
    assert [t["text"] for t in reply.json()["translations"]] == translate_lines(translator, LINES[:12])
    one = client.post("/translate", json={"text": LINES[3]}).json()["translations"]
    assert [t["text"] for t in one] == translate_lines(translator, [LINES[3]])
    assert client.get("/health").json()["status"] == "ok"


def test_nbest_prefix_and_alignment_match_the_library(client, translator):
    reply = client.post("/translate", json={"text": LINES[:2], "beam_size": 2, "nbest": 2,
                                            "prefix": ["A man", ""], "alignment": True}).json()
    two = dataclasses.replace(translator, decode=dataclasses.replace(translator.decode, beam_size=2, nbest=2))
    expected = translate_nbest(two, LINES[:2], ["A man", ""], alignment=True)
    for got, want in zip(reply["translations"], expected):
        assert [h["text"] for h in got["nbest"]] == [h.text for h in want]
        assert got["alignment"] == want[0].alignment
        attention = got["attention"]
        assert len(attention["weights"]) == len(attention["target"])
        assert all(len(row) == len(attention["source"]) and abs(sum(row) - 1) < 1e-2 for row in attention["weights"])
    assert reply["translations"][0]["text"].startswith("A man")


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 422, "JSON object"),
    (b'{"txt": "x"}', 422, "unknown field 'txt'"),
    (b'{"beam_size": 2}', 422, "missing field 'text'"),
    (b'{"text": 5}', 422, "'text' must be a string or a list of strings"),
    (b'{"text": ["a", 3]}', 422, "'text' must be"),
    (b'{"text": []}', 422, "empty list"),
    (b'{"text": "a", "beam_size": "4"}', 422, "'beam_size' must be an integer"),
    (b'{"text": "a", "beam_size": 0}', 422, "'beam_size' must be between 1 and 32"),
    (b'{"text": "a", "beam_size": 2, "nbest": 3}', 422, "'nbest' must be between 1 and 2"),
    (b'{"text": "a", "alignment": "yes"}', 422, "'alignment' must be true or false"),
    (b'{"text": ["a", "b"], "prefix": ["x"]}', 422, "'prefix' has 1 entries for 2 sentences"),
    (json.dumps({"text": ["ein Hund"] * 17}).encode(), 413, "17 sentences; the limit is 16"),
    (json.dumps({"text": ["ok", " ".join(["Hund"] * 200)]}).encode(), 413, "'text'[1] has"),
    (json.dumps({"text": ["ok", "ok"], "prefix": ["A", " ".join(["dog"] * 200)]}).encode(), 413, "'prefix'[1] has"),
    (b'{"text": "a", "prefix": "A\\nB"}', 422, "an item of 'prefix' contains a line break"),
])
def test_bad_requests_get_a_4xx_with_one_line_and_the_service_keeps_serving(client, body, status, words):
    reply = client.post("/translate", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert words in error and "\n" not in error
    assert client.post("/translate", json={"text": "ein Hund"}).status_code == 200


def test_unknown_pages_and_methods_are_4xx_in_the_same_shape(client):
    assert client.get("/nothing").status_code == 404 and "error" in client.get("/nothing").json()
    assert client.get("/translate").status_code == 405 and "error" in client.get("/translate").json()


def test_a_failing_search_is_a_500_and_the_next_request_is_served(client, monkeypatch):
    real = app_module.translate_nbest

    def fail_once(*args, **kwargs):
        monkeypatch.setattr(app_module, "translate_nbest", real)
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(app_module, "translate_nbest", fail_once)
    reply = client.post("/translate", json={"text": "ein Hund"})
    assert reply.status_code == 500 and reply.json()["error"] == "search failed: RuntimeError: out of memory"
    assert client.post("/translate", json={"text": "ein Hund"}).status_code == 200


def test_a_decoder_only_model_is_served_and_refuses_alignments_with_a_422(translator, tmp_path):
    model = DecoderOnlyTransformer(dataclasses.replace(translator.model.cfg, arch="decoder_only"),
                                   len(translator.vocab.src), len(translator.vocab.tgt), share_all_embeddings=True).eval()
    decoder_only = dataclasses.replace(translator, model=model, members=[model])
    client = TestClient(create_app(decoder_only))
    assert client.get("/health").json()["alignment"] is False
    assert client.get("/health").json() | {"alignment": True} == TestClient(create_app(translator)).get("/health").json()
    reply = client.post("/translate", json={"text": ["ein Hund", "zwei Hunde"], "alignment": True})
    assert reply.status_code == 422 and "cross-attention" in reply.json()["error"]
    reply = client.post("/translate", json={"text": ["ein Hund", "zwei Hunde"]})
    assert reply.status_code == 200
    assert [t["text"] for t in reply.json()["translations"]] == translate_lines(decoder_only, ["ein Hund", "zwei Hunde"])
    (tmp_path / "in.de").write_text("ein Hund\n", encoding="utf-8")
    with pytest.raises(MTError, match="--alignment: alignments come from cross-attention"):
        translate_stream(decoder_only, str(tmp_path / "in.de"), str(tmp_path / "out"), alignment=True)
    assert not (tmp_path / "out").exists()


def test_concurrent_callers_each_get_their_own_answers_from_shared_batches(server, translator):
    url, app = server
    expected = translate_lines(translator, LINES)
    app.state.batcher.batches.clear()
    with ThreadPoolExecutor(max_workers=len(LINES)) as pool:
        answers = list(pool.map(lambda line: post(url, {"text": line})["translations"][0]["text"], LINES))
    assert answers == expected
    rounds = app.state.batcher.batches
    assert sum(rounds) == len(LINES) and len(rounds) < len(LINES) / 2, rounds  # batched, not one by one


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium) to drive the page")
def test_the_page_in_a_headless_browser_shows_the_translation_and_the_heatmap(server, translator):
    from playwright.sync_api import sync_playwright

    url, _ = server
    sentence = LINES[5]
    expected = translate_nbest(translator, [sentence], alignment=True)[0][0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#source", sentence)
            page.click("#translate")
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            assert page.inner_text("#translation") == expected.text
            assert page.locator("#nbest-list li").count() >= 1
            rows = page.locator(".heatmap tbody tr")
            assert rows.count() == len(expected.attention["target"])
            weights = [[float(w) for w in rows.nth(i).locator("td").evaluate_all("cells => cells.map(c => c.dataset.weight)")]
                       for i in range(rows.count())]
            assert weights == expected.attention["weights"]
            assert page.locator(".heatmap thead th").all_inner_texts()[1:] == expected.attention["source"]
        finally:
            browser.close()
