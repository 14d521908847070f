"""The node's HTTP file server for the benchmark and the fault tests, with a gate.

`python -m bench.gated_files PORT --bind HOST --directory DIR --gate-file PATH [--latency-ms MS]`
serves DIR like `python -m http.server`, and also every benchmark file (`.../<tag>_<phase>_<n>.csv`
or `..._<n>_<bytes>.csv`, see `bench.events.file_chunks`) generated from its name (streamed, in
constant memory), so flows that verify the data download the bytes whose length and checksum
their event announced. `--latency-ms`: each file request waits that long before it is answered
(a remote data server).

While the gate file exists, every file request is HELD (not answered) until it is removed: a flow
run that verifies its data is then provably in flight (Running, inside its verify task) for as
long as a test or a fault scenario needs, whatever the machine's speed. `GET /_gate` answers
`{"closed": bool, "held": n, "served": n, "held_by": {address: n}}` (requests waiting at the
gate, files answered, the requests waiting per client address: which host holds runs).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.events import BENCH_FILE, file_chunks, file_size

_lock = threading.Lock()
_counts = {"held": 0, "served": 0}
_held_by: dict[str, int] = {}


class GatedHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a data server: every answer has its length
    gate_file: Path
    latency: float = 0.0  # seconds before each file request is answered

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/_gate":
            with _lock:
                body = json.dumps({"closed": self.gate_file.exists(), **_counts,
                                   "held_by": {a: n for a, n in _held_by.items() if n}}).encode()
            self._answer(200, body, "application/json")
            return
        self._wait_at_gate()
        if self.latency > 0:
            time.sleep(self.latency)
        name = self.path.rsplit("/", 1)[-1].split("?", 1)[0]
        if BENCH_FILE.fullmatch(name):
            self._stream(name)
        else:
            super().do_GET()
        with _lock:
            _counts["served"] += 1

    def _wait_at_gate(self) -> None:
        if not self.gate_file.exists():
            return
        client = self.client_address[0]
        with _lock:
            _counts["held"] += 1
            _held_by[client] = _held_by.get(client, 0) + 1
        try:
            while self.gate_file.exists():
                time.sleep(0.05)
        finally:
            with _lock:
                _counts["held"] -= 1
                _held_by[client] -= 1

    def _stream(self, name: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(file_size(name)))
        self.end_headers()
        try:
            for chunk in file_chunks(name):
                self.wfile.write(chunk)
        except OSError:  # the client stopped reading (a refused download, a killed worker)
            pass

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.gated_files", description=__doc__)
    p.add_argument("port", type=int)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--directory", type=Path, default=Path.cwd())
    p.add_argument("--gate-file", type=Path, required=True)
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="milliseconds each file request waits before it is answered")
    args = p.parse_args(argv)
    handler = type("Handler", (GatedHandler,), {"gate_file": args.gate_file,
                                                "latency": args.latency_ms / 1000})
    ThreadingHTTPServer.request_queue_size = 256  # bursts of concurrent downloads
    server = ThreadingHTTPServer((args.bind, args.port),
                                 partial(handler, directory=str(args.directory)))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
