/*
 * http.c -- HTTP/1.x request framing and priority in the stack thread.
 *
 * The parser is llhttp (Node's, here Debian's node-llhttp sources built in),
 * not a hand-written one.  Why llhttp and not http-parser 2.9 (Debian's
 * libhttp-parser, its predecessor): llhttp is what Node answers request
 * smuggling reports with today; by default it refuses Content-Length with
 * Transfer-Encoding, a duplicate or signed Content-Length, a
 * Transfer-Encoding whose last coding is not chunked, chunk sizes with junk
 * or overflow, and bare CR; and its generated state machine parses about
 * twice as fast.  What it still lets through in its default (non-strict)
 * build is refused here, in the callbacks, without a second parser:
 *   - obs-fold (a header line starting with SP/HT): a value span that
 *     starts with SP/HT right after a LF (RFC 9112 5.2: 400);
 *   - an empty field name (":value"), and more than one SP around the
 *     request target;
 *   - whitespace between a field name and its colon (RFC 9112 5.1: 400);
 *   - a bare CR or LF anywhere in the head or the chunk framing (crlf_ok;
 *     llhttp 8.1.0 takes "\r" + any byte in places: CVE-2023-30589);
 *   - a major version other than 1 (505).
 *
 * Sans-IO, as frame.c: qs_http_scan looks at data[0..len) only and keeps
 * no state between calls, so the conn layer calls it again from the
 * request's first byte after each read (most requests come in one read).
 * A parser is initialised per call (a memset) and paused in
 * on_message_complete, so pipelined requests are framed one at a time and
 * the position where it paused is the request's end.
 *
 * Priority.  The rules see the method, the path and the headers while the
 * parser walks them; the first rule in order that matches gives the level
 * (header rules compare as each header completes, path and method rules
 * once the head is complete), so no second pass looks at the head.
 */
#include "qs_int.h"
#include <errno.h>
#include <string.h>
#include <stdlib.h>
#include "llhttp.h"

typedef struct scan {
    llhttp_t p;
    const uint8_t *data, *end;
    const qs_framer *f;
    const qs_http_rule *rules;
    int32_t nrules;
    int32_t best;                /* index of the first rule that matched, nrules if none */
    int32_t status;              /* QS_HTTP_ERR_* found by a callback, 0 */
    int32_t expect;              /* Expect: 100-continue seen */
    int32_t head_done, done;
    uint64_t head_len, body, clen;
    const uint8_t *chk;          /* framing bytes before this were checked (crlf_ok) */
    const char *url, *name, *value;
    size_t url_len, name_len, value_len;
} scan;

static int lower_eq(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
        if ((unsigned)(x - 'A') < 26u)
            x += 32;
        if ((unsigned)(y - 'A') < 26u)
            y += 32;
        if (x != y)
            return 0;
    }
    return 1;
}

/* Line endings of the framing: every CR followed by LF, every LF after a
 * CR (RFC 9112 2.2: a bare CR is an error).  llhttp 8.1 takes a CR
 * followed by anything at the end of the head and in chunk-size lines
 * (CVE-2023-30589, fixed in later llhttp; Debian's node-llhttp sources
 * are 8.1.0), and a bare LF ending the head: so the head and the chunk
 * framing (everything between body spans) are checked here.  A CR at the
 * very end of the input may still get its LF. */
static int crlf_ok(const scan *s, const uint8_t *a, const uint8_t *b)
{
    for (const uint8_t *q = a; q < b; q++) {
        if (*q == '\r') {
            if (q + 1 < s->end && q[1] != '\n')
                return 0;
        } else if (*q == '\n' && (q == s->data || q[-1] != '\r')) {
            return 0;
        }
    }
    return 1;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    scan *s = (scan *)p;
    const uint8_t *u = (const uint8_t *)at;
    /* one SP on each side of the target (llhttp takes "GET  /") */
    if (!s->url && ((u - 2 >= s->data && u[-2] == ' ') || (u + n + 1 < s->end && u[n + 1] == ' '))) {
        s->status = QS_HTTP_ERR_BAD;
        return -1;
    }
    if (!s->url)
        s->url = at;
    s->url_len = (size_t)(at + n - s->url);
    return 0;
}

/* RFC 9110 5.6.2 tchar */
static int tchar(unsigned char ch)
{
    if ((unsigned)((ch | 32) - 'a') < 26u || (unsigned)(ch - '0') < 10u)
        return 1;
    return ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    scan *s = (scan *)p;
    const uint8_t *after = (const uint8_t *)at + n;
    int bad = after < s->end && (*after != ':' ||  /* "Name :" (RFC 9112 5.1) */
                                 n == 0);          /* ":value" */
    for (size_t i = 0; i < n && !bad; i++)
        bad = !tchar((unsigned char)at[i]);        /* llhttp takes "Na me" */
    if (bad) {
        s->status = QS_HTTP_ERR_BAD;
        return -1;
    }
    if (s->name && s->value == NULL && s->name + s->name_len == at)
        s->name_len += n;                      /* (only at the end of the input) */
    else {
        s->name = at;
        s->name_len = n;
    }
    s->value = NULL;
    s->value_len = 0;
    return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    scan *s = (scan *)p;
    if ((n && (at[0] == ' ' || at[0] == '\t') && at[-1] == '\n') ||   /* obs-fold */
        (!s->name && !s->value)) {                                      /* ":value" */
        s->status = QS_HTTP_ERR_BAD;
        return -1;
    }
    if (!s->value)
        s->value = at;
    s->value_len = (size_t)(at + n - s->value);
    return 0;
}

static int on_header_value_complete(llhttp_t *p)
{
    scan *s = (scan *)p;
    const char *v = s->value ? s->value : "";
    size_t vn = s->value_len;
    while (vn && (v[vn - 1] == ' ' || v[vn - 1] == '\t'))
        vn--;
    if (s->name_len == 6 && vn == 12 && lower_eq(s->name, "expect", 6) &&
        lower_eq(v, "100-continue", 12))
        s->expect = 1;
    for (int32_t i = 0; i < s->best; i++) {
        const qs_http_rule *r = &s->rules[i];
        if (r->kind == QS_HTTP_RULE_HEADER && (size_t)r->name_len == s->name_len &&
            lower_eq(r->name, s->name, s->name_len) &&
            (r->value_len == 0 || ((size_t)r->value_len == vn && !memcmp(r->value, v, vn)))) {
            s->best = i;
            break;
        }
    }
    s->name = s->value = NULL;
    s->name_len = s->value_len = 0;
    return 0;
}

static int path_match(const qs_http_rule *r, const char *u, size_t n)
{
    size_t k = (size_t)r->value_len;
    if (n < k || memcmp(u, r->value, k))
        return 0;
    return n == k || r->value[k - 1] == '/' || u[k] == '/' || u[k] == '?';
}

static int on_headers_complete(llhttp_t *p)
{
    scan *s = (scan *)p;
    s->head_done = 1;
    if (p->http_major != 1) {
        s->status = QS_HTTP_ERR_VERSION;
        return -1;
    }
    s->clen = p->content_length;        /* llhttp counts it down as the body comes */
    if ((p->flags & F_CONTENT_LENGTH) && s->clen > s->f->max_message) {
        s->status = QS_HTTP_ERR_BODY;
        return -1;
    }
    const char *m = llhttp_method_name((llhttp_method_t)p->method);
    size_t mn = strlen(m);
    for (int32_t i = 0; i < s->best; i++) {
        const qs_http_rule *r = &s->rules[i];
        if ((r->kind == QS_HTTP_RULE_PATH && s->url && path_match(r, s->url, s->url_len)) ||
            (r->kind == QS_HTTP_RULE_METHOD && (size_t)r->value_len == mn &&
             !memcmp(r->value, m, mn))) {
            s->best = i;
            break;
        }
    }
    return HPE_PAUSED;      /* to learn where the head ends (resumed at once) */
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    scan *s = (scan *)p;
    if (!crlf_ok(s, s->chk, (const uint8_t *)at)) {     /* the chunk line before it */
        s->status = QS_HTTP_ERR_BAD;
        return -1;
    }
    s->chk = (const uint8_t *)at + n;
    s->body += n;
    if (s->body > s->f->max_message) {       /* chunked: no length up front */
        s->status = QS_HTTP_ERR_BODY;
        return -1;
    }
    return 0;
}

static int on_message_complete(llhttp_t *p)
{
    ((scan *)p)->done = 1;
    return HPE_PAUSED;
}

static const llhttp_settings_t settings = {
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

int qs_http_probe(void)
{
    return 0;
}

int64_t qs_http_scan(const qs_framer *f, const qs_http_rule *rules, int32_t nrules,
                     const uint8_t *data, uint64_t len, uint64_t *need,
                     int32_t *level, int32_t *expect, int32_t *status)
{
    *need = 0;
    *level = -1;
    *expect = 0;
    *status = 0;
    if (len == 0)
        return 0;
    /* The request line: its limit, and no bare LF (llhttp takes one there). */
    uint64_t look = len < (uint64_t)f->max_line + 1 ? len : (uint64_t)f->max_line + 1;
    const uint8_t *nl = memchr(data, '\n', look);
    if (!nl) {
        if (len > f->max_line) {
            *status = QS_HTTP_ERR_LINE;
            return -EMSGSIZE;
        }
    } else if (nl == data || nl[-1] != '\r') {
        *status = QS_HTTP_ERR_BAD;
        return -EPROTO;
    }
    scan s;
    memset(&s, 0, sizeof(s));
    llhttp_init(&s.p, HTTP_REQUEST, &settings);
    s.data = data;
    s.end = data + len;
    s.f = f;
    s.rules = rules;
    s.nrules = s.best = nrules;
    const char *at = (const char *)data, *end = (const char *)s.end;
    llhttp_errno_t e = llhttp_execute(&s.p, at, len);
    if (e == HPE_PAUSED && !s.done) {          /* paused after the head */
        const char *pos = llhttp_get_error_pos(&s.p);
        s.head_len = (uint64_t)(pos - at);
        if (s.head_len > (uint64_t)f->arg) {
            *status = QS_HTTP_ERR_HEAD;
            return -EMSGSIZE;
        }
        if (s.head_len < 4 || memcmp(pos - 4, "\r\n\r\n", 4) ||
            !crlf_ok(&s, data, (const uint8_t *)pos)) {
            *status = QS_HTTP_ERR_BAD;
            return -EPROTO;
        }
        s.chk = (const uint8_t *)pos;
        llhttp_resume(&s.p);
        e = llhttp_execute(&s.p, pos, (size_t)(end - pos));
    }
    if ((e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) && s.done) {
        const char *pos = llhttp_get_error_pos(&s.p);
        if (!crlf_ok(&s, s.chk, (const uint8_t *)pos)) {   /* the last chunk, trailers */
            *status = QS_HTTP_ERR_BAD;
            return -EPROTO;
        }
        *level = s.best < nrules ? rules[s.best].level : -1;
        return (int64_t)(pos - at);
    }
    if (e == HPE_OK) {                         /* more bytes needed */
        if (!crlf_ok(&s, s.chk ? s.chk : data, s.end)) {
            *status = QS_HTTP_ERR_BAD;
            return -EPROTO;
        }
        if (len >= qs_http_max_request(f)) {   /* chunk framing past the body's room */
            *status = QS_HTTP_ERR_BODY;
            return -EMSGSIZE;
        }
        if (!s.head_done) {
            if (len > (uint64_t)f->arg) {
                *status = nl ? QS_HTTP_ERR_HEAD : QS_HTTP_ERR_LINE;
                return -EMSGSIZE;
            }
            return 0;
        }
        if ((s.p.flags & F_CONTENT_LENGTH) && !(s.p.flags & F_CHUNKED))
            *need = s.head_len + s.clen;
        *expect = s.expect;
        *level = s.best < nrules ? rules[s.best].level : -1;   /* for a streamed body */
        return 0;
    }
    *status = s.status ? s.status : QS_HTTP_ERR_BAD;
    return *status == QS_HTTP_ERR_BAD ? -EPROTO : -EMSGSIZE;
}


/*
 * Streamed request bodies.  A request too large for one pool buffer is not
 * gathered into a jumbo buffer: once its head is complete (and validated by
 * qs_http_scan above) the head goes to the hub as the request's message,
 * and the body follows as QS_EV_BODY events, one per read, de-chunked here
 * in place.  The conn keeps a qs_http_body meanwhile: for Content-Length
 * the bytes still to come; for chunked an llhttp parser that lives across
 * reads (llhttp is a streaming parser: spans cut by a read's end are
 * delivered in pieces).  The chunk framing gets the same CR/LF check as in
 * qs_http_scan, carried across reads by the byte before each read.
 */
struct qs_http_body {
    llhttp_t p;                 /* first: the callbacks cast it back */
    const qs_framer *f;
    const uint8_t *data, *end, *chk;
    uint8_t *out;               /* where the next body byte goes (compaction) */
    uint64_t left;              /* Content-Length: body bytes still to come */
    uint64_t total;             /* body bytes so far (max_message) */
    uint64_t seq;               /* the request's seq (conn.c) */
    int32_t level;              /* its level (conn.c) */
    int32_t chunked, in_head, done, status;
    uint8_t prev;               /* last byte of the previous read if it was framing, else 0 */
};

static int body_crlf_ok(qs_http_body *h, const uint8_t *a, const uint8_t *b)
{
    for (const uint8_t *q = a; q < b; q++) {
        if (*q == '\r') {
            if (q + 1 < h->end && q[1] != '\n')
                return 0;
        } else if (*q == '\n') {
            uint8_t before = q > h->data ? q[-1] : h->prev;
            if (before != '\r' || (q > h->data && q - 1 < a))
                return 0;       /* the byte before is body, not framing */
        }
    }
    return 1;
}

static int body_headers_complete(llhttp_t *p)
{
    qs_http_body *h = (qs_http_body *)p;
    return h->in_head ? HPE_PAUSED : 0;
}

static int body_on_body(llhttp_t *p, const char *at, size_t n)
{
    qs_http_body *h = (qs_http_body *)p;
    const uint8_t *u = (const uint8_t *)at;
    if (!body_crlf_ok(h, h->chk, u)) {
        h->status = QS_HTTP_ERR_BAD;
        return -1;
    }
    h->total += n;
    if (h->total > h->f->max_message) {
        h->status = QS_HTTP_ERR_BODY;
        return -1;
    }
    memmove(h->out, u, n);      /* out <= u: the framing before it was checked */
    h->out += n;
    h->chk = u + n;
    return 0;
}

static int body_message_complete(llhttp_t *p)
{
    ((qs_http_body *)p)->done = 1;
    return HPE_PAUSED;
}

static const llhttp_settings_t body_settings = {
    .on_headers_complete = body_headers_complete,
    .on_body = body_on_body,
    .on_message_complete = body_message_complete,
};

qs_http_body *qs_http_body_new(void)
{
    return calloc(1, sizeof(qs_http_body));
}

void qs_http_body_free(qs_http_body *h)
{
    free(h);
}

uint64_t qs_http_body_seq(const qs_http_body *h)
{
    return h->seq;
}

int32_t qs_http_body_level(const qs_http_body *h)
{
    return h->level;
}

int64_t qs_http_body_start(qs_http_body *h, const qs_framer *f, const uint8_t *data,
                           uint64_t len, uint64_t seq, int32_t level)
{
    memset(h, 0, sizeof(*h));
    llhttp_init(&h->p, HTTP_REQUEST, &body_settings);
    h->f = f;
    h->in_head = 1;
    h->seq = seq;
    h->level = level;
    llhttp_errno_t e = llhttp_execute(&h->p, (const char *)data, len);
    if (e != HPE_PAUSED || h->done)
        return 0;               /* no complete head (or already a whole request) */
    const char *pos = llhttp_get_error_pos(&h->p);
    h->in_head = 0;
    h->chunked = !!(h->p.flags & F_CHUNKED);
    if (!h->chunked) {
        if (!(h->p.flags & F_CONTENT_LENGTH) || h->p.content_length == 0)
            return 0;           /* no body to stream */
        h->left = h->p.content_length;
    }
    llhttp_resume(&h->p);
    h->prev = '\n';             /* the head ended with CRLF */
    return (int64_t)(pos - (const char *)data);
}

int64_t qs_http_body_feed(qs_http_body *h, uint8_t *data, uint64_t len, uint64_t *body_len,
                          int32_t *done, int32_t *status)
{
    *body_len = 0;
    *done = 0;
    *status = 0;
    if (!h->chunked) {
        uint64_t n = len < h->left ? len : h->left;
        h->left -= n;
        h->total += n;
        *body_len = n;
        *done = h->left == 0;
        return (int64_t)n;
    }
    h->data = h->chk = data;
    h->end = data + len;
    h->out = data;
    if (h->prev == '\r' && len && data[0] != '\n') {
        *status = QS_HTTP_ERR_BAD;
        return -EPROTO;
    }
    llhttp_errno_t e = llhttp_execute(&h->p, (const char *)data, len);
    const uint8_t *stop = h->end;
    if (e == HPE_PAUSED && h->done)
        stop = (const uint8_t *)llhttp_get_error_pos(&h->p);
    else if (e != HPE_OK) {
        *status = h->status ? h->status : QS_HTTP_ERR_BAD;
        return *status == QS_HTTP_ERR_BODY ? -EMSGSIZE : -EPROTO;
    }
    if (!body_crlf_ok(h, h->chk, stop)) {
        *status = QS_HTTP_ERR_BAD;
        return -EPROTO;
    }
    h->prev = h->chk < stop ? stop[-1] : 0;     /* the read ended in framing, or in body */
    *body_len = (uint64_t)(h->out - data);
    *done = h->done;
    return (int64_t)(stop - data);
}
