"""The Python `websockets` peer for the shardcast comparison (asyncio API).

Usage: server.py PORT (or PORT in the environment). Listens on 127.0.0.1 only.

  GET  /ws/{topic}, /ws?topic=T, /?topic=T   WebSocket: subscribe; messages sent are
                                              published to the topic (sender included)
  POST /publish/{topic}                       publish the body; 202

`websockets` only parses bodiless GET handshakes, so a connection whose first bytes are
"POST " is taken over before the library sees it and served as plain HTTP/1.1 (keep-alive,
Content-Length bodies only). Slow consumers: a client whose transport holds more than 1 MiB
of unsent data is aborted instead of sent to. Pings: every 20 s, with a 20 s pong timeout
(the library's keepalive); the library answers client pings.
"""
import asyncio
import os
import re
import sys
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.http11 import Response

MAX_MESSAGE = 64 * 1024  # same as shardcast's --max-message-bytes
SEND_BUDGET = 1024 * 1024
HANDSHAKE_TIMEOUT = 10.0
TOPIC = re.compile(r"[A-Za-z0-9._:-]{1,128}")

rooms: dict[str, set[ServerConnection]] = {}


def publish(topic: str, message: str | bytes) -> None:
    room = rooms.get(topic)
    if not room:
        return
    ready = []
    for conn in room:
        transport = conn.transport
        if transport.get_write_buffer_size() + len(message) > SEND_BUDGET:
            transport.abort()  # slow consumer
        else:
            ready.append(conn)
    broadcast(ready, message)


def ws_topics(path: str) -> list[str] | None:
    parts = urlsplit(path)
    if parts.path.startswith("/ws/"):
        return [parts.path[4:]]
    if parts.path in ("/", "/ws"):
        topics = list(dict.fromkeys(parse_qs(parts.query).get("topic", [])))
        return topics or [""]
    return None


def is_text(content_type: str) -> bool:
    t = content_type.split(";")[0].strip().lower()
    return t.startswith("text/") or t == "application/json"


def respond(status: int, reason: str, text: str = "") -> Response:
    body = text.encode()
    headers = Headers([("Content-Length", str(len(body))), ("Connection", "close")])
    return Response(status, reason, headers, body)


def process_request(conn: ServerConnection, request):
    if urlsplit(request.path).path == "/healthz":
        return respond(200, "OK", "ok")
    topics = ws_topics(request.path)
    if topics is None:
        return respond(404, "Not Found", "not found\n")
    if not all(TOPIC.fullmatch(t) for t in topics):
        return respond(400, "Bad Request", "bad topic\n")
    conn.topics = topics
    return None


async def handler(conn: ServerConnection) -> None:
    topics = conn.topics
    for t in topics:
        rooms.setdefault(t, set()).add(conn)
    try:
        async for message in conn:
            if len(topics) == 1:
                publish(topics[0], message)
    finally:
        for t in topics:
            room = rooms.get(t)
            if room is not None:
                room.discard(conn)
                if not room:
                    del rooms[t]


class Connection(ServerConnection):
    """A websockets connection that serves `POST /publish/...` itself."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.http_buffer: bytearray | None = None
        self.sniffed = False
        # Own handshake deadline: serve(open_timeout=None) so a keep-alive publisher is
        # not cut off by the library's handshake timeout.
        self.handshake_timer = self.loop.call_later(HANDSHAKE_TIMEOUT, self.handshake_expired)

    def handshake_expired(self) -> None:
        if self.request is None and self.http_buffer is None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.sniffed:
            self.sniffed = True
            if data.startswith(b"POST "):
                self.http_buffer = bytearray()
                self.handshake_timer.cancel()
        if self.http_buffer is None:
            super().data_received(data)
            if self.request is not None:
                self.handshake_timer.cancel()
            return
        self.http_buffer += data
        self.serve_http()

    def serve_http(self) -> None:
        buf = self.http_buffer
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 16384:
                    self.http_reply(431, "Request Header Fields Too Large", close=True)
                return
            head = bytes(buf[:end]).decode("latin-1").split("\r\n")
            try:
                method, target, _ = head[0].split(" ", 2)
            except ValueError:
                self.http_reply(400, "Bad Request", close=True)
                return
            fields = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            if "transfer-encoding" in fields:
                self.http_reply(501, "Not Implemented", close=True)
                return
            length = int(fields.get("content-length", "0") or "0")
            if length > MAX_MESSAGE:
                self.http_reply(413, "Payload Too Large", close=True)
                return
            if len(buf) < end + 4 + length:
                return  # wait for the rest of the body
            body = bytes(buf[end + 4 : end + 4 + length])
            del buf[: end + 4 + length]
            path = urlsplit(target).path
            close = fields.get("connection", "").lower() == "close"
            if not path.startswith("/publish/"):
                self.http_reply(404, "Not Found", close=True)
                return
            if method != "POST":
                self.http_reply(405, "Method Not Allowed", close=True)
                return
            topic = path[len("/publish/") :]
            if not TOPIC.fullmatch(topic):
                self.http_reply(400, "Bad Request", close=close)
            elif is_text(fields.get("content-type", "")):
                try:
                    publish(topic, body.decode())
                    self.http_reply(202, "Accepted", close=close)
                except UnicodeDecodeError:
                    self.http_reply(400, "Bad Request", close=close)
            else:
                publish(topic, body)
                self.http_reply(202, "Accepted", close=close)
            if close:
                return

    def http_reply(self, status: int, reason: str, close: bool) -> None:
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n"
            f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n".encode()
        )
        if close:
            self.http_buffer = bytearray()
            self.transport.close()  # the pending handshake then ends without a request


async def main() -> None:
    arg = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "")
    if not arg.isdigit():
        sys.exit("usage: server.py PORT")
    async with serve(
        handler,
        "127.0.0.1",
        int(arg),
        create_connection=Connection,
        process_request=process_request,
        open_timeout=None,
        max_size=MAX_MESSAGE,
        compression=None,
        ping_interval=20,
        ping_timeout=20,
        backlog=4096,
    ) as server:
        import websockets

        print(
            f"python peer listening on ws://127.0.0.1:{arg} "
            f"(websockets {websockets.__version__}, python {sys.version.split()[0]})",
            flush=True,
        )
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
