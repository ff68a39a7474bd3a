/* The reference relay for the shardcast comparison: a single-threaded epoll WebSocket relay
 * in plain C (libc and Linux headers only), the "speed limit" shardcast's engine is
 * measured against. Usage: refrelay PORT. Listens on 127.0.0.1 only.
 *
 *   GET  /ws/{topic}, /ws?topic=T, /?topic=T   WebSocket: subscribe (several topic= are all
 *                                               subscribed, receive-only); a text or binary
 *                                               message is broadcast to the topic, sender
 *                                               included
 *   POST /publish/{topic}                       the body (Content-Length, <= 64 KiB) is one
 *                                               message: text for text/... and application/json,
 *                                               else binary; 202
 *   GET  /healthz                               200 ok
 *
 * Design, and nothing else: one output buffer per connection; a broadcast copies the frame
 * into the buffer of every subscriber of the topic; after all ready events of a loop turn,
 * each connection with pending output gets ONE write(). EPOLLOUT is asked for only while a
 * buffer could not be written completely. A subscriber whose buffer would pass 1 MiB is
 * closed (no close frame). Client pings get pongs and a client close gets a close; the
 * server sends no pings and keeps no timers. Fragmented messages are refused with close
 * 1003, messages over 64 KiB with 1009; text is not checked for UTF-8.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_MESSAGE (64 * 1024)
#define MAX_PENDING (1024 * 1024)
#define MAX_HEAD 8192
#define MAX_TOPICS_PER_CONN 64
#define KEEP_CAP (64 * 1024) /* an emptied output buffer larger than this is freed */

struct topic;
struct sub { struct topic *t; int pos; }; /* pos: index of the connection in t->fds */

struct conn {
    int fd;
    unsigned ws : 1, dirty : 1, want_out : 1, closing : 1, dead : 1;
    char *out; size_t off, len, cap; /* pending output: out[off..len) */
    char *in; size_t in_len;          /* an incomplete request or frame */
    struct sub *subs; int nsubs;
};

struct topic {
    struct topic *next;
    uint32_t hash;
    int *fds, n, cap;
    size_t len;
    char name[];
};

struct ivec { int *v; size_t n, cap; };

static struct conn **conns; /* indexed by fd */
static size_t nconns;
static struct topic **buckets;
static size_t nbuckets = 1024, ntopics;
static struct ivec dirty, dead;
static int ep;
/* One read per readable connection per turn, of at most this much. It bounds what one turn
 * copies into the subscribers' buffers (each message once per subscriber): at rate max from
 * one publisher to 10,000 subscribers, 4 / 16 / 64 / 128 KiB gave 5.9M / 9.9M / 12.3M / 8M
 * deliveries/s (docs/benchmarks.md, "Topic rings"); 64 KiB is its best. */
static char rbuf[64 * 1024];

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) { perror("refrelay: realloc"); exit(1); }
    return p;
}

static void ivec_push(struct ivec *a, int x) {
    if (a->n == a->cap) a->v = xrealloc(a->v, (a->cap = a->cap ? a->cap * 2 : 256) * sizeof(int));
    a->v[a->n++] = x;
}

/* ---- SHA-1 and base64, for Sec-WebSocket-Accept ----------------------------------- */

#define ROL(x, n) (((x) << (n)) | ((x) >> (32 - (n))))

static void sha1_block(uint32_t h[5], const unsigned char *p) {
    uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f, k, t;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | p[4 * i + 1] << 16 | p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = ROL(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (int i = 0; i < 80; i++) {
        if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
        else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
        else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
        else f = b ^ c ^ d, k = 0xCA62C1D6;
        t = ROL(a, 5) + f + e + k + w[i];
        e = d, d = c, c = ROL(b, 30), b = a, a = t;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
}

static void sha1(const unsigned char *m, size_t n, unsigned char out[20]) {
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    unsigned char blk[64] = {0};
    size_t i = 0;
    for (; i + 64 <= n; i += 64) sha1_block(h, m + i);
    memcpy(blk, m + i, n - i);
    blk[n - i] = 0x80;
    if (n - i >= 56) { sha1_block(h, blk); memset(blk, 0, 64); }
    for (int j = 0; j < 8; j++) blk[63 - j] = (unsigned char)((uint64_t)n * 8 >> (8 * j));
    sha1_block(h, blk);
    for (int j = 0; j < 20; j++) out[j] = (unsigned char)(h[j / 4] >> (24 - 8 * (j % 4)));
}

static void base64(const unsigned char *in, size_t n, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        *out++ = t[v >> 18 & 63];
        *out++ = t[v >> 12 & 63];
        *out++ = i + 1 < n ? t[v >> 6 & 63] : '=';
        *out++ = i + 2 < n ? t[v & 63] : '=';
    }
    *out = 0;
}

/* ---- topics: a chained hash table of name -> array of subscriber fds ------------------ */

static uint32_t hash(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    while (n--) h = (h ^ (unsigned char)*s++) * 16777619u;
    return h;
}

static struct topic *topic_find(const char *name, size_t len, int create) {
    uint32_t h = hash(name, len);
    struct topic *t;
    for (t = buckets[h & (nbuckets - 1)]; t; t = t->next)
        if (t->hash == h && t->len == len && !memcmp(t->name, name, len)) return t;
    if (!create) return NULL;
    if (ntopics >= nbuckets) { /* grow: rehash every topic into twice the buckets */
        struct topic **nb = calloc(nbuckets * 2, sizeof *nb);
        if (!nb) { perror("refrelay: calloc"); exit(1); }
        for (size_t i = 0; i < nbuckets; i++)
            while ((t = buckets[i])) {
                buckets[i] = t->next;
                t->next = nb[t->hash & (nbuckets * 2 - 1)];
                nb[t->hash & (nbuckets * 2 - 1)] = t;
            }
        free(buckets);
        buckets = nb, nbuckets *= 2;
    }
    t = xrealloc(NULL, sizeof *t + len);
    memset(t, 0, sizeof *t);
    memcpy(t->name, name, len);
    t->len = len, t->hash = h;
    t->next = buckets[h & (nbuckets - 1)];
    buckets[h & (nbuckets - 1)] = t;
    ntopics++;
    return t;
}

static void subscribe(struct conn *c, struct topic *t) {
    if (t->n == t->cap) t->fds = xrealloc(t->fds, (t->cap = t->cap ? t->cap * 2 : 4) * sizeof(int));
    c->subs = xrealloc(c->subs, (c->nsubs + 1) * sizeof *c->subs);
    c->subs[c->nsubs++] = (struct sub){t, t->n};
    t->fds[t->n++] = c->fd;
}

/* Swap-removes the connection from the topic; frees the topic when it has no subscribers. */
static void unsubscribe(struct sub *s) {
    struct topic *t = s->t, **pp;
    int moved = t->fds[s->pos] = t->fds[--t->n];
    if (s->pos < t->n)
        for (int i = 0; i < conns[moved]->nsubs; i++)
            if (conns[moved]->subs[i].t == t) conns[moved]->subs[i].pos = s->pos;
    if (t->n) return;
    for (pp = &buckets[t->hash & (nbuckets - 1)]; *pp != t; pp = &(*pp)->next) {}
    *pp = t->next;
    ntopics--;
    free(t->fds);
    free(t);
}

static int valid_topic(const char *s, size_t n) {
    if (n < 1 || n > 128) return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '.' || ch == '_' || ch == ':' || ch == '-'))
            return 0;
    }
    return 1;
}

/* ---- output ---------------------------------------------------------------------------- */

static void kill_conn(struct conn *c) {
    if (c->dead) return;
    c->dead = 1;
    ivec_push(&dead, c->fd);
}

/* Appends a+b to the connection's buffer, or drops the connection if its pending output
 * would pass 1 MiB. The write happens at the end of the loop turn. */
static void out_append(struct conn *c, const void *a, size_t an, const void *b, size_t bn) {
    size_t pending = c->len - c->off, need = pending + an + bn;
    if (c->dead) return;
    if (need > MAX_PENDING) { kill_conn(c); return; }
    if (c->off && c->len + an + bn > c->cap) { /* compact */
        memmove(c->out, c->out + c->off, pending);
        c->off = 0, c->len = pending;
    }
    if (c->len + an + bn > c->cap) {
        size_t cap = c->cap ? c->cap : 512;
        while (cap < c->len + an + bn) cap *= 2;
        c->out = xrealloc(c->out, c->cap = cap);
    }
    if (an) memcpy(c->out + c->len, a, an);
    if (bn) memcpy(c->out + c->len + an, b, bn);
    c->len += an + bn;
    if (!c->dirty && !c->want_out) { c->dirty = 1; ivec_push(&dirty, c->fd); }
}

static size_t ws_header(unsigned char *h, int opcode, size_t n) {
    h[0] = (unsigned char)(0x80 | opcode);
    if (n < 126) { h[1] = (unsigned char)n; return 2; }
    if (n < 65536) { h[1] = 126, h[2] = (unsigned char)(n >> 8), h[3] = (unsigned char)n; return 4; }
    h[1] = 127;
    for (int i = 0; i < 8; i++) h[2 + i] = (unsigned char)((uint64_t)n >> (56 - 8 * i));
    return 10;
}

static void ws_send(struct conn *c, int opcode, const void *p, size_t n) {
    unsigned char h[10];
    out_append(c, h, ws_header(h, opcode, n), p, n);
}

/* One frame header, copied with the payload into every subscriber's buffer. */
static void broadcast(struct topic *t, int opcode, const char *p, size_t n) {
    unsigned char h[10];
    size_t hl = ws_header(h, opcode, n);
    for (int i = 0; i < t->n; i++) {
        struct conn *c = conns[t->fds[i]];
        if (!c->closing) out_append(c, h, hl, p, n);
    }
}

static void ws_close(struct conn *c, int code) {
    unsigned char p[2] = {(unsigned char)(code >> 8), (unsigned char)code};
    ws_send(c, 0x8, p, code ? 2 : 0);
    c->closing = 1;
}

static void http_reply(struct conn *c, int status, const char *reason, const char *body, int close) {
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n",
                     status, reason, strlen(body), close ? "Connection: close\r\n" : "");
    out_append(c, head, (size_t)n, body, strlen(body));
    if (close) c->closing = 1;
}

/* ---- HTTP ------------------------------------------------------------------------------ */

struct hdr { const char *p; size_t n; };

static int header_is(const char *name, size_t n, const char *want) {
    return n == strlen(want) && !strncasecmp(name, want, n);
}

static int has_word(const char *v, size_t n, const char *word) { /* case-insensitive */
    for (size_t w = strlen(word), i = 0; i + w <= n; i++)
        if (!strncasecmp(v + i, word, w)) return 1;
    return 0;
}

/* Fills topics from /ws/{topic}, /ws?topic=..., /?topic=...; returns the count (0: no
 * topic), -1 for a path that is not a WebSocket route. */
static int ws_topics(const char *path, size_t n, struct hdr *topics) {
    const char *q = memchr(path, '?', n), *end = path + n;
    size_t plen = q ? (size_t)(q - path) : n;
    int count = 0;
    if (plen >= 4 && !memcmp(path, "/ws/", 4)) {
        topics[0] = (struct hdr){path + 4, plen - 4};
        return 1;
    }
    if (!((plen == 1 && path[0] == '/') || (plen == 3 && !memcmp(path, "/ws", 3)))) return -1;
    for (const char *p = q; p && p < end; p = memchr(p, '&', (size_t)(end - p))) {
        const char *v = ++p, *amp = memchr(p, '&', (size_t)(end - p));
        size_t vn = (amp ? amp : end) - v;
        if (vn < 6 || memcmp(v, "topic=", 6)) continue;
        struct hdr t = {v + 6, vn - 6};
        int dup = 0;
        for (int i = 0; i < count; i++) dup |= topics[i].n == t.n && !memcmp(topics[i].p, t.p, t.n);
        if (dup) continue;
        if (count == MAX_TOPICS_PER_CONN) return MAX_TOPICS_PER_CONN + 1;
        topics[count++] = t;
    }
    return count;
}

static void upgrade(struct conn *c, struct hdr *topics, int ntop, struct hdr key) {
    static const char guid[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    unsigned char buf[128], digest[20];
    char accept[32], head[160];
    memcpy(buf, key.p, key.n);
    memcpy(buf + key.n, guid, sizeof guid - 1);
    sha1(buf, key.n + sizeof guid - 1, digest);
    base64(digest, 20, accept);
    int n = snprintf(head, sizeof head, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", accept);
    out_append(c, head, (size_t)n, NULL, 0);
    for (int i = 0; i < ntop; i++) subscribe(c, topic_find(topics[i].p, topics[i].n, 1));
    c->ws = 1;
}

/* Handles one request from d[0..n); returns the bytes used, 0 if it is incomplete. */
static size_t http_request(struct conn *c, char *d, size_t n) {
    char *eoh = memmem(d, n, "\r\n\r\n", 4);
    if (!eoh) {
        if (n > MAX_HEAD) http_reply(c, 431, "Request Header Fields Too Large", "headers too large\n", 1);
        return n > MAX_HEAD ? n : 0;
    }
    size_t head = (size_t)(eoh - d) + 4, clen = 0;
    char *line = memmem(d, head, "\r\n", 2), *sp1 = memchr(d, ' ', (size_t)(line - d)), *sp2;
    sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line - sp1 - 1)) : NULL;
    if (!sp2) { http_reply(c, 400, "Bad Request", "bad request line\n", 1); return n; }
    struct hdr method = {d, (size_t)(sp1 - d)}, path = {sp1 + 1, (size_t)(sp2 - sp1 - 1)};
    struct hdr key = {0}, ctype = {0};
    int close = line - sp2 - 1 == 8 && !memcmp(sp2 + 1, "HTTP/1.0", 8), upg = 0, chunked = 0;
    for (char *p = line + 2; p < eoh; p = line + 2) {
        line = memmem(p, (size_t)(eoh + 2 - p), "\r\n", 2);
        char *colon = memchr(p, ':', (size_t)(line - p)), *v = colon ? colon + 1 : line, *e = line;
        if (!colon) continue;
        while (v < e && (*v == ' ' || *v == '\t')) v++;
        while (e > v && (e[-1] == ' ' || e[-1] == '\t')) e--;
        size_t nn = (size_t)(colon - p), vn = (size_t)(e - v);
        if (header_is(p, nn, "content-length")) {
            if (!vn || vn > 9 || strspn(v, "0123456789") < vn) { http_reply(c, 400, "Bad Request", "bad content-length\n", 1); return n; }
            clen = strtoul(v, NULL, 10);
        } else if (header_is(p, nn, "transfer-encoding")) chunked = 1;
        else if (header_is(p, nn, "sec-websocket-key")) key = (struct hdr){v, vn};
        else if (header_is(p, nn, "content-type")) ctype = (struct hdr){v, vn};
        else if (header_is(p, nn, "upgrade")) upg = has_word(v, vn, "websocket");
        else if (header_is(p, nn, "connection")) {
            if (vn == 5 && !strncasecmp(v, "close", 5)) close = 1;
            if (vn == 10 && !strncasecmp(v, "keep-alive", 10)) close = 0;
        }
    }
    if (chunked) { http_reply(c, 501, "Not Implemented", "Content-Length bodies only\n", 1); return n; }
    if (clen > MAX_MESSAGE) { http_reply(c, 413, "Payload Too Large", "body over 64 KiB\n", 1); return n; }
    if (n < head + clen) return 0;
    char *body = d + head;
    int get = method.n == 3 && !memcmp(method.p, "GET", 3);
    struct hdr topics[MAX_TOPICS_PER_CONN + 1];
    int ntop;
    if (path.n > 9 && !memcmp(path.p, "/publish/", 9)) {
        struct hdr t = {path.p + 9, path.n - 9};
        if (!(method.n == 4 && !memcmp(method.p, "POST", 4))) http_reply(c, 405, "Method Not Allowed", "POST only\n", close);
        else if (!valid_topic(t.p, t.n)) http_reply(c, 400, "Bad Request", "bad topic\n", close);
        else {
            struct topic *tp = topic_find(t.p, t.n, 0);
            int text = (ctype.n >= 5 && !strncasecmp(ctype.p, "text/", 5)) ||
                       (ctype.n >= 16 && !strncasecmp(ctype.p, "application/json", 16) &&
                        (ctype.n == 16 || ctype.p[16] == ';' || ctype.p[16] == ' '));
            if (tp) broadcast(tp, text ? 0x1 : 0x2, body, clen);
            http_reply(c, 202, "Accepted", "", close);
        }
    } else if (path.n == 8 && !memcmp(path.p, "/healthz", 8)) {
        http_reply(c, get ? 200 : 405, get ? "OK" : "Method Not Allowed", get ? "ok" : "GET only\n", close);
    } else if ((ntop = ws_topics(path.p, path.n, topics)) < 0) {
        http_reply(c, 404, "Not Found", "not found\n", close);
    } else if (!get) {
        http_reply(c, 405, "Method Not Allowed", "GET only\n", close);
    } else {
        int ok = ntop >= 1 && ntop <= MAX_TOPICS_PER_CONN;
        for (int i = 0; ok && i < ntop; i++) ok = valid_topic(topics[i].p, topics[i].n);
        if (!ok) http_reply(c, 400, "Bad Request", "bad topic\n", 1);
        else if (!upg || !key.n || key.n > 64) http_reply(c, 426, "Upgrade Required", "websocket upgrade required\n", 1);
        else upgrade(c, topics, ntop, key);
    }
    return head + clen;
}

/* ---- WebSocket frames ------------------------------------------------------------------ */

/* Handles one client frame from d[0..n); returns the bytes used, 0 if it is incomplete. */
static size_t ws_frame(struct conn *c, char *d, size_t n) {
    unsigned char *u = (unsigned char *)d;
    if (n < 2) return 0;
    int fin = u[0] & 0x80, op = u[0] & 0x0f, len7 = u[1] & 0x7f;
    size_t hl = 2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + 4, plen = (size_t)len7;
    if ((u[0] & 0x70) || !(u[1] & 0x80)) { ws_close(c, 1002); return n; } /* rsv bits, unmasked */
    if ((op > 2 && op < 8) || op > 10 || (op >= 8 && (len7 > 125 || !fin))) { ws_close(c, 1002); return n; }
    if (op == 0 || !fin) { ws_close(c, 1003); return n; } /* no fragmented messages */
    if (n < hl) return 0;
    if (len7 == 126) plen = (size_t)u[2] << 8 | u[3];
    if (len7 == 127) {
        uint64_t v = 0;
        for (int i = 0; i < 8; i++) v = v << 8 | u[2 + i];
        plen = v > MAX_MESSAGE ? MAX_MESSAGE + 1 : (size_t)v;
    }
    if (plen > MAX_MESSAGE) { ws_close(c, 1009); return n; }
    if (n < hl + plen) return 0;
    unsigned char *mask = u + hl - 4, *p = u + hl;
    for (size_t i = 0; i < plen; i++) p[i] ^= mask[i & 3];
    if (op == 8) { /* echo the status code */
        ws_send(c, 0x8, p, plen >= 2 ? 2 : 0);
        c->closing = 1;
    } else if (op == 9) {
        ws_send(c, 0xA, p, plen);
    } else if (op != 10 && c->nsubs == 1) { /* several topics: receive-only */
        broadcast(c->subs[0].t, op, (char *)p, plen);
    }
    return hl + plen;
}

/* ---- the event loop -------------------------------------------------------------------- */

static void on_readable(struct conn *c) {
    ssize_t r = read(c->fd, rbuf, sizeof rbuf);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) { kill_conn(c); return; }
    if (r < 0 || c->closing) return; /* after a close, input is discarded */
    char *d = rbuf;
    size_t n = (size_t)r, used = 0, u;
    if (c->in_len) { /* finish an incomplete request or frame */
        c->in = xrealloc(c->in, c->in_len + n);
        memcpy(c->in + c->in_len, rbuf, n);
        d = c->in, n += c->in_len;
    }
    while (!c->dead && !c->closing && used < n &&
           (u = c->ws ? ws_frame(c, d + used, n - used) : http_request(c, d + used, n - used)))
        used += u;
    if (c->dead || c->closing) used = n;
    if (d == c->in) {
        memmove(c->in, c->in + used, n - used);
    } else if (n > used) {
        c->in = xrealloc(c->in, n - used);
        memcpy(c->in, d + used, n - used);
    }
    if (!(c->in_len = n - used)) { free(c->in); c->in = NULL; }
}

static void set_events(struct conn *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.fd = c->fd};
    c->want_out = (unsigned)out;
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* ONE write() per dirty connection per loop turn. */
static void flush_dirty(void) {
    for (size_t i = 0; i < dirty.n; i++) {
        struct conn *c = conns[dirty.v[i]];
        c->dirty = 0;
        if (c->dead) continue;
        ssize_t w = c->len > c->off ? write(c->fd, c->out + c->off, c->len - c->off) : 0;
        if (w < 0 && errno != EAGAIN && errno != EINTR) { kill_conn(c); continue; }
        if (w > 0) c->off += (size_t)w;
        if (c->off < c->len) {
            if (!c->want_out) set_events(c, 1);
            continue;
        }
        c->off = c->len = 0;
        if (c->cap > KEEP_CAP) { free(c->out); c->out = NULL; c->cap = 0; }
        if (c->closing) kill_conn(c);
        else if (c->want_out) set_events(c, 0);
    }
    dirty.n = 0;
}

static void close_dead(void) {
    for (size_t i = 0; i < dead.n; i++) {
        struct conn *c = conns[dead.v[i]];
        for (int j = 0; j < c->nsubs; j++) unsubscribe(&c->subs[j]);
        close(c->fd);
        conns[c->fd] = NULL;
        free(c->subs), free(c->out), free(c->in), free(c);
    }
    dead.n = 0;
}

static void accept_all(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC), one = 1;
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno != EAGAIN) perror("refrelay: accept4");
            return;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if ((size_t)fd >= nconns) {
            size_t n = nconns ? nconns : 1024;
            while (n <= (size_t)fd) n *= 2;
            conns = xrealloc(conns, n * sizeof *conns);
            memset(conns + nconns, 0, (n - nconns) * sizeof *conns);
            nconns = n;
        }
        struct conn *c = xrealloc(NULL, sizeof *c);
        memset(c, 0, sizeof *c);
        c->fd = fd;
        conns[fd] = c;
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
}

int main(int argc, char **argv) {
    char *end;
    long port = argc == 2 ? strtol(argv[1], &end, 10) : 0;
    if (argc != 2 || *end || port <= 0 || port > 65535) {
        fprintf(stderr, "usage: refrelay PORT\n");
        return 2;
    }
    struct rlimit rl;
    if (!getrlimit(RLIMIT_NOFILE, &rl)) { rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl); }
    signal(SIGPIPE, SIG_IGN);
    buckets = calloc(nbuckets, sizeof *buckets);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) || listen(lfd, 65535)) {
        perror("refrelay: bind/listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd}, evs[512];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("refrelay listening on ws://127.0.0.1:%ld\n", port);
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, 512, -1);
        if (n < 0 && errno != EINTR) { perror("refrelay: epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            if (evs[i].data.fd == lfd) { accept_all(lfd); continue; }
            struct conn *c = conns[evs[i].data.fd];
            if (!c || c->dead) continue;
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
            if ((evs[i].events & EPOLLOUT) && !c->dirty && !c->dead) { c->dirty = 1; ivec_push(&dirty, c->fd); }
        }
        flush_dirty();
        close_dead();
    }
}
