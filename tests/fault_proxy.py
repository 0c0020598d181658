"""A loopback HTTP proxy that injects faults in front of a real server (tests of the served
teacher). `plan(n)` names the fault for the n-th `/v1/completions` request (None: pass it
through); the default plan is: a 500 if n % 3 == 1, a connection reset if n % 5 == 2, a stall
of `stall` seconds before it is forwarded if n % 7 == 3. Faults:
  500, reset, stall    as above;
  429                  "Too Many Requests" with `Retry-After: retry_after`;
  drip                 the real answer, one byte every `drip` seconds;
  cut                  the real answer's head (its full Content-Length) and half its body;
  short                the real answer with its last prompt log-prob entry removed;
  swap                 the previous completions answer (another sequence's) instead;
  hold                 nothing until `release_held()`, then forwarded (so a test can kill the
                       upstream while a request is surely in flight: `wait_held()`).
One request per connection (the answer says `Connection: close`). `events` lists (time,
n, fault, request body) of every completions request. Run it in a thread:
`with FaultProxy(upstream) as proxy: proxy.url`."""

from __future__ import annotations

import asyncio
import json
import threading
import time


async def _read_message(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head + body


def default_plan(n: int) -> str | None:
    return "500" if n % 3 == 1 else "reset" if n % 5 == 2 else "stall" if n % 7 == 3 else None


def _message(head: bytes, body: bytes) -> bytes:
    """An HTTP message with `Connection: close` and the body's true length."""
    lines = [x for x in head.split(b"\r\n")
             if not x.lower().startswith((b"connection:", b"content-length:"))]
    lines += [b"Connection: close", b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class FaultProxy:
    """A thread running the proxy's event loop; `counts` tallies what it did."""

    def __init__(self, upstream: str, stall: float = 5.0, plan=default_plan, drip: float = 0.5,
                 retry_after: float = 1.0):
        host, port = upstream.replace("http://", "").rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.stall, self.plan, self.drip, self.retry_after = stall, plan, drip, retry_after
        self.counts = {"requests": 0, "completions": 0, "passed": 0}
        self.events: list[tuple[float, int, str | None, bytes]] = []
        self.previous: bytes | None = None  # the last completions answer's body
        self.ready = threading.Event()
        self.held = threading.Event()  # a request is being held
        self.released = asyncio.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def wait_held(self, timeout: float = 300.0) -> bool:
        """Wait until a request is held (the client is mid-run)."""
        return self.held.wait(timeout)

    def release_held(self) -> None:
        """Forward the held requests, and every later 'hold' at once."""
        self.loop.call_soon_threadsafe(self.released.set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _forward(self, request: bytes) -> tuple[bytes, bytes]:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        head, _, body = request.partition(b"\r\n\r\n")
        up_writer.write(_message(head, body))
        await up_writer.drain()
        answer = await _read_message(up_reader)
        up_writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        return head, body

    async def _handle(self, reader, writer) -> None:
        try:
            request = await _read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.counts["requests"] += 1
        fault = None
        if b"/v1/completions" in request.split(b"\r\n", 1)[0]:
            n = self.counts["completions"]
            self.counts["completions"] += 1
            fault = self.plan(n)
            self.events.append((time.monotonic(), n, fault, request.partition(b"\r\n\r\n")[2]))
            if fault:
                self.counts[fault] = self.counts.get(fault, 0) + 1
        try:
            if fault == "500":
                writer.write(_message(b"HTTP/1.1 500 Internal Server Error", b""))
            elif fault == "429":
                writer.write(_message(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: %g"
                                      % self.retry_after, b""))
            elif fault == "reset":
                writer.transport.abort()  # no answer at all
                return
            else:
                if fault == "stall":
                    await asyncio.sleep(self.stall)
                if fault == "hold":
                    self.held.set()
                    await self.released.wait()
                    fault = None
                head, body = await self._forward(request)
                if fault is None or fault == "stall":
                    if fault is None and b" 200 " in head.split(b"\r\n", 1)[0]:
                        self.previous = body
                    self.counts["passed"] += 1
                    writer.write(_message(head, body))
                elif fault == "drip":
                    for byte in _message(head, body):
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(self.drip)
                elif fault == "cut":
                    whole = _message(head, body)
                    writer.write(whole[: len(whole) - len(body) // 2])
                elif fault == "short":
                    answer = json.loads(body)
                    answer["choices"][0]["prompt_logprobs"].pop()
                    writer.write(_message(head, json.dumps(answer).encode()))
                elif fault == "swap":
                    writer.write(_message(head, self.previous or body))
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
