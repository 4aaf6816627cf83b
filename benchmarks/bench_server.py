"""The REST API's latency and throughput: a real server (uvicorn, one worker) and N concurrent HTTP clients.

Starts ``ipadapter.server`` on 127.0.0.1 (a free port) with the shipped miniature model (``--base mini
--adapter mini``, 32 px, 2 steps by default: the cost of the server itself shows), sends ``--requests``
POST /v1/generate calls from 1 and then 4 concurrent clients (``--clients``), and prints requests per second
and the median / p90 latency per level, plus the median time the engine spent per job. Jobs run one at a time
(one worker per device), so more clients raise latency, not throughput.

    python benchmarks/bench_server.py
    python benchmarks/bench_server.py --clients 1 4 8 --requests 40 --json
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse  # noqa: E402
import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def _reference(size: int) -> str:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _level(url: str, body: dict[str, Any], clients: int, requests: int) -> dict[str, Any]:
    """``requests`` calls spread over ``clients`` threads, each with its own connection."""
    latencies: list[float] = []
    generate: list[float] = []
    errors: list[int] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                started = time.perf_counter()
                r = http.post("/v1/generate", json=body)
                elapsed = time.perf_counter() - started
                with lock:
                    if r.status_code == 200:
                        latencies.append(elapsed)
                        generate.append(r.json()["seconds"]["generate"])
                    else:
                        errors.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "requests": requests, "ok": len(latencies), "errors": errors,
            "requests_per_s": len(latencies) / wall, "median_s": statistics.median(latencies),
            "p90_s": latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))],
            "engine_median_s": statistics.median(generate)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="mini", help="base model served (default: the shipped mini)")
    parser.add_argument("--adapter", default="mini", help="adapter served (default: the shipped mini)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="width and height (default 32)")
    parser.add_argument("--requests", type=int, default=20, help="requests per level (default 20)")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 4], help="concurrency levels (default 1 4)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    from ipadapter.server import ServerConfig, create_app
    from ipadapter.server.app import serve_in_thread

    config = ServerConfig(base=args.base, adapters=[args.adapter], device=args.device,
                          max_queue=max(args.clients) + 1)  # fmt: skip
    app = create_app(config)
    device = app.state.engine.device
    body = {"prompt": "a red circle", "image": _reference(args.size), "steps": args.steps, "seed": 0,
            "width": args.size, "height": args.size, "scale": 0.8}  # fmt: skip
    with serve_in_thread(app) as url:
        httpx.post(f"{url}/v1/generate", json=body, timeout=600).raise_for_status()  # warm-up
        rows = [_level(url, body, clients, args.requests) for clients in args.clients]
    if args.json:
        print(
            json.dumps({"device": device, "steps": args.steps, "size": args.size, "levels": rows}, indent=2)
        )
        return
    print(f"base {args.base}, adapter {args.adapter}, {device}, {args.size}x{args.size}, {args.steps} steps, "
          f"torch threads {args.threads}, {args.requests} requests per level")  # fmt: skip
    print("| clients | requests/s | median latency (s) | p90 latency (s) | engine per job (s) | errors |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests_per_s']:.2f} | {r['median_s']:.3f} | {r['p90_s']:.3f} | "
              f"{r['engine_median_s']:.3f} | {len(r['errors'])} |")  # fmt: skip
    one = rows[0]
    print(f"latency / engine time at {one['clients']} client(s): {one['median_s'] / one['engine_median_s']:.2f}x "
          "(HTTP, JSON, base64 and PNG encoding, queueing)")  # fmt: skip


if __name__ == "__main__":
    main()
