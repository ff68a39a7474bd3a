// Real-browser test of the demo page that shardcast serves at `/` (crates/shardcast-server/assets/demo): Debian's chromium
// driven by playwright-core. It starts the shardcast binary itself, opens two pages, chats
// between them, restarts the server on the same port, checks that both pages reconnect and
// chat again, runs the fan-out probe, and saves screenshots to docs/img/.
//
//   cd tests/browser && npm ci && SHARDCAST_BIN=../../target/release/shardcast node --test
//
// Environment:
//   SHARDCAST_BIN          the binary to run (default: target/release/shardcast of this repo)
//   SHARDCAST_DEMO_STATIC  a directory (crates/shardcast-server/assets/demo) to serve from a static server of this script
//                          instead of the relay's own `/`; the page then gets ?server=HOST:PORT
//   CHROMIUM               the browser (default /usr/bin/chromium); never downloaded
//   SHARDCAST_SCREENSHOTS  directory for demo.png and demo-fanout.png (default docs/img)
// Every wait is on a real signal (a log line, a process exit, page state) and bounded.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import { existsSync } from 'node:fs';
import { readFile, mkdir } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const bin = path.resolve(process.env.SHARDCAST_BIN || path.join(repo, 'target', 'release', 'shardcast'));
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const staticDir = process.env.SHARDCAST_DEMO_STATIC ? path.resolve(process.env.SHARDCAST_DEMO_STATIC) : null;
const shotDir = path.resolve(process.env.SHARDCAST_SCREENSHOTS || path.join(repo, 'docs', 'img'));
const WAIT = { timeout: 20000 };

/** A free loopback port: bind port 0, read the port, release it. */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Resolves when `emitter` emits `event`, rejects after `ms` with `what` in the message. */
function within(ms, what, start) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    start(
      (v) => { clearTimeout(timer); resolve(v); },
      (e) => { clearTimeout(timer); reject(e); },
    );
  });
}

/** Runs shardcast on 127.0.0.1:port; resolves once it logs that it is listening. */
async function startServer(port) {
  assert.ok(existsSync(bin), `SHARDCAST_BIN ${bin} does not exist (cargo build --release first)`);
  const child = spawn(bin, ['--listen', `127.0.0.1:${port}`, '--drain-delay', '0s', '--drain-timeout', '2s'], {
    env: { ...process.env, RUST_LOG: 'info', NO_COLOR: '1' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  child.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  await within(15000, `shardcast to log "listening" on port ${port}`, (resolve, reject) => {
    child.stderr.on('data', (chunk) => {
      log += chunk;
      if (/shardcast listening/.test(log)) resolve();
    });
    child.exited.then(({ code, signal }) => reject(new Error(`shardcast exited (${code ?? signal}) before listening:\n${log}`)));
  });
  child.log = () => log;
  return child;
}

/** SIGTERM, then the exit status of the drain. */
async function stopServer(child) {
  child.kill('SIGTERM');
  const status = await within(20000, 'shardcast to exit after SIGTERM', (resolve) => child.exited.then(resolve));
  assert.deepEqual(status, { code: 0, signal: null }, `shardcast did not drain cleanly:\n${child.log()}`);
}

const TYPES = { '.html': 'text/html; charset=utf-8', '.css': 'text/css; charset=utf-8', '.js': 'text/javascript; charset=utf-8' };

/** Serves `dir` on a loopback port: a stand-in for the relay's own `/` while it has none. */
async function serveStatic(dir) {
  const srv = createServer(async (req, res) => {
    const name = new URL(req.url, 'http://x').pathname.replace(/^\/$/, '/index.html');
    const file = path.join(dir, path.normalize(name));
    if (!file.startsWith(dir + path.sep) || !TYPES[path.extname(file)]) {
      res.writeHead(404).end();
      return;
    }
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': TYPES[path.extname(file)] }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => srv.listen(0, '127.0.0.1', resolve));
  return srv;
}

// Page-side predicates, evaluated in the browser.
const hasMessage = (text) => [...document.querySelectorAll('#messages .msg .body')].some((e) => e.textContent === text);
const connectedAtLeast = (n) => {
  const c = document.querySelector('#conn');
  return c.dataset.state === 'connected' && Number(c.dataset.connects) >= n;
};

let browser;
let server;
let staticServer;
after(async () => {
  await browser?.close();
  if (server && server.exitCode === null && server.signalCode === null) server.kill('SIGKILL');
  staticServer?.close();
});

test('two pages chat, survive a server restart, and measure fan-out', { timeout: 180000 }, async () => {
  const port = await freePort();
  server = await startServer(port);
  let url = `http://127.0.0.1:${port}/`;
  if (staticDir) {
    staticServer = await serveStatic(staticDir);
    url = `http://127.0.0.1:${staticServer.address().port}/?server=127.0.0.1:${port}`;
  }

  browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run'],
  });

  const problems = [];
  async function openPage(nick) {
    const context = await browser.newContext({ viewport: { width: 1100, height: 680 } });
    const page = await context.newPage();
    page.on('pageerror', (e) => problems.push(`${nick}: page error: ${e.message}`));
    page.on('request', (r) => {
      const { protocol, hostname } = new URL(r.url());
      if (!['data:', 'about:'].includes(protocol) && hostname !== '127.0.0.1') {
        problems.push(`${nick}: external request ${r.url()}`);
      }
    });
    const response = await page.goto(url, WAIT);
    assert.equal(response.status(), 200, `GET ${url}`);
    await page.waitForFunction(connectedAtLeast, 1, WAIT);
    await page.fill('#nick', nick);
    await page.dispatchEvent('#nick', 'change');
    return page;
  }

  async function say(page, text) {
    await page.fill('#input', text);
    await page.press('#input', 'Enter');
  }

  async function bothSee(pages, text) {
    for (const p of pages) await p.waitForFunction(hasMessage, text, WAIT);
  }

  const alice = await openPage('alice');
  const bob = await openPage('bob');
  const pages = [alice, bob];

  // Chat both ways; the sender receives its own message from the relay (no local echo).
  await say(alice, 'hello from the first tab');
  await bothSee(pages, 'hello from the first tab');
  await say(bob, 'hi! this one came through the relay too');
  await bothSee(pages, 'hi! this one came through the relay too');
  assert.equal(await alice.locator('.msg.mine').count(), 1, 'alice sees her one message as hers');

  // Restart the relay on the same port: both pages notice, back off, and come back.
  await stopServer(server);
  for (const p of pages) {
    await p.waitForFunction(() => document.querySelector('#conn').dataset.state !== 'connected', null, WAIT);
  }
  // While it is down, the retries back off: the k-th wait is drawn from [d/2, d], d = 250 ms * 2^k.
  for (const p of pages) {
    await p.waitForFunction(() => window.shardcastDemo.chat.waits.length >= 4, null, WAIT);
    const waits = await p.evaluate(() => window.shardcastDemo.chat.waits);
    waits.slice(0, 4).forEach((w, k) => {
      const d = 250 * 2 ** k;
      assert.ok(w >= d / 2 && w <= d, `retry ${k} waited ${w} ms, outside [${d / 2}, ${d}]`);
    });
    assert.match(await p.textContent('#conn-text'), /^(reconnecting in [\d.]+ s \(attempt \d+\)|connecting)$/);
  }
  server = await startServer(port);
  for (const p of pages) await p.waitForFunction(connectedAtLeast, 2, { timeout: 30000 });

  await say(alice, 'still here after the restart');
  await bothSee(pages, 'still here after the restart');
  await say(bob, 'me too');
  await bothSee(pages, 'me too');
  for (const p of pages) {
    assert.equal(await p.locator('.msg.system', { hasText: 'reconnected' }).count(), 1);
  }
  await mkdir(shotDir, { recursive: true });
  await alice.screenshot({ path: path.join(shotDir, 'demo.png') });

  // Fan-out view: both pages probe; each measures its own round trips and sees the other.
  for (const p of pages) await p.click('#tab-fanout');
  for (const p of pages) {
    await p.waitForFunction(() => {
      const d = window.shardcastDemo;
      return d.stats.samples >= 80 && d.stats.peers.size === 2 && document.querySelector('#m-p99').textContent !== '–';
    }, null, { timeout: 30000 });
  }
  const p99 = Number(await alice.textContent('#m-p99'));
  assert.ok(p99 > 0 && p99 < 1000, `loopback round trip p99 ${p99} ms`);
  await alice.screenshot({ path: path.join(shotDir, 'demo-fanout.png') });

  assert.deepEqual(problems, []);
  await stopServer(server);
});
