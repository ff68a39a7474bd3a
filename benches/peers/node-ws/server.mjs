// The Node.js peer for the shardcast comparison: a plain `ws` server with a
// Map<topic, Set<WebSocket>>. Usage: node server.mjs PORT (or PORT in the environment).
// Listens on 127.0.0.1 only.
//
//   GET  /ws/{topic}, /ws?topic=T, /?topic=T   WebSocket: subscribe; messages sent are
//                                               published to the topic (sender included)
//   POST /publish/{topic}                       publish the body; 202
//
// Slow consumers: a client whose bufferedAmount would pass 1 MiB is terminated instead of
// sent to. Pings: every 20 s; a client that has not answered the previous ping (or sent
// anything) by then is terminated. ws answers client pings itself.

import http from "node:http";
import { WebSocketServer } from "ws";

const port = Number(process.argv[2] ?? process.env.PORT);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error("usage: node server.mjs PORT");
  process.exit(2);
}

const MAX_MESSAGE = 64 * 1024; // same as shardcast's --max-message-bytes
const SEND_BUDGET = 1024 * 1024;
const PING_INTERVAL_MS = 20_000;
const TOPIC = /^[A-Za-z0-9._:-]{1,128}$/;

const rooms = new Map(); // topic -> Set<WebSocket>

function publish(topic, data, isBinary) {
  const room = rooms.get(topic);
  if (!room) return;
  for (const ws of room) {
    if (ws.readyState !== ws.OPEN) continue;
    if (ws.bufferedAmount + data.length > SEND_BUDGET) {
      ws.terminate(); // slow consumer
      continue;
    }
    ws.send(data, { binary: isBinary });
  }
}

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

const wss = new WebSocketServer({ noServer: true, maxPayload: MAX_MESSAGE, perMessageDeflate: false });

wss.on("connection", (ws, topics) => {
  ws.isAlive = true;
  for (const t of topics) {
    let room = rooms.get(t);
    if (!room) rooms.set(t, (room = new Set()));
    room.add(ws);
  }
  ws.on("pong", () => { ws.isAlive = true; });
  ws.on("message", (data, isBinary) => {
    ws.isAlive = true;
    if (topics.length === 1) publish(topics[0], data, isBinary);
  });
  ws.on("error", () => {});
  ws.on("close", () => {
    for (const t of topics) {
      const room = rooms.get(t);
      if (room && room.delete(ws) && room.size === 0) rooms.delete(t);
    }
  });
});

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) { ws.terminate(); continue; }
    ws.isAlive = false;
    ws.ping();
  }
}, PING_INTERVAL_MS);
heartbeat.unref();

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  if (url.pathname === "/healthz") { res.end("ok"); return; }
  if (!url.pathname.startsWith("/publish/")) { res.writeHead(404).end("not found\n"); return; }
  if (req.method !== "POST") { res.writeHead(405, { Allow: "POST" }).end("method not allowed\n"); return; }
  const topic = url.pathname.slice("/publish/".length);
  if (!TOPIC.test(topic)) { res.writeHead(400).end("bad topic\n"); return; }
  const chunks = [];
  let size = 0;
  let tooBig = false;
  req.on("data", (chunk) => {
    size += chunk.length;
    if (size > MAX_MESSAGE) tooBig = true;
    else chunks.push(chunk);
  });
  req.on("end", () => {
    if (tooBig) { res.writeHead(413).end("body too large\n"); return; }
    publish(topic, Buffer.concat(chunks, size), !isText(req.headers["content-type"]));
    res.writeHead(202).end();
  });
});

server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url, "http://x");
  const topics = wsTopics(url);
  const refuse = (status) => socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
  if (topics === null) return refuse("404 Not Found");
  if (!topics.every((t) => TOPIC.test(t))) return refuse("400 Bad Request");
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit("connection", ws, topics));
});

server.listen(port, "127.0.0.1", () => {
  console.log(`node-ws peer listening on ws://127.0.0.1:${port} (node ${process.version})`);
});
