"""Request batching in `mt serve`: 100 callers sending one sentence each at once, against one 100-line
`translate` call in the same process, on the same model and settings.

    pip install -e ".[serve]"
    python scripts/bench_serve.py --checkpoint runs/multi30k-de-en/checkpoint_avg.pt

Each round times, in turns, `translate_lines` over the first --lines lines of --src, then --lines concurrent
POST /translate requests of one line each against a uvicorn server in this process (a thread per caller,
released together). Prints the medians over --rounds rounds: the two wall times, their ratio (the goal is at
most 1.5), the p50 and p99 latency of one request under that load, and how many search rounds the worker ran.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "multi30k"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "runs/multi30k-de-en/checkpoint_avg.pt"))
    parser.add_argument("--src", default=str(DATA / "test_2016_flickr.de"))
    parser.add_argument("--lines", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import uvicorn

    from mt.serve.app import create_app
    from mt.translate import load_translator, translate_lines

    lines = Path(args.src).read_text(encoding="utf-8").splitlines()[:args.lines]
    translator = load_translator(args.checkpoint, device="cpu")
    app = create_app(translator)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/translate"

    def request(line: str, start: threading.Barrier) -> tuple[float, str]:
        body = json.dumps({"text": line}).encode()
        start.wait()
        began = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"})) as r:
            text = json.loads(r.read())["translations"][0]["text"]
        return time.perf_counter() - began, text

    translate_lines(translator, lines[:10])  # warm-up: first calls allocate
    batch_s, service_s, latencies, rounds, same = [], [], [], [], True
    with ThreadPoolExecutor(max_workers=len(lines)) as pool:
        for _ in range(args.rounds):
            began = time.perf_counter()
            expected = translate_lines(translator, lines)
            batch_s.append(time.perf_counter() - began)

            start = threading.Barrier(len(lines) + 1)
            app.state.batcher.batches.clear()
            futures = [pool.submit(request, line, start) for line in lines]
            start.wait()
            began = time.perf_counter()
            results = [f.result() for f in futures]
            service_s.append(time.perf_counter() - began)
            latencies.extend(seconds for seconds, _ in results)
            rounds.append(len(app.state.batcher.batches))
            same &= [text for _, text in results] == expected
    server.should_exit = True

    batch, service = statistics.median(batch_s), statistics.median(service_s)
    print(f"checkpoint {args.checkpoint}, {len(lines)} lines, beam {translator.decode.beam_size}, "
          f"{args.rounds} rounds (medians)")
    print("| what | seconds |\n|---|---|")
    print(f"| one translate call of {len(lines)} lines | {batch:.2f} |")
    print(f"| {len(lines)} concurrent one-line requests | {service:.2f} |")
    print(f"ratio (goal <= 1.5): {service / batch:.2f}")
    print(f"latency of one request under that load: p50 {percentile(latencies, 50):.2f} s, "
          f"p99 {percentile(latencies, 99):.2f} s")
    print(f"search rounds per {len(lines)} requests: {rounds}; answers identical to the batch call: {same}")
    print(f"each round: batch {[round(x, 2) for x in batch_s]} s, service {[round(x, 2) for x in service_s]} s")


if __name__ == "__main__":
    main()
