"""Writes the seed corpora in fuzz/seeds/<target>/: `python3 fuzz/seeds/gen.py`.

Rerun it after changing a target's input layout (the timer_wheel seeds follow its `Op` enum).
"""
import base64, hashlib, hmac, json, os, struct

ROOT = os.path.dirname(os.path.abspath(__file__))

def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

MASK = bytes([0x37, 0xFA, 0x21, 0x3D])

def frame(opcode, payload, fin=True, mask=True):
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        hdr = bytes([b0, m | n])
    elif n < 65536:
        hdr = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        hdr = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if not mask:
        return hdr + payload
    return hdr + MASK + bytes(c ^ MASK[i % 4] for i, c in enumerate(payload))

def server_read(name, wire, limit=4096, seed=7, opts=0):
    # bytes 0-1: u16 LE limit, byte 1 % 8 is also a shift: keep it 0 mod 8.
    # byte 3 (opts): bits 0-1 access (0 publish, 1 multi-topic, 2 no publish right), bit 2 a
    # publish rate of 1 + bits 3-4 per second, bits 5-7 bytes sent with the upgrade (x 3).
    assert limit % 2048 == 0 or limit < 256
    lo, hi = limit & 0xFF, limit >> 8
    assert hi % 8 == 0
    write("server_read", name, bytes([lo, hi, seed, opts]) + wire)

MULTI_TOPIC, NO_PUBLISH, RATE_1, RATE_2 = 1, 2, 4, 4 | (1 << 3)
def leftover(n): return (n // 3) << 5

# server_read: masked client frames, limit 4097 (0x1000 >> 0, plus one).
server_read("text_hello", frame(0x1, b"Hello"))
server_read("binary_200", frame(0x2, bytes(range(200))))
server_read("fragmented_text", frame(0x1, b"Hel", fin=False) + frame(0x0, b"lo, ", fin=False)
            + frame(0x9, b"mid") + frame(0x0, "wörld".encode()))
server_read("ping_pong", frame(0x9, b"are you there") + frame(0xA, b""))
server_read("close_1000", frame(0x8, struct.pack(">H", 1000) + b"bye"))
server_read("close_then_text", frame(0x8, b"") + frame(0x1, b"ignored"))
server_read("unmasked_text", frame(0x1, b"Hello", mask=False))
server_read("bad_utf8", frame(0x1, b"\xc3\x28 invalid"))
# A frame announcing 1000 bytes of text, cut off after 130: invalid at byte 120 (mid-frame).
mid = bytearray(("ok \u20ac, " * 125).encode()[:1000]); mid[120] = 0xFF
server_read("bad_utf8_mid_frame", frame(0x1, bytes(mid))[:8 + 130], seed=9)
server_read("utf8_split_fragments", frame(0x1, "a\u20ac".encode()[:3], fin=False) + frame(0x9, b"")
            + frame(0x0, "\u20ac\U0001F600".encode()[2:6], fin=False) + frame(0x0, "\U0001F600".encode()[3:]))
server_read("utf8_incomplete_at_fin", frame(0x1, b"a", fin=False) + frame(0x0, "\U0001F600".encode()[:3]))
server_read("over_limit", frame(0x2, bytes(100)), limit=64, seed=3)
server_read("fragments_over_limit", frame(0x1, b"a" * 40, fin=False) + frame(0x0, b"b" * 40),
            limit=64, seed=1)
server_read("len64_header", bytes([0x82, 0xFF]) + struct.pack(">Q", 1 << 40) + MASK)
# The connection's rights and the upgrade's leftover.
server_read("multi_topic_data", frame(0x9, b"p") + frame(0x1, b"refused"), opts=MULTI_TOPIC)
server_read("no_publish_right", frame(0x2, b"refused") + frame(0x1, b"later"), opts=NO_PUBLISH)
server_read("rate_1", frame(0x1, b"one") + frame(0x1, b"two") + frame(0x1, b"three"), opts=RATE_1)
server_read("rate_2_fragments", frame(0x1, b"o", fin=False) + frame(0x0, b"ne") + frame(0x2, b"two")
            + frame(0x9, b"") + frame(0x2, b"three"), opts=RATE_2, seed=5)
server_read("leftover_split", frame(0x1, b"split over the upgrade") + frame(0x2, b"x"),
            opts=leftover(9), seed=4)
server_read("leftover_close", frame(0x8, struct.pack(">H", 4000)), opts=leftover(6))

# frame_roundtrip: byte 0 bit 0 binary, bit 1 use the length in bytes 1-3; rest payload.
def roundtrip(name, flags, length, payload):
    write("frame_roundtrip", name, bytes([flags]) + struct.pack("<I", length)[:3] + payload)

roundtrip("text_empty", 0, 0, b"")
roundtrip("text_125", 0, 0, b"x" * 125)
roundtrip("binary_126", 1, 0, bytes(range(126)))
roundtrip("text_len_65535", 2, 65535, b"abc")
roundtrip("binary_len_65536", 3, 65536, b"\x00\xff")
roundtrip("binary_len_128k", 3, 128 * 1024, b"z")
# bits 3-4: 1 pong (payload up to 125), 2 ping, 3 close (code in bytes 1-2 BE, reason = payload).
PONG, PING, CLOSE = 1 << 3, 2 << 3, 3 << 3
roundtrip("pong_empty", PONG, 0, b"")
roundtrip("pong_125", PONG | 2, 125, b"ping payload ")
roundtrip("ping", PING, 0, b"")
def close_seed(name, code, reason):
    write("frame_roundtrip", name, bytes([CLOSE]) + struct.pack(">H", code) + b"\0" + reason)
close_seed("close_1000", 1000, b"")
close_seed("close_4008_reason", 4008, b"slow consumer")
close_seed("close_long_reason", 1008, "é".encode() * 70)

# handshake: raw HTTP/1.1 requests.
def req(lines, body=b""):
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

UP = ["Host: localhost:8080", "Upgrade: websocket", "Connection: Upgrade",
      "Sec-WebSocket-Version: 13", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]
write("handshake", "upgrade_path_topic", req(["GET /ws/chat HTTP/1.1"] + UP))
write("handshake", "upgrade_query_topics", req(["GET /ws?topic=a&topic=b&token=abc HTTP/1.1"] + UP))
write("handshake", "upgrade_bearer", req(["GET /ws/chat HTTP/1.1"] + UP + ["Authorization: Bearer abc"]))
write("handshake", "upgrade_origin", req(["GET /ws/chat HTTP/1.1"] + UP + ["Origin: https://app.example.com"]))
write("handshake", "publish", req(["POST /publish/chat HTTP/1.1", "Host: localhost:8080",
      "Authorization: Bearer abc", "Content-Type: text/plain", "Content-Length: 5"], b"hello"))
write("handshake", "bad_version", req(["GET /ws/chat HTTP/1.1"] + UP[:3]
      + ["Sec-WebSocket-Version: 8", UP[4]]))
write("handshake", "bad_key", req(["GET /ws/chat HTTP/1.1"] + UP[:4] + ["Sec-WebSocket-Key: not-base64!"]))
write("handshake", "healthz", req(["GET /healthz HTTP/1.1", "Host: localhost"]))

# jwt: token strings; the signed ones use HS256 with the key "fuzz-secret".
def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=")

def jwt(claims, key=b"fuzz-secret", header=None):
    header = header or {"alg": "HS256", "typ": "JWT"}
    h = b64(json.dumps(header, separators=(",", ":")).encode())
    p = b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = b64(hmac.new(key, h + b"." + p, hashlib.sha256).digest())
    return h + b"." + p + b"." + sig

FAR = 4102444800  # 2100-01-01
write("jwt", "subscribe", jwt({"exp": FAR, "subscribe": ["chat", "news.*"]}))
write("jwt", "publish", jwt({"exp": FAR, "subscribe": ["*"], "publish": ["chat"]}))
write("jwt", "expired", jwt({"exp": 1000000000, "subscribe": ["chat"]}))
write("jwt", "no_exp", jwt({"subscribe": ["chat"]}))
write("jwt", "nbf_future", jwt({"exp": FAR, "nbf": FAR - 1, "publish": ["chat"]}))
write("jwt", "wrong_key", jwt({"exp": FAR, "subscribe": ["chat"]}, key=b"other"))
write("jwt", "alg_none", jwt({"exp": FAR}, header={"alg": "none", "typ": "JWT"}).rsplit(b".", 1)[0] + b".")
write("jwt", "garbage", b"not.a.jwt")
write("jwt", "two_parts", b"eyJhbGciOiJIUzI1NiJ9.e30")

# timer_wheel: arbitrary 1.5's encoding of Input { slots: u8, ops: Vec<Op> }: each op of the
# trailing Vec is preceded by a true bool (0x01); enum tags are u32 LE scaled to the count.
def variant(i, count):
    return struct.pack("<I", (i * (1 << 32) + count - 1) // count)

def delay(kind, n):
    fmt = {0: "<B", 1: "<B", 2: "<H", 3: "<I"}[kind]
    return variant(kind, 4) + struct.pack(fmt, n)

def insert(key, d): return b"\x01" + variant(0, 5) + bytes([key]) + d
def touch(key, d): return b"\x01" + variant(1, 5) + bytes([key]) + d
def remove(key): return b"\x01" + variant(2, 5) + bytes([key])
def tick(): return b"\x01" + variant(3, 5) + variant(0, 4)
def small(n): return b"\x01" + variant(3, 5) + variant(1, 4) + bytes([n])
def revs(n, extra): return b"\x01" + variant(3, 5) + variant(2, 4) + bytes([n, extra])
def huge(n): return b"\x01" + variant(3, 5) + variant(3, 4) + struct.pack("<I", n)
def rewind(n): return b"\x01" + variant(4, 5) + struct.pack("<H", n)
PAST, NEAR, FAR_, HUGE = 0, 1, 2, 3

write("timer_wheel", "insert_advance", bytes([8]) + insert(1, delay(NEAR, 3)) + insert(2, delay(NEAR, 5))
      + small(2) + tick() + small(10))
write("timer_wheel", "touch_makes_stale", bytes([4]) + insert(0, delay(NEAR, 2)) + touch(0, delay(FAR_, 40))
      + touch(0, delay(NEAR, 9)) + small(3) + small(20) + remove(0) + small(50))
write("timer_wheel", "revolutions", bytes([3]) + b"".join(insert(k, delay(FAR_, 7 * k + 1)) for k in range(16))
      + revs(2, 1) + revs(10, 3) + tick())
write("timer_wheel", "huge_jump_past", bytes([1]) + insert(5, delay(HUGE, 1 << 20)) + huge(1 << 16)
      + insert(6, delay(PAST, 200)) + rewind(300) + tick() + huge(1 << 21))
write("timer_wheel", "same_slot", bytes([64]) + insert(1, delay(NEAR, 64)) + insert(2, delay(FAR_, 128))
      + insert(3, delay(NEAR, 0)) + small(64) + touch(2, delay(NEAR, 1)) + small(1) + small(64))

# bus_envelope: version 1, 16-byte node id, kind (1 text, 2 binary, 3 probe), u32 BE length,
# payload. The round-trip half of the target reads byte 0 as the kind and bytes 1-16 as the
# node id, so every seed also feeds it.
NODE = bytes(range(0x10, 0x20))

def envelope(kind, payload, version=1, length=None):
    n = len(payload) if length is None else length
    return bytes([version]) + NODE + bytes([kind]) + struct.pack(">I", n) + payload

write("bus_envelope", "text", envelope(1, b"hello, every node"))
write("bus_envelope", "binary", envelope(2, bytes(range(256))))
write("bus_envelope", "probe", envelope(3, struct.pack(">Q", 123456789)))
write("bus_envelope", "empty_payload", envelope(1, b""))
write("bus_envelope", "length_too_long", envelope(2, b"abc", length=1000))
write("bus_envelope", "length_too_short", envelope(2, b"abcdef", length=2))
write("bus_envelope", "unknown_kind", envelope(9, b"x"))
write("bus_envelope", "unknown_version", envelope(1, b"x", version=2))
write("bus_envelope", "short_header", envelope(1, b"")[:10])
