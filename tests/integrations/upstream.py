"""A small OpenAI-compatible inference server on a loopback port, in a thread of the test.

It answers ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` with
the usage the test set (``usage``), streams when the body says ``"stream": true`` (one
chunk per word of ``reply``, chunked transfer encoding, the usage chunk only when
``stream_options.include_usage`` asks for it, as OpenAI does), and records every request
it got. ``status`` makes it answer an error; ``chunk_pause`` slows a stream down so a test
can leave in the middle of one.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Behaviour:
    usage: tuple[int, int] = (12, 30)
    reply: str = "Sure thing here is the answer you asked for"
    status: int = 200
    chunk_pause: float = 0.0
    received: list[Received] = field(default_factory=list)
    streams_ended: int = 0  # streams that reached their end
    streams_cut: int = 0  # streams whose reader went away before their end


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        return

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        behaviour = self.server.behaviour
        behaviour.received.append(
            Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        if behaviour.status != 200:
            self._json(behaviour.status, {"error": {"message": "upstream says no", "type": "x"}})
            return
        prompt, completion = behaviour.usage
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if self.path.endswith("/embeddings"):
            self._json(
                200,
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                    "model": body.get("model"),
                    "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
                },
            )
            return
        if body.get("stream"):
            self._stream(body, usage)
            return
        self._json(
            200,
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": behaviour.reply},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            },
        )

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Upstream", "fake")
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stream(self, body: dict[str, Any], usage: dict[str, int]) -> None:
        behaviour = self.server.behaviour
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            for index, word in enumerate(behaviour.reply.split(" ")):
                text = word if index == 0 else " " + word
                event = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                    "usage": None,
                }
                self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
                if behaviour.chunk_pause:
                    time.sleep(behaviour.chunk_pause)
            if include_usage:
                event = {"id": "chatcmpl-1", "choices": [], "usage": usage}
                self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            behaviour.streams_cut += 1
            return
        behaviour.streams_ended += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour


class FakeUpstream:
    """Start with ``start()``, stop with ``stop()``; ``url`` is its OpenAI base URL."""

    def __init__(self) -> None:
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.behaviour = Behaviour()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def behaviour(self) -> Behaviour:
        return self.server.behaviour

    def reset(self) -> Behaviour:
        self.server.behaviour = Behaviour()
        return self.server.behaviour

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
