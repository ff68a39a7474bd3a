// Logic of the shardcast browser demo (crates/shardcast-server/assets/demo/index.html): a reconnecting WebSocket link
// (exponential back-off with jitter), the chat room on /ws/{topic}, and the fan-out view that
// publishes timestamped probes on a probe topic and measures their round trip through the relay.
// State for tests and curious readers: window.shardcastDemo, and data-* attributes on #conn.
'use strict';
(() => {
  const params = new URLSearchParams(location.search);
  const TOPIC_RE = /^[A-Za-z0-9._:-]{1,128}$/;
  // ?server=host:port points the page at another relay, for serving the page from elsewhere
  // while developing. It is honoured only on a page loaded from loopback, so a link cannot
  // aim a production page at a stranger's server; otherwise the page talks to its server.
  const serverParam = params.get('server');
  const loopback = ['127.0.0.1', 'localhost', '[::1]'].includes(location.hostname);
  const host = loopback && serverParam && /^[A-Za-z0-9.:[\]-]{1,300}$/.test(serverParam) ? serverParam : location.host;
  const wsScheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const httpOrigin = `${location.protocol === 'https:' ? 'https:' : 'http:'}//${host}`;
  const wsUrl = (topic) => `${wsScheme}//${host}/ws/${topic}`;
  const clientId = Math.random().toString(36).slice(2, 10);
  const $ = (id) => document.getElementById(id);

  const store = {
    get(key) { try { return localStorage.getItem(`shardcast.${key}`); } catch { return null; } },
    set(key, value) { try { localStorage.setItem(`shardcast.${key}`, value); } catch { /* private mode */ } },
  };

  // ---- A WebSocket that comes back by itself ------------------------------------------------
  // Delays grow 250 ms, 500 ms, 1 s ... up to 10 s; each is drawn from [delay/2, delay] so that
  // a thousand pages dropped by one restart do not all come back in the same millisecond.
  const BACKOFF_BASE_MS = 250;
  const BACKOFF_CAP_MS = 10000;
  const CONNECT_TIMEOUT_MS = 10000; // a handshake that hangs this long is abandoned and retried
  const STABLE_MS = 5000; // open this long: the next failure starts the back-off afresh

  class Link {
    constructor(name, handlers) {
      this.name = name;
      this.handlers = handlers; // { message(data, link), state(link), closed(event, link, wasOpen) }
      this.topic = null;
      this.ws = null;
      this.state = 'idle'; // idle | connecting | connected | reconnecting
      this.attempt = 0;
      this.connects = 0; // how many times this link has been connected
      this.retryAt = 0;
      this.waits = []; // the last few back-off waits, ms (shown to tests)
      this.timers = {};
    }

    open(topic) {
      this.topic = topic;
      this.attempt = 0;
      this.connects = 0;
      this.waits = [];
      this.teardown();
      this.connect();
    }

    connect() {
      this.clearTimers();
      this.setState('connecting');
      let ws;
      try {
        ws = new WebSocket(wsUrl(this.topic));
      } catch (e) {
        this.scheduleRetry();
        return;
      }
      ws.binaryType = 'arraybuffer';
      this.ws = ws;
      this.timers.connect = setTimeout(() => ws.close(), CONNECT_TIMEOUT_MS);
      let opened = false;
      ws.onopen = () => {
        opened = true;
        clearTimeout(this.timers.connect);
        this.connects += 1;
        this.timers.stable = setTimeout(() => { this.attempt = 0; }, STABLE_MS);
        this.setState('connected');
      };
      ws.onmessage = (ev) => this.handlers.message?.(ev.data, this);
      ws.onclose = (ev) => {
        if (this.ws !== ws) return; // replaced by open() or teardown()
        this.ws = null;
        this.handlers.closed?.(ev, this, opened);
        this.scheduleRetry();
      };
    }

    scheduleRetry() {
      this.clearTimers();
      const delay = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
      const wait = Math.round(delay / 2 + Math.random() * (delay / 2));
      this.attempt = Math.min(this.attempt + 1, 16);
      this.waits = [...this.waits.slice(-15), wait];
      this.retryAt = Date.now() + wait;
      this.timers.retry = setTimeout(() => this.connect(), wait);
      this.setState('reconnecting');
    }

    retryNow() {
      if (this.state === 'reconnecting') this.connect();
    }

    send(data) {
      if (this.state !== 'connected' || !this.ws) return false;
      this.ws.send(data);
      return true;
    }

    teardown() {
      this.clearTimers();
      if (this.ws) {
        const ws = this.ws;
        this.ws = null;
        ws.onopen = ws.onmessage = ws.onclose = null;
        ws.close(1000);
      }
    }

    clearTimers() {
      for (const t of Object.values(this.timers)) clearTimeout(t);
      this.timers = {};
    }

    setState(state) {
      this.state = state;
      this.handlers.state?.(this);
    }
  }

  const decoder = new TextDecoder('utf-8', { fatal: true });
  // A frame as text: text frames as they are, binary frames decoded when they are UTF-8.
  function frameText(data) {
    if (typeof data === 'string') return { text: data, binary: false };
    try {
      return { text: decoder.decode(data), binary: true };
    } catch {
      return { text: `(${data.byteLength} bytes of binary)`, binary: true };
    }
  }

  // ---- Chat ---------------------------------------------------------------------------------
  const MAX_MESSAGES = 500;
  const list = $('messages');
  const input = $('input');
  const sendButton = $('send');
  const topicInput = $('topic');
  const nickInput = $('nick');
  const conn = $('conn');

  let topic = [params.get('topic'), store.get('topic'), 'chat'].find((t) => t && TOPIC_RE.test(t));
  nickInput.value = store.get('nick') || `guest-${clientId.slice(0, 4)}`;

  function timeOfDay() {
    return new Date().toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  }

  function addMessage({ who, text, mine = false, kind = '' }) {
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    const li = document.createElement('li');
    li.className = `msg ${kind}${mine ? ' mine' : ''}`;
    if (kind !== 'system') {
      const meta = document.createElement('div');
      meta.className = 'meta';
      const whoEl = document.createElement('span');
      whoEl.className = 'who';
      whoEl.textContent = who;
      const when = document.createElement('time');
      when.textContent = timeOfDay();
      meta.append(whoEl, when);
      li.append(meta);
    }
    const body = document.createElement('div');
    body.className = 'body';
    body.textContent = text;
    li.append(body);
    list.append(li);
    while (list.children.length > MAX_MESSAGES) list.firstElementChild.remove();
    if (atBottom || mine) list.scrollTop = list.scrollHeight;
  }

  // Chat messages are JSON {nick, text, from}; anything else (websocat, curl) is shown raw.
  function onChatFrame(data) {
    stats.received += 1;
    const { text, binary } = frameText(data);
    let msg = null;
    if (!binary) {
      try { msg = JSON.parse(text); } catch { /* plain text */ }
    }
    if (msg && typeof msg === 'object' && typeof msg.text === 'string') {
      addMessage({ who: String(msg.nick || 'anonymous').slice(0, 32), text: msg.text, mine: msg.from === clientId });
    } else {
      addMessage({ who: binary ? 'binary frame' : 'raw text frame', text, kind: 'raw' });
    }
  }

  const CLOSE_REASONS = { 1001: 'server going away', 1006: 'connection lost', 4008: 'slow consumer', 4012: 'pong timeout' };

  function onChatClosed(ev, link, wasOpen) {
    if (!wasOpen) return; // one note per lost connection, none per failed retry
    const why = ev.reason || CLOSE_REASONS[ev.code] || 'closed';
    addMessage({ text: `disconnected: ${why} (${ev.code})`, kind: 'system' });
  }

  function renderConn(link) {
    conn.dataset.state = link.state;
    conn.dataset.connects = String(link.connects);
    const text = $('conn-text');
    $('reconnect-now').hidden = link.state !== 'reconnecting';
    sendButton.disabled = link.state !== 'connected';
    if (link.state === 'connected') {
      text.textContent = `connected to ${link.topic}`;
      if (link.connects > 1) addMessage({ text: 'reconnected', kind: 'system' });
    } else if (link.state === 'reconnecting') {
      const secs = Math.max(0, (link.retryAt - Date.now()) / 1000);
      text.textContent = `reconnecting in ${secs.toFixed(1)} s (attempt ${link.attempt})`;
    } else {
      text.textContent = link.state;
    }
  }

  const chat = new Link('chat', { message: onChatFrame, state: renderConn, closed: onChatClosed });
  $('reconnect-now').addEventListener('click', () => chat.retryNow());
  // Counting down the retry in the badge.
  setInterval(() => { if (chat.state === 'reconnecting') renderConn(chat); }, 200);
  window.addEventListener('online', () => { chat.retryNow(); probe.retryNow(); });

  function setTopic(next) {
    topic = next;
    topicInput.value = next;
    store.set('topic', next);
    for (const el of document.querySelectorAll('.topic-name')) el.textContent = next;
    $('endpoint').textContent = wsUrl(next);
    const url = new URL(location.href);
    url.searchParams.set('topic', next);
    history.replaceState(null, '', url);
    list.replaceChildren();
    addMessage({ text: `topic ${next}`, kind: 'system' });
    chat.open(next);
  }

  topicInput.addEventListener('change', () => {
    const next = topicInput.value.trim();
    if (TOPIC_RE.test(next)) {
      topicInput.setCustomValidity('');
      if (next !== topic) setTopic(next);
    } else {
      topicInput.setCustomValidity('1 to 128 of A-Z a-z 0-9 . _ : -');
      topicInput.reportValidity();
    }
  });
  nickInput.addEventListener('change', () => store.set('nick', nickInput.value.trim()));

  $('composer').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const text = input.value;
    if (!text.trim()) return;
    const nick = nickInput.value.trim() || 'anonymous';
    // The relay sends the message back to its sender too: it shows up when it has gone round.
    if (chat.send(JSON.stringify({ nick, text, from: clientId }))) input.value = '';
  });

  for (const el of document.querySelectorAll('.origin')) el.textContent = httpOrigin;

  // ---- Fan-out probe ------------------------------------------------------------------------
  const WINDOW = 1000; // latency samples kept for the percentiles
  const HISTORY = 60; // seconds on the charts
  const stats = {
    received: 0, // frames on either socket in the current second
    sent: 0, // probes sent in the current second
    latencies: [], // last WINDOW round trips, ms
    second: [], // round trips of the current second
    samples: 0, // round trips measured since the page opened
    peers: new Map(), // probe id -> last time seen
    history: { rate: [], p50: [], p99: [] },
  };
  let probeSeq = 0;
  let probeTimer = null;
  let probePaused = false;

  function onProbeFrame(data) {
    stats.received += 1;
    const now = performance.now();
    if (typeof data !== 'string') return;
    let m;
    try { m = JSON.parse(data); } catch { return; }
    if (!m || typeof m.probe !== 'string') return;
    stats.peers.set(m.probe, now);
    if (m.probe === clientId && typeof m.t === 'number') {
      const ms = now - m.t;
      stats.latencies.push(ms);
      if (stats.latencies.length > WINDOW) stats.latencies.shift();
      stats.second.push(ms);
      stats.samples += 1;
    }
  }

  function renderProbeState(link) {
    const el = $('probe-state');
    const running = link.state === 'connected' && !probePaused;
    el.dataset.state = running ? 'running' : link.state;
    el.textContent = running ? `probing ${link.topic}` : probePaused ? 'paused' : link.state;
  }

  const probe = new Link('probe', { message: onProbeFrame, state: renderProbeState });
  const probeTopicInput = $('probe-topic');
  probeTopicInput.value = `${topic}.probe`.slice(0, 128);

  function sendProbe() {
    if (probePaused || document.visibilityState !== 'visible') return;
    if (probe.send(JSON.stringify({ probe: clientId, seq: probeSeq, t: performance.now() }))) {
      probeSeq += 1;
      stats.sent += 1;
    }
  }

  function restartProbeTimer() {
    clearInterval(probeTimer);
    probeTimer = setInterval(sendProbe, 1000 / Number($('probe-rate').value));
  }

  function startProbe() {
    if (probe.state === 'idle') probe.open(probeTopicInput.value);
    restartProbeTimer();
  }

  $('probe-rate').addEventListener('change', restartProbeTimer);
  $('probe-toggle').addEventListener('click', () => {
    probePaused = !probePaused;
    $('probe-toggle').textContent = probePaused ? 'Resume' : 'Pause';
    renderProbeState(probe);
  });
  probeTopicInput.addEventListener('change', () => {
    const next = probeTopicInput.value.trim();
    if (!TOPIC_RE.test(next)) return;
    stats.latencies.length = 0;
    stats.peers.clear();
    probe.open(next);
  });

  function percentile(sorted, q) {
    if (!sorted.length) return NaN;
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
  }
  const fmt = (ms) => (Number.isFinite(ms) ? (ms < 10 ? ms.toFixed(2) : ms.toFixed(1)) : '–');

  let lastTick = performance.now();
  function tick() {
    const now = performance.now();
    const secs = Math.max(0.001, (now - lastTick) / 1000);
    lastTick = now;
    const rate = stats.received / secs;
    const sent = stats.sent / secs;
    stats.received = 0;
    stats.sent = 0;
    const sortedSecond = stats.second.sort((a, b) => a - b);
    stats.second = [];
    const h = stats.history;
    h.rate.push(rate);
    h.p50.push(percentile(sortedSecond, 0.5));
    h.p99.push(percentile(sortedSecond, 0.99));
    for (const series of Object.values(h)) if (series.length > HISTORY) series.shift();
    for (const [id, seen] of stats.peers) if (now - seen > 5000) stats.peers.delete(id);

    if ($('view-fanout').hidden) return;
    const sorted = [...stats.latencies].sort((a, b) => a - b);
    $('m-rate').textContent = rate.toFixed(0);
    $('m-sent').textContent = sent.toFixed(0);
    $('m-p50').textContent = fmt(percentile(sorted, 0.5));
    $('m-p99').textContent = fmt(percentile(sorted, 0.99));
    $('m-max').textContent = fmt(sorted[sorted.length - 1]);
    $('m-peers').textContent = String(stats.peers.size);
    drawChart($('c-rate'), [{ data: h.rate, color: 'chart-a' }]);
    drawChart($('c-lat'), [{ data: h.p50, color: 'chart-a' }, { data: h.p99, color: 'chart-b' }]);
  }
  setInterval(tick, 1000);

  // A small line chart: a few grid lines, the y scale's top value, one line per series.
  function drawChart(canvas, series) {
    const css = getComputedStyle(document.documentElement);
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const hgt = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
    if (canvas.height !== Math.round(hgt * dpr)) canvas.height = Math.round(hgt * dpr);
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, hgt);
    const values = series.flatMap((s) => s.data).filter(Number.isFinite);
    const top = niceCeil(Math.max(1e-9, ...values));
    const pad = { l: 44, r: 8, t: 8, b: 8 };
    const plotW = w - pad.l - pad.r;
    const plotH = hgt - pad.t - pad.b;
    ctx.strokeStyle = css.getPropertyValue('--line');
    ctx.fillStyle = css.getPropertyValue('--muted');
    ctx.font = '11px system-ui, sans-serif';
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = pad.t + (plotH * i) / 4;
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(w - pad.r, y);
      ctx.stroke();
      const label = top * (1 - i / 4);
      ctx.fillText(label === 0 || label >= 100 ? label.toFixed(0) : label.toPrecision(2), 4, y + 4);
    }
    for (const s of series) {
      ctx.strokeStyle = css.getPropertyValue(`--${s.color}`);
      ctx.lineWidth = 2;
      ctx.beginPath();
      let pen = false;
      s.data.forEach((v, i) => {
        if (!Number.isFinite(v)) { pen = false; return; }
        const x = pad.l + (plotW * (i + HISTORY - s.data.length)) / (HISTORY - 1);
        const y = pad.t + plotH * (1 - v / top);
        if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        pen = true;
      });
      ctx.stroke();
    }
  }

  function niceCeil(v) {
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 4, 8, 10]) if (m * p >= v) return m * p; // quarters stay round
    return 10 * p;
  }

  // ---- Tabs ---------------------------------------------------------------------------------
  function showTab(name) {
    for (const t of ['chat', 'fanout']) {
      $(`tab-${t}`).setAttribute('aria-selected', String(t === name));
      $(`view-${t}`).hidden = t !== name;
    }
    if (name === 'fanout') {
      startProbe();
      tick();
    } else {
      input.focus();
    }
    const url = new URL(location.href);
    url.hash = name === 'fanout' ? 'fanout' : '';
    history.replaceState(null, '', url);
  }
  $('tab-chat').addEventListener('click', () => showTab('chat'));
  $('tab-fanout').addEventListener('click', () => showTab('fanout'));

  window.shardcastDemo = { chat, probe, stats, clientId, host, showTab, setTopic };
  setTopic(topic);
  showTab(location.hash === '#fanout' ? 'fanout' : 'chat');
})();
