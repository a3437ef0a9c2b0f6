/* cli_util.c: pure parsing, checking and formatting helpers of the keyraft CLI. */
#include "cli_util.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LIST_MAX_ITEMS 64
#define PRINCIPAL_NAME_MAX 64
#define MS_PER_DAY (86400ull * 1000ull)

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Decimal digits up to the first non-digit; KR_EINVAL on none or overflow. */
static int take_u64(const char **p, uint64_t *out)
{
    uint64_t v = 0;
    const char *s = *p;

    if (!is_digit(*s))
        return KR_EINVAL;
    for (; is_digit(*s); s++) {
        uint64_t d = (uint64_t)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return KR_EINVAL;
        v = v * 10 + d;
    }
    *p = s;
    *out = v;
    return 0;
}

static int mul_add(uint64_t *acc, uint64_t n, uint64_t unit)
{
    if (n != 0 && unit > UINT64_MAX / n)
        return KR_EINVAL;
    if (*acc > UINT64_MAX - n * unit)
        return KR_EINVAL;
    *acc += n * unit;
    return 0;
}

int cli_parse_duration_ms(const char *s, uint64_t *out_ms)
{
    const char *p = s;
    uint64_t total = 0, n;

    if (s == NULL || *s == '\0')
        return KR_EINVAL;
    if (take_u64(&p, &n) == 0 && *p == '\0') { /* bare seconds */
        if (mul_add(&total, n, 1000) != 0)
            return KR_EINVAL;
        *out_ms = total;
        return 0;
    }
    p = s;
    while (*p != '\0') {
        uint64_t unit;
        if (take_u64(&p, &n) != 0)
            return KR_EINVAL;
        if (p[0] == 'm' && p[1] == 's') {
            unit = 1;
            p += 2;
        } else if (*p == 's') {
            unit = 1000;
            p++;
        } else if (*p == 'm') {
            unit = 60 * 1000;
            p++;
        } else if (*p == 'h') {
            unit = 3600 * 1000;
            p++;
        } else if (*p == 'd') {
            unit = MS_PER_DAY;
            p++;
        } else {
            return KR_EINVAL;
        }
        if (mul_add(&total, n, unit) != 0)
            return KR_EINVAL;
    }
    *out_ms = total;
    return 0;
}

/* Exactly |n| digits at *p. */
static int take_fixed(const char **p, int n, int *out)
{
    int v = 0;

    for (int i = 0; i < n; i++) {
        if (!is_digit((*p)[i]))
            return KR_EINVAL;
        v = v * 10 + ((*p)[i] - '0');
    }
    *p += n;
    *out = v;
    return 0;
}

static int expect_char(const char **p, char c)
{
    if (**p != c)
        return KR_EINVAL;
    (*p)++;
    return 0;
}

static int days_in_month(int y, int m)
{
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;

    return m == 2 && leap ? 29 : days[m - 1];
}

/* Days from 1970-01-01 to y-m-d (proleptic Gregorian; Howard Hinnant's
 * days_from_civil), without the process's time zone. */
static int64_t days_from_civil(int y, int m, int d)
{
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const int64_t yoe = y - era * 400;
    const int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int parse_rfc3339(const char *s, uint64_t *out_ms)
{
    const char *p = s;
    int y, mo, d, h = 0, mi = 0, sec = 0, ms = 0, off = 0;

    if (take_fixed(&p, 4, &y) || expect_char(&p, '-') || take_fixed(&p, 2, &mo) ||
        expect_char(&p, '-') || take_fixed(&p, 2, &d))
        return KR_EINVAL;
    if (mo < 1 || mo > 12 || d < 1 || d > days_in_month(y, mo))
        return KR_EINVAL;
    if (*p != '\0') { /* a date alone is its midnight UTC */
        if (*p != 'T' && *p != 't' && *p != ' ')
            return KR_EINVAL;
        p++;
        if (take_fixed(&p, 2, &h) || expect_char(&p, ':') || take_fixed(&p, 2, &mi) ||
            expect_char(&p, ':') || take_fixed(&p, 2, &sec))
            return KR_EINVAL;
        if (h > 23 || mi > 59 || sec > 60) /* 60: a leap second */
            return KR_EINVAL;
        if (*p == '.') {
            int digits = 0;
            for (p++; is_digit(*p); p++, digits++)
                if (digits < 3)
                    ms = ms * 10 + (*p - '0');
            if (digits == 0)
                return KR_EINVAL;
            for (; digits < 3; digits++)
                ms *= 10;
        }
        if (*p == 'Z' || *p == 'z') {
            p++;
        } else if (*p == '+' || *p == '-') {
            int sign = *p == '-' ? -1 : 1, oh, om;
            p++;
            if (take_fixed(&p, 2, &oh) || expect_char(&p, ':') || take_fixed(&p, 2, &om) ||
                oh > 23 || om > 59)
                return KR_EINVAL;
            off = sign * (oh * 3600 + om * 60);
        } else {
            return KR_EINVAL; /* RFC 3339 requires the offset */
        }
        if (*p != '\0')
            return KR_EINVAL;
    }
    int64_t secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - off;
    if (secs < 0)
        return KR_EINVAL;
    *out_ms = (uint64_t)secs * 1000 + (uint64_t)ms;
    return 0;
}

int cli_parse_time_ms(const char *s, uint64_t now_ms, uint64_t *out_ms)
{
    uint64_t v;
    const char *p = s;

    if (s == NULL || *s == '\0')
        return KR_EINVAL;
    if (strcmp(s, "now") == 0) {
        *out_ms = now_ms;
        return 0;
    }
    if (s[0] == '-' || s[0] == '+') {
        if (cli_parse_duration_ms(s + 1, &v) != 0)
            return KR_EINVAL;
        if (s[0] == '-') {
            if (v > now_ms)
                return KR_EINVAL;
            *out_ms = now_ms - v;
        } else {
            if (v > UINT64_MAX - now_ms)
                return KR_EINVAL;
            *out_ms = now_ms + v;
        }
        return 0;
    }
    if (take_u64(&p, &v) == 0 && *p == '\0') {
        *out_ms = v;
        return 0;
    }
    return parse_rfc3339(s, out_ms);
}

int cli_parse_count(const char *s, uint64_t *out)
{
    const char *p = s;
    uint64_t v;

    if (s == NULL)
        return KR_EINVAL;
    if (s[0] == '2' && s[1] == '^') {
        p = s + 2;
        if (take_u64(&p, &v) != 0 || *p != '\0' || v > 63)
            return KR_EINVAL;
        *out = (uint64_t)1 << v;
        return 0;
    }
    if (take_u64(&p, &v) != 0 || *p != '\0')
        return KR_EINVAL;
    *out = v;
    return 0;
}

void cli_list_free(char **items, size_t n)
{
    if (items == NULL)
        return;
    for (size_t i = 0; i < n; i++)
        free(items[i]);
    free(items);
}

int cli_split_list(const char *s, char ***out_items, size_t *out_n)
{
    char **items = NULL;
    size_t n = 0;
    const char *p = s;

    if (s == NULL || *s == '\0')
        return KR_EINVAL;
    items = calloc(LIST_MAX_ITEMS, sizeof(*items));
    if (items == NULL)
        return KR_ENOMEM;
    for (;;) {
        const char *end = strchr(p, ',');
        size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        if (len == 0 || n == LIST_MAX_ITEMS)
            goto bad;
        for (size_t i = 0; i < len; i++)
            if ((unsigned char)p[i] <= ' ' || p[i] == 0x7f)
                goto bad;
        items[n] = strndup(p, len);
        if (items[n] == NULL) {
            cli_list_free(items, n);
            return KR_ENOMEM;
        }
        n++;
        if (end == NULL)
            break;
        p = end + 1;
    }
    *out_items = items;
    *out_n = n;
    return 0;
bad:
    cli_list_free(items, n);
    return KR_EINVAL;
}

static void set_err(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t err_len, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || err_len == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

void cli_grant_clear(Keyraft__GroupGrant *g)
{
    if (g->group != NULL && g->group != protobuf_c_empty_string)
        free(g->group);
    cli_list_free(g->ops, g->n_ops);
    keyraft__group_grant__init(g);
}

static int valid_op_name(const char *op)
{
    for (const char *c = op; *c != '\0'; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || is_digit(*c) ||
              *c == '_' || *c == '-' || *c == '*'))
            return 0;
    return 1;
}

int cli_parse_grant(const char *s, Keyraft__GroupGrant *g, char *err, size_t err_len)
{
    const char *colon = s != NULL ? strchr(s, ':') : NULL;
    char **ops = NULL;
    size_t n_ops = 0;
    int rc;

    keyraft__group_grant__init(g);
    if (colon == NULL || colon == s) {
        set_err(err, err_len, "want GROUP:OP[,OP...]");
        return KR_EINVAL;
    }
    for (const char *c = s; c < colon; c++) {
        if ((unsigned char)*c <= ' ' || *c == ',' || *c == 0x7f) {
            set_err(err, err_len, "the group name holds a space, comma or control character");
            return KR_EINVAL;
        }
    }
    rc = cli_split_list(colon + 1, &ops, &n_ops);
    if (rc != 0) {
        set_err(err, err_len, rc == KR_ENOMEM ? "out of memory"
                                              : "want one or more operations after the colon, "
                                                "comma-separated, without spaces");
        return rc;
    }
    for (size_t i = 0; i < n_ops; i++) {
        if (!valid_op_name(ops[i])) {
            set_err(err, err_len, "\"%s\" is not an operation name", ops[i]);
            cli_list_free(ops, n_ops);
            return KR_EINVAL;
        }
    }
    g->group = strndup(s, (size_t)(colon - s));
    if (g->group == NULL) {
        cli_list_free(ops, n_ops);
        keyraft__group_grant__init(g);
        set_err(err, err_len, "out of memory");
        return KR_ENOMEM;
    }
    g->ops = ops;
    g->n_ops = n_ops;
    return 0;
}

int cli_valid_principal(const char *name)
{
    size_t len = name != NULL ? strlen(name) : 0;

    if (len == 0 || len > PRINCIPAL_NAME_MAX || name[0] == '.' || name[0] == '-')
        return 0;
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || is_digit(c) || c == '.' ||
              c == '_' || c == '@' || c == '-'))
            return 0;
    }
    return 1;
}

int cli_check_roles(char *const *roles, size_t n, char *err, size_t err_len)
{
    static const char *const known[] = {"admin", "officer", "user", "auditor"};
    int admin = 0;

    if (n == 0) {
        set_err(err, err_len, "at least one role is needed");
        return KR_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        int ok = 0;
        for (size_t k = 0; k < sizeof(known) / sizeof(known[0]); k++)
            ok |= strcmp(roles[i], known[k]) == 0;
        if (!ok) {
            set_err(err, err_len, "unknown role \"%s\" (admin, officer, user, auditor)",
                    roles[i]);
            return KR_EINVAL;
        }
        for (size_t j = 0; j < i; j++) {
            if (strcmp(roles[i], roles[j]) == 0) {
                set_err(err, err_len, "role \"%s\" is given twice", roles[i]);
                return KR_EINVAL;
            }
        }
        admin |= strcmp(roles[i], "admin") == 0;
    }
    if (admin && n > 1) {
        set_err(err, err_len, "admin may not be combined with another role");
        return KR_EINVAL;
    }
    return 0;
}

const char cli_quorum_ops[] =
    "export, destroy, domain_destroy, policy_change, node_admission, principal_admin";

int cli_valid_quorum_op(const char *op)
{
    static const char *const ops[] = {"export",        "destroy",        "domain_destroy",
                                      "policy_change", "node_admission", "principal_admin"};

    for (size_t i = 0; op != NULL && i < sizeof(ops) / sizeof(ops[0]); i++)
        if (strcmp(op, ops[i]) == 0)
            return 1;
    return 0;
}

void cli_format_time(uint64_t ms, char *buf, size_t len)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    char base[32];

    if (ms / 1000 > (uint64_t)253402300799 /* 9999-12-31T23:59:59Z */ ||
        gmtime_r(&t, &tm) == NULL || strftime(base, sizeof(base), "%Y-%m-%dT%H:%M:%S", &tm) == 0) {
        snprintf(buf, len, "%llu", (unsigned long long)ms);
        return;
    }
    snprintf(buf, len, "%s.%03uZ", base, (unsigned)(ms % 1000));
}

void cli_format_duration(uint64_t ms, char *buf, size_t len)
{
    static const struct {
        uint64_t ms;
        char unit;
    } units[] = {{MS_PER_DAY, 'd'}, {3600000, 'h'}, {60000, 'm'}, {1000, 's'}};
    size_t pos = 0;
    int shown = 0;

    if (len == 0)
        return;
    buf[0] = '\0';
    for (size_t i = 0; i < sizeof(units) / sizeof(units[0]) && shown < 2; i++) {
        uint64_t n = ms / units[i].ms;
        if (n == 0 && shown == 0)
            continue;
        if (n != 0 && pos < len) {
            int w = snprintf(buf + pos, len - pos, "%llu%c", (unsigned long long)n, units[i].unit);
            if (w > 0)
                pos += (size_t)w;
        }
        ms -= n * units[i].ms;
        shown++;
    }
    if (shown == 0)
        snprintf(buf, len, "0s");
}

char *cli_hex(const uint8_t *data, size_t len)
{
    static const char digits[] = "0123456789abcdef";
    char *out;

    if (len > (SIZE_MAX - 1) / 2)
        return NULL;
    out = malloc(2 * len + 1);
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < len; i++) {
        out[2 * i] = digits[data[i] >> 4];
        out[2 * i + 1] = digits[data[i] & 0xf];
    }
    out[2 * len] = '\0';
    return out;
}

const char *cli_approval_state_name(Keyraft__ApprovalState state)
{
    switch (state) {
    case KEYRAFT__APPROVAL_STATE__APPROVAL_PENDING:
        return "pending";
    case KEYRAFT__APPROVAL_STATE__APPROVAL_APPROVED:
        return "approved";
    case KEYRAFT__APPROVAL_STATE__APPROVAL_DONE:
        return "done";
    case KEYRAFT__APPROVAL_STATE__APPROVAL_DENIED:
        return "denied";
    case KEYRAFT__APPROVAL_STATE__APPROVAL_EXPIRED:
        return "expired";
    default:
        return "unspecified";
    }
}

/* ---- audit output ------------------------------------------------------------------- */

static json_t *json_u64(uint64_t v)
{
    if (v > (uint64_t)INT64_MAX) { /* beyond json_int_t: keep it exact */
        char buf[24];
        snprintf(buf, sizeof(buf), "%llu", (unsigned long long)v);
        return json_string(buf);
    }
    return json_integer((json_int_t)v);
}

/* Sets |key| to a new value; a NULL value (out of memory) fails. */
static int put(json_t *obj, const char *key, json_t *v)
{
    return v != NULL && json_object_set_new(obj, key, v) == 0 ? 0 : -1;
}

static int put_hex(json_t *obj, const char *key, const ProtobufCBinaryData *bd)
{
    char *hex = cli_hex(bd->data, bd->len);
    int rc = hex != NULL ? put(obj, key, json_string(hex)) : -1;

    free(hex);
    return rc;
}

/* A string as JSON; json_string refuses invalid UTF-8, so such a string is
 * given as "hex:..." rather than lost. NULL only when out of memory. */
static json_t *json_str(const char *s)
{
    json_t *v = json_string(s != NULL ? s : "");

    if (v == NULL && s != NULL) {
        char *hex = cli_hex((const uint8_t *)s, strlen(s));
        char *tagged = NULL;
        if (hex != NULL && asprintf(&tagged, "hex:%s", hex) >= 0)
            v = json_string(tagged);
        free(hex);
        free(tagged);
    }
    return v;
}

static int put_str(json_t *obj, const char *key, const char *s)
{
    return put(obj, key, json_str(s));
}

static json_t *record_json(json_t *o, const Keyraft__AuditRecord *r)
{
    char when[48];
    json_t *ids = json_array();

    cli_format_time(r->time_ms, when, sizeof(when));
    if (ids == NULL)
        return NULL;
    for (size_t i = 0; i < r->n_approval_ids; i++) {
        json_t *id = json_str(r->approval_ids[i]);
        if (id == NULL || json_array_append_new(ids, id) != 0) {
            json_decref(ids);
            return NULL;
        }
    }
    if (put(o, "time", json_string(when)) || put(o, "node", json_u64(r->node_id)) ||
        put_str(o, "principal", r->principal) || put_str(o, "operation", r->operation) ||
        put_str(o, "key_id", r->key_id) || put(o, "version", json_integer(r->key_version)) ||
        put(o, "status", json_string(kr_status_name(r->status))) ||
        put_str(o, "message", r->message) || put_str(o, "client", r->client_address) ||
        put(o, "approval_ids", ids) || put_str(o, "domain", r->domain) ||
        put_str(o, "request_id", r->request_id) ||
        put(o, "count", json_integer(r->count > 1 ? r->count : 1)))
        return NULL;
    if (r->checkpoint != NULL) {
        json_t *c = json_object();
        if (put(o, "checkpoint", c) || put(c, "seq", json_u64(r->checkpoint->seq)) ||
            put_hex(c, "hash", &r->checkpoint->hash) ||
            put(c, "node", json_u64(r->checkpoint->node_id)) ||
            put_hex(c, "signature", &r->checkpoint->signature))
            return NULL;
    }
    return o;
}

json_t *cli_audit_entry_json(const Keyraft__AuditEntry *e)
{
    json_t *o = json_object();
    Keyraft__AuditRecord *r = NULL;

    if (o == NULL)
        return NULL;
    if (put(o, "seq", json_u64(e->seq)) || put_hex(o, "hash", &e->hash) ||
        put_hex(o, "prev_hash", &e->prev_hash))
        goto fail;
    r = keyraft__audit_record__unpack(NULL, e->record.len, e->record.data);
    if (r == NULL) {
        if (put_hex(o, "raw", &e->record))
            goto fail;
        return o;
    }
    if (record_json(o, r) == NULL)
        goto fail;
    keyraft__audit_record__free_unpacked(r, NULL);
    return o;
fail:
    if (r != NULL)
        keyraft__audit_record__free_unpacked(r, NULL);
    json_decref(o);
    return NULL;
}

struct line {
    char *buf;
    size_t len, pos;
};

static void line_add(struct line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void line_add(struct line *l, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (l->pos >= l->len)
        return;
    va_start(ap, fmt);
    n = vsnprintf(l->buf + l->pos, l->len - l->pos, fmt, ap);
    va_end(ap);
    if (n > 0)
        l->pos += (size_t)n < l->len - l->pos ? (size_t)n : l->len - l->pos - 1;
}

/* A field for a one-line, space-separated format: "-" when empty, control
 * characters and spaces made visible so the line stays one line. */
static void line_word(struct line *l, const char *s)
{
    if (s == NULL || *s == '\0') {
        line_add(l, " -");
        return;
    }
    line_add(l, " ");
    for (; *s != '\0'; s++)
        line_add(l, "%c", (unsigned char)*s <= ' ' || *s == 0x7f ? '_' : *s);
}

void cli_audit_entry_line(const Keyraft__AuditEntry *e, char *buf, size_t len)
{
    struct line l = {buf, len, 0};
    Keyraft__AuditRecord *r;
    char when[48];

    if (len == 0)
        return;
    buf[0] = '\0';
    line_add(&l, "%llu", (unsigned long long)e->seq);
    r = keyraft__audit_record__unpack(NULL, e->record.len, e->record.data);
    if (r == NULL) {
        line_add(&l, " (undecodable record of %zu bytes)", e->record.len);
        return;
    }
    cli_format_time(r->time_ms, when, sizeof(when));
    line_add(&l, " %s %llu", when, (unsigned long long)r->node_id);
    line_word(&l, r->principal);
    line_word(&l, r->operation);
    if (r->key_id[0] != '\0' && r->key_version != 0) {
        line_word(&l, r->key_id);
        line_add(&l, ":%u", r->key_version);
    } else {
        line_word(&l, r->key_id);
    }
    line_add(&l, " %s", kr_status_name(r->status));
    if (r->message[0] != '\0') {
        line_add(&l, " \"");
        for (const char *s = r->message; *s != '\0'; s++)
            line_add(&l, "%c", (unsigned char)*s < ' ' || *s == 0x7f ? ' ' : *s);
        line_add(&l, "\"");
    }
    for (size_t i = 0; i < r->n_approval_ids; i++)
        line_add(&l, "%s%s", i == 0 ? " approvals=" : ",", r->approval_ids[i]);
    if (r->count > 1)
        line_add(&l, " x%u", r->count);
    keyraft__audit_record__free_unpacked(r, NULL);
}

int cli_print_pending(FILE *out, FILE *err, int json, const char *approval_id,
                      const char *message, const char *hint)
{
    const char *id = approval_id != NULL && approval_id[0] != '\0' ? approval_id : "?";
    const char *msg = message != NULL && message[0] != '\0' ? message
                                                            : kr_strerror(KR_EPENDING);

    fprintf(err, "held for approval %s: %s\n", id, msg);
    if (hint != NULL)
        fprintf(err, "%s\n", hint);
    if (json) {
        json_t *j = json_pack("{s:b,s:s,s:s}", "pending", 1, "approval_id", id, "message", msg);
        if (j != NULL) {
            json_dumpf(j, out, JSON_INDENT(2));
            fputc('\n', out);
            json_decref(j);
        }
    }
    return CLI_EXIT_PENDING;
}
