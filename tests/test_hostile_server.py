"""Hostile clients and a hostile environment against a real server: a corpus of what it must keep refusing.

- Slow bodies (trickled, stalled, chunked) get a JSON 408 once the body deadline passes, and hold no queue slot
  while they arrive, so they cannot lock other clients out with 429.
- A stop (SIGINT / SIGTERM) while a synchronous ``/v1/generate`` runs answers JSON 503 at once, cancels every
  job and closes the queue; a body still arriving gets 503 at once too.
- ``ipadapter serve`` on a busy port fails first (before any model loads) with one line and exit 2, and says
  "serving" only once it listens.
"""

from __future__ import annotations

import ast
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import b64_png, free_port, reference_image

import ipadapter.server.app as app_module
from ipadapter.cli import build_parser, main
from ipadapter.errors import InputError
from ipadapter.jobs.engine import Engine
from ipadapter.jobs.job import Cancelled
from ipadapter.server import ServerConfig, create_app
from ipadapter.server.app import serve_in_thread
from ipadapter.server.jobs import ShuttingDown

BASIC = {"prompt": "a cat", "negative_prompt": "blurry", "scale": 0.7, "steps": 2, "seed": 0, "width": 32,
         "height": 32}  # fmt: skip
DEADLINE = 1.5  # the body deadline of the slow-body server, in seconds
PAYLOAD = json.dumps(BASIC).encode()  # what slow senders send (it never gets decoded)


def assert_error(status: int | None, headers: dict[str, str], body: bytes, want: int, *words: str) -> dict:
    assert status == want, (status, body[:300])
    assert headers.get("content-type") == "application/json" and b"Traceback" not in body
    error = json.loads(body)["error"]
    assert set(error) == {"type", "message"} and "\n" not in error["message"] and len(error["message"]) < 500
    for word in words:
        assert word in error["message"], error["message"]
    return error


def head(path: str, length: int | None) -> bytes:
    """A POST's request line and headers: Content-Length ``length``, or chunked when None."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def hostile(url: str, start: bytes, pieces: list[bytes], every: float, wait: float) -> tuple[Any, ...]:
    """Send ``start``, then one of ``pieces`` every ``every`` s until the server answers (or ``wait`` s pass);
    read the answer. Returns (status or None, headers, body, seconds from the first byte to the answer)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        started = time.monotonic()
        sock.sendall(start)
        pending = list(pieces)
        while not select.select([sock], [], [], every)[0]:
            if time.monotonic() - started > wait:
                return None, {}, b"", wait
            if pending:
                try:
                    sock.sendall(pending.pop(0))
                except OSError:  # the server answered and closed meanwhile: read its answer
                    break
        answered = time.monotonic() - started
        data = b""
        try:
            while (more := sock.recv(65536)) and not _complete(data := data + more):
                pass
        except (TimeoutError, ConnectionResetError):
            pass
    status_line, *lines = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, data.partition(b"\r\n\r\n")[2], answered


def _complete(data: bytes) -> bool:
    top, sep, body = data.partition(b"\r\n\r\n")
    length = [
        int(line.split(b":")[1]) for line in top.lower().split(b"\r\n") if line.startswith(b"content-length:")
    ]
    return bool(sep) and bool(length) and len(body) >= length[0]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("cpu")


@pytest.fixture(scope="module")
def body() -> dict[str, Any]:
    return {**BASIC, "image": b64_png(reference_image())}


def app_for(models: dict, engine: Engine, **kw: Any) -> Any:
    return create_app(ServerConfig(base=str(models["sd15"]), adapters=[str(models["ckpt"]["sd15", "safetensors"])],
                                   **kw), engine)  # fmt: skip


@pytest.fixture(scope="module")
def slow_server(models: dict, engine: Engine) -> Any:
    """A server with 2 queue slots and a short body deadline; yields (url, app)."""
    app = app_for(models, engine, max_queue=2, body_timeout=DEADLINE)
    with serve_in_thread(app) as url:
        yield url, app


# -- 1. slow bodies: 408 after the deadline, no queue slot while they arrive -------------------------------------

SLOW_SENDERS = {  # name: (request line and headers, what follows piece by piece, seconds between pieces)
    "1 byte at a time": (head("/v1/generate", len(PAYLOAD)), [PAYLOAD[i : i + 1] for i in range(len(PAYLOAD))], 0.3),
    "headers, then silence": (head("/v1/generate", 100), [], 0.3),
    "all but the last byte": (head("/v1/jobs", len(PAYLOAD)), [PAYLOAD[:-1]], 0.3),
    "chunked, 1 byte a chunk": (head("/v1/jobs", None), [chunk(PAYLOAD[i : i + 1]) for i in range(len(PAYLOAD))], 0.3),
    "chunked, never the last chunk": (head("/v1/generate", None), [chunk(PAYLOAD)], 0.3),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SLOW_SENDERS))
def test_a_slow_body_gets_json_408_after_the_deadline(slow_server: Any, name: str) -> None:
    url, _ = slow_server
    start, pieces, every = SLOW_SENDERS[name]
    status, headers, answer, seconds = hostile(url, start, pieces, every, wait=DEADLINE + 8)
    error = assert_error(status, headers, answer, 408, "did not arrive within 1.5 s")
    assert error["type"] == "timeout" and headers.get("connection") == "close"
    assert DEADLINE - 0.1 <= seconds < DEADLINE + 3
    assert httpx.get(f"{url}/healthz", timeout=10).json()["queue"]["active"] == 0


def test_slow_senders_hold_no_slot_and_lock_nobody_out(
    models: dict, engine: Engine, body: dict[str, Any]
) -> None:
    """Two clients trickling into a 2-slot server: others are still admitted while they trickle (before: 429 for
    as long as the trickle lasted); the tricklers get 408 at the deadline."""
    app = app_for(models, engine, max_queue=2, body_timeout=4.0)
    start, pieces, every = SLOW_SENDERS["1 byte at a time"]
    answers: list[tuple[Any, ...]] = []
    with serve_in_thread(app) as url:
        tricklers = [
            threading.Thread(target=lambda: answers.append(hostile(url, start, pieces, every, 15)))
            for _ in range(2)
        ]
        for thread in tricklers:
            thread.start()
        time.sleep(0.4)  # both are connected and trickling
        assert httpx.get(f"{url}/healthz", timeout=10).json()["queue"]["active"] == 0
        for path, status in (("/v1/jobs", 202), ("/v1/generate", 200), ("/v1/generate", 200)):
            r = httpx.post(f"{url}{path}", json=body, timeout=60)
            assert r.status_code == status, r.text
        assert all(thread.is_alive() for thread in tricklers)  # all that while they still trickled
        for thread in tricklers:
            thread.join(20)
        assert [a[0] for a in answers] == [408, 408]
        assert app.state.queue.stats()["active"] == 0


def test_a_slow_body_within_the_deadline_is_served(slow_server: Any, body: dict[str, Any]) -> None:
    url, _ = slow_server
    data = json.dumps(body).encode()
    pieces = [data[i : i + len(data) // 4 + 1] for i in range(0, len(data), len(data) // 4 + 1)]
    status, headers, answer, _ = hostile(url, head("/v1/jobs", len(data)), pieces, 0.2, wait=30)
    assert status == 202 and json.loads(answer)["status"] in ("queued", "running", "done"), answer


def test_the_body_deadline_is_a_config_field_and_a_serve_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerConfig(base="b", adapters=["a"]).body_timeout == 30.0
    for bad in (0, -1, float("nan"), float("inf"), True, "5"):
        with pytest.raises(InputError, match="body_timeout"):
            ServerConfig(base="b", adapters=["a"], body_timeout=bad)
    argv = ["serve", "--base", "b", "--adapter", "a"]
    assert build_parser().parse_args(argv).body_timeout == 30.0
    seen: list[ServerConfig] = []
    monkeypatch.setattr("ipadapter.server.serve", seen.append)
    assert main([*argv, "--body-timeout", "2.5"]) == 0 and seen[0].body_timeout == 2.5
    assert main([*argv, "--body-timeout", "0"]) == 2


# -- 2. a stop while requests wait: JSON 503 at once, jobs cancelled, the queue closed ------------------------------


def test_a_stop_during_a_synchronous_generate_answers_json_503_at_once(
    models: dict, engine: Engine, body: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[str] = []

    def slow_run(job: Any, progress: Any = None, **kw: Any) -> Any:  # 30 s unless cancelled
        runs.append("started")
        try:
            for step in range(1, 601):
                time.sleep(0.05)
                progress(step, 600)
        except Cancelled:
            runs.append("cancelled")
            raise
        raise AssertionError("the slow job was never cancelled")

    monkeypatch.setattr(engine, "run", slow_run)
    app = app_for(models, engine, max_queue=4)
    got: dict[str, Any] = {}
    with serve_in_thread(app) as url:

        def generate() -> None:
            r = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
            got["answer"], got["at"] = r, time.monotonic()

        client = threading.Thread(target=generate)
        client.start()
        deadline = time.monotonic() + 30
        while not runs and time.monotonic() < deadline:
            time.sleep(0.02)
        queued = httpx.post(f"{url}/v1/jobs", json=body, timeout=30)
        assert queued.status_code == 202 and queued.json()["status"] == "queued"
        ticket = app.state.queue.get(queued.json()["id"])
        uploading: list[tuple[Any, ...]] = []  # a client still sending its body when the server stops
        upload = threading.Thread(
            target=lambda: uploading.append(hostile(url, head("/v1/jobs", 100), [], 0.1, 20))
        )
        upload.start()
        time.sleep(0.3)
        stopped = time.monotonic()
        app.state.server.handle_exit(signal.SIGINT, None)  # what Ctrl-C does: uvicorn's signal handler
        client.join(15)
        upload.join(15)
        answer = got["answer"]
        assert got["at"] - stopped < 2, f"answered {got['at'] - stopped:.1f} s after the stop"
        error = answer.json()["error"]
        assert answer.status_code == 503 and answer.headers["content-type"] == "application/json"
        assert error["type"] == "cancelled" and "shutting down" in error["message"]
        status, headers, data, _ = uploading[0]
        assert_error(status, headers, data, 503, "shutting down")
        assert ticket.status == "cancelled"
        deadline = time.monotonic() + 5
        while "cancelled" not in runs and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runs == [
            "started",
            "cancelled",
        ]  # the running job stopped at its next step; the queued one never ran
        with pytest.raises(ShuttingDown):
            app.state.queue.reserve()
    assert not app.state.queue.stats()["worker_alive"]


def _line(stream: Any, timeout: float) -> str:
    if not select.select([stream], [], [], timeout)[0]:
        raise AssertionError(f"no output in {timeout} s")
    return stream.readline()


def _sigint_default() -> None:
    """In the child: Ctrl-C's default action, even when this test runs from a shell that ignores SIGINT (a
    background job): an ignored SIGINT is inherited, and the server would then stop without the interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_the_serve_command_listens_when_it_says_so_and_stops_on_sigint_with_json_503(
    models: dict, body: dict[str, Any], tmp_path: Path
) -> None:
    """The real thing: ``ipadapter serve`` in a process, SIGINT while a long synchronous generate runs (before:
    a text/plain 500 after 10 s, a traceback in the log)."""
    port, log = free_port(), tmp_path / "stderr.txt"
    argv = [sys.executable, "-m", "ipadapter.cli", "serve", "--base", str(models["sd15"]), "--adapter",
            str(models["ckpt"]["sd15", "safetensors"]), "--port", str(port)]  # fmt: skip
    with log.open("w") as err:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ},
            preexec_fn=_sigint_default,
        )
    try:
        line = _line(proc.stdout, 180)
        assert line.startswith("ipadapter: serving ") and f"http://127.0.0.1:{port}/" in line, line
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200  # it listens as soon as it says so
        got: dict[str, Any] = {}

        def generate() -> None:  # 500 steps of 0.1 s or so (64x64): well over 10 s on these tiny models
            r = httpx.post(
                f"{url}/v1/generate", json={**body, "steps": 500, "width": 64, "height": 64}, timeout=60
            )
            got["answer"], got["at"] = r, time.monotonic()

        client = threading.Thread(target=generate)
        client.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/healthz", timeout=5).json()["queue"]["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGINT)
        client.join(30)
        answer = got["answer"]
        assert answer.status_code == 503 and answer.headers["content-type"] == "application/json", answer.text
        assert answer.json()["error"]["type"] == "cancelled"
        assert got["at"] - stopped < 3, f"answered {got['at'] - stopped:.1f} s after SIGINT"
        assert proc.wait(30) == 130  # the CLI's exit code for an interrupt, after a graceful stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    stderr = log.read_text()
    assert "Traceback" not in stderr and "ipadapter: interrupted" in stderr, stderr[-2000:]


# -- 3. a port that cannot be bound: one line, exit 2, before any model loads --------------------------------------


@pytest.mark.parametrize("where", ["busy", "not this machine"])
def test_serve_where_it_cannot_listen_fails_first_with_one_line(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[Any] = []
    monkeypatch.setattr(
        app_module, "create_app", lambda *a, **k: loaded.append(a) or pytest.fail("loaded models")
    )
    with socket.socket() as other:  # another server, listening
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        host = "127.0.0.1" if where == "busy" else "192.0.2.1"  # TEST-NET-1: no machine's own address
        argv = ["serve", "--base", str(tmp_path / "no-such-base"), "--adapter", str(tmp_path / "no.safetensors"),
                "--host", host, "--port", str(port)]  # fmt: skip
        assert main(argv) == 2
    out, err = capsys.readouterr()
    want = (
        f"port {port} on 127.0.0.1 is in use; stop the other server or pick another --port"
        if where == "busy"
        else f"cannot listen on 192.0.2.1 port {port}"
    )
    assert err.startswith("ipadapter: error: ") and err.count("\n") == 1 and want in err, err
    assert "Traceback" not in err and "serving" not in out and not loaded  # checked before any model loads


# -- 4. create_app is split into named pieces -----------------------------------------------------------------------


def test_no_function_of_the_server_app_is_long() -> None:
    tree = ast.parse(Path(app_module.__file__).read_text())
    lengths = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    assert lengths["create_app"] <= 40 and max(lengths.values()) <= 60, sorted(
        lengths.items(), key=lambda x: -x[1]
    )[:3]
