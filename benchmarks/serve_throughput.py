"""Throughput and latency of ``tunelab serve`` at 1, 4 and 8 concurrent clients.

    python benchmarks/serve_throughput.py [RUN_OR_MODEL ...] [--requests 16] [--max-tokens 32]
        [--clients 1,4,8] [--max-batch-size 8] [--batching continuous,whole]

Starts the server in this process on a free 127.0.0.1 port, sends chat requests with the
official openai client (greedy, fixed max_tokens) from N threads, and prints requests/s and
p50/p95 latency per concurrency, plus the mean number of requests per decode step (``rows``;
for the whole-batch path, the mean batch). Each batching mode gets its own server on the same
loaded model, and the modes take turns at each concurrency, so a shared machine's load falls on
both alike. With no target it serves the default model. Compare the rows, not absolute figures.
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


def start_server(pool: object, max_batch_size: int, continuous: bool) -> tuple[str, object, object]:
    import uvicorn

    from tunelab.serving.app import build_app
    from tunelab.serving.batching import BatchWorker

    worker = BatchWorker(pool, max_batch_size, continuous=continuous)  # type: ignore[arg-type]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = build_app(pool, worker)  # type: ignore[arg-type]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server, worker


def main() -> None:
    import openai

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("targets", nargs="*", default=["smollm2-135m-instruct"])
    parser.add_argument("--requests", type=int, default=16, help="Requests per client.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument(
        "--batching",
        default="continuous,whole",
        help="Modes to compare: continuous (in-flight) and/or whole (a batch runs to its end).",
    )
    args = parser.parse_args()
    from tunelab.serving.models import load_pool

    pool = load_pool(args.targets)
    modes = args.batching.split(",")
    servers = {
        mode: start_server(pool, args.max_batch_size, continuous=mode == "continuous")
        for mode in modes
    }
    names = list(pool.served)

    def one_request(client: object, index: int) -> float:
        began = time.perf_counter()
        client.chat.completions.create(  # type: ignore[attr-defined]
            model=names[index % len(names)],
            messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
            max_tokens=args.max_tokens,
            temperature=0,
        )
        return time.perf_counter() - began

    clients_of = {
        mode: openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        for mode, (url, _, _) in servers.items()
    }
    for client in clients_of.values():
        one_request(client, 0)  # warm-up
    print(f"serving {', '.join(names)}; {args.max_tokens} tokens per answer")
    header = f"{'mode':>10} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50 s':>7} {'p95 s':>7}"
    print(f"{header} {'rows':>5}")
    for clients in (int(c) for c in args.clients.split(",")):
        for mode in modes:
            _, _, worker = servers[mode]
            worker.batches.clear()  # type: ignore[attr-defined]
            worker.step_rows.clear()  # type: ignore[attr-defined]
            total = clients * args.requests
            client = clients_of[mode]
            began = time.perf_counter()
            with ThreadPoolExecutor(clients) as threads:
                latencies = sorted(threads.map(one_request, [client] * total, range(total)))
            elapsed = time.perf_counter() - began
            p50 = statistics.median(latencies)
            p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))]
            rows = worker.step_rows or worker.batches  # type: ignore[attr-defined]
            print(
                f"{mode:>10} {clients:>7} {total:>8} {total / elapsed:>7.2f} {p50:>7.2f} "
                f"{p95:>7.2f} {statistics.mean(rows):>5.1f}"
            )
    for _, server, worker in servers.values():
        server.should_exit = True  # type: ignore[attr-defined]
        worker.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
