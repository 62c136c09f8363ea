"""Throughput and latency of ``tunelab serve`` at 1, 4 and 8 concurrent clients.

    python benchmarks/serve_throughput.py [RUN_OR_MODEL ...] [--requests 16] [--max-tokens 32]
        [--clients 1,4,8] [--max-batch-size 8]

Starts the server in this process on a free 127.0.0.1 port, sends chat requests with the
official openai client (greedy, fixed max_tokens) from N threads, and prints requests/s and
p50/p95 latency per concurrency, plus the mean batch the worker formed. With no target it
serves the default model. The machine may be shared: compare the rows, not absolute figures.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

PROMPTS = [
    "What does a compiler do?",
    "Explain what a kernel is.",
    "What is a byte?",
    "Define recursion in one sentence.",
]


def start_server(targets: list[str], max_batch_size: int) -> tuple[str, object, object]:
    import uvicorn

    from tunelab.serving.app import build_app
    from tunelab.serving.batching import BatchWorker
    from tunelab.serving.models import load_pool

    pool = load_pool(targets)
    worker = BatchWorker(pool, max_batch_size)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(pool, worker), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server, (pool, worker)


def main() -> None:
    import openai

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("targets", nargs="*", default=["smollm2-135m-instruct"])
    parser.add_argument("--requests", type=int, default=16, help="Requests per client.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()
    url, server, (pool, worker) = start_server(args.targets, args.max_batch_size)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    names = list(pool.served)

    def one_request(index: int) -> float:
        began = time.perf_counter()
        client.chat.completions.create(
            model=names[index % len(names)],
            messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            max_tokens=args.max_tokens,
            temperature=0,
        )
        return time.perf_counter() - began

    one_request(0)  # warm-up
    print(f"serving {', '.join(names)}; {args.max_tokens} tokens per answer")
    print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'batch':>6}")
    for clients in (int(c) for c in args.clients.split(",")):
        worker.batches.clear()
        total = clients * args.requests
        began = time.perf_counter()
        with ThreadPoolExecutor(clients) as threads:
            latencies = sorted(threads.map(one_request, range(total)))
        elapsed = time.perf_counter() - began
        p50 = statistics.median(latencies)
        p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
        batch = statistics.mean(worker.batches)
        print(
            f"{clients:>7} {total:>8} {total / elapsed:>7.2f} {p50:>7.2f} {p95:>7.2f} {batch:>6.1f}"
        )
    server.should_exit = True
    worker.stop()


if __name__ == "__main__":
    main()
