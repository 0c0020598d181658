"""A loopback HTTP proxy that injects faults in front of a real server (tests of the served
teacher): request n gets a 500 if n % 3 == 1, a connection reset if n % 5 == 2, a stall of
`stall` seconds before it is forwarded if n % 7 == 3; the rest pass through. One request
per connection (the answer says `Connection: close`). Run it in a thread: `with FaultProxy(
upstream) as proxy: proxy.url`."""

from __future__ import annotations

import asyncio
import threading


async def _read_message(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head + body


class FaultProxy:
    """A thread running the proxy's event loop; `counts` tallies what it did."""

    def __init__(self, upstream: str, stall: float = 5.0):
        host, port = upstream.replace("http://", "").rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.stall = stall
        self.counts = {"requests": 0, "500": 0, "reset": 0, "stall": 0, "passed": 0}
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

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

    async def _handle(self, reader, writer) -> None:
        try:
            request = await _read_message(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        n = self.counts["requests"]
        self.counts["requests"] += 1
        if b"/v1/completions" in request.split(b"\r\n", 1)[0]:
            if n % 3 == 1:
                self.counts["500"] += 1
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                await writer.drain()
                writer.close()
                return
            if n % 5 == 2:
                self.counts["reset"] += 1
                writer.transport.abort()  # no answer at all
                return
            if n % 7 == 3:
                self.counts["stall"] += 1
                await asyncio.sleep(self.stall)
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        head, _, body = request.partition(b"\r\n\r\n")
        lines = [x for x in head.split(b"\r\n") if not x.lower().startswith(b"connection:")]
        up_writer.write(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body)
        await up_writer.drain()
        answer = await _read_message(up_reader)
        up_writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = [x for x in head.split(b"\r\n") if not x.lower().startswith(b"connection:")]
        self.counts["passed"] += 1
        try:
            writer.write(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body)
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
