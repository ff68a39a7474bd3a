// The Bun peer for the shardcast comparison: Bun.serve pub/sub (uWebSockets underneath).
// Usage: bun server.js PORT (or PORT in the environment). Listens on 127.0.0.1 only.
//
//   GET  /ws/{topic}, /ws?topic=T, /?topic=T   WebSocket: subscribe; messages sent are
//                                               published to the topic (sender included)
//   POST /publish/{topic}                       publish the body; 202
//
// Slow consumers: closeOnBackpressureLimit closes a client whose buffered outbound data
// passes 1 MiB. Pings: uWebSockets pings a client that has sent nothing for 20 s
// (idleTimeout 28 gives that; measured) and closes it if it is still silent 8 s later.
// Any data from the client restarts that timer, so a chatty client is never pinged.

const port = Number(process.argv[2] ?? process.env.PORT);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error("usage: bun server.js PORT");
  process.exit(2);
}

const MAX_MESSAGE = 64 * 1024; // same as shardcast's --max-message-bytes
const TOPIC = /^[A-Za-z0-9._:-]{1,128}$/;

function wsTopics(url) {
  if (url.pathname.startsWith("/ws/")) return [url.pathname.slice(4)];
  if (url.pathname === "/" || url.pathname === "/ws") {
    const topics = [...new Set(url.searchParams.getAll("topic"))];
    return topics.length ? topics : [""];
  }
  return null;
}

function isText(contentType) {
  const t = (contentType ?? "").split(";")[0].trim().toLowerCase();
  return t.startsWith("text/") || t === "application/json";
}

const server = Bun.serve({
  hostname: "127.0.0.1",
  port,
  maxRequestBodySize: MAX_MESSAGE,
  async fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname.startsWith("/publish/")) {
      if (req.method !== "POST") return new Response("method not allowed\n", { status: 405, headers: { Allow: "POST" } });
      const topic = url.pathname.slice("/publish/".length);
      if (!TOPIC.test(topic)) return new Response("bad topic\n", { status: 400 });
      const body = isText(req.headers.get("content-type"))
        ? await req.text()
        : new Uint8Array(await req.arrayBuffer());
      server.publish(topic, body);
      return new Response(null, { status: 202 });
    }
    if (url.pathname === "/healthz") return new Response("ok");
    const topics = wsTopics(url);
    if (topics === null) return new Response("not found\n", { status: 404 });
    if (!topics.every((t) => TOPIC.test(t))) return new Response("bad topic\n", { status: 400 });
    if (server.upgrade(req, { data: { topics } })) return undefined;
    return new Response("websocket upgrade required\n", { status: 426 });
  },
  websocket: {
    open(ws) {
      for (const t of ws.data.topics) ws.subscribe(t);
    },
    message(ws, message) {
      // A string arrives as text and is published as text; a Buffer as binary.
      if (ws.data.topics.length === 1) ws.publish(ws.data.topics[0], message);
    },
    publishToSelf: true,
    maxPayloadLength: MAX_MESSAGE,
    backpressureLimit: 1024 * 1024,
    closeOnBackpressureLimit: true,
    perMessageDeflate: false,
    sendPings: true,
    idleTimeout: 28,
  },
});

console.log(`bun peer listening on ws://127.0.0.1:${server.port} (bun ${Bun.version})`);
