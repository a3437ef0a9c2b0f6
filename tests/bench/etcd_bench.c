/* etcd_bench.c: the etcd baseline for kr_bench: puts or gets through etcd's
 * v3 JSON gateway (POST /v3/kv/put, /v3/kv/range, base64 keys and values)
 * with libcurl's multi interface: C keep-alive HTTP/1.1 connections, each
 * with one request in flight (HTTP/1.1 allows no more), driven by T threads;
 * bounded by count and by time.
 *   etcd_bench --endpoint http://HOST:PORT[,...] --op put|get [--serializable]
 *              [--conns C] [--threads T] [--seconds S] [--max-ops N]
 *              [--size BYTES] [--keys K]
 * put writes a new key each time (as a keyraft create makes a new key); get
 * reads one of K keys written before the timed phase (linearizable, as etcd
 * ships, unless --serializable). Prints the kr_bench key=value line. */
#include <getopt.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>

#define MAX_CONNS 4096
#define MAX_THREADS 64
#define MAX_ENDPOINTS 16
#define MAX_SIZE 65536
#define MAX_KEYS 1000000
#define BODY_CAP (2 * MAX_SIZE + 512) /* base64 of key and value, and JSON */
#define REPLY_CAP 4096                /* kept of a reply: enough to check it */

enum op { OP_PUT, OP_GET };

struct shared {
    char *endpoints[MAX_ENDPOINTS];
    int n_endpoints;
    enum op op;
    int serializable, n_keys;
    size_t size;
    double seconds, end;
    long max_ops, run_tag;
    char value_b64[(MAX_SIZE + 2) / 3 * 4 + 1];
    atomic_long issued;
    pthread_mutex_t lock; /* guards first_message */
    char first_message[256];
};

struct conn {
    CURL *easy;
    struct curl_slist *headers;
    char url[256];
    char body[BODY_CAP];
    char reply[REPLY_CAP];
    size_t reply_len;
    double t0;
    long seq;
};

struct worker {
    struct shared *sh;
    int index, n_conns, first_conn;
    struct conn *conns;
    double *lat_ms;
    long n, cap, errors;
    double max_gap_ms;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static size_t b64(const uint8_t *in, size_t len, char *out)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < len)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < len)
            v |= in[i + 2];
        out[o++] = tbl[v >> 18 & 63];
        out[o++] = tbl[v >> 12 & 63];
        out[o++] = i + 1 < len ? tbl[v >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? tbl[v & 63] : '=';
    }
    out[o] = '\0';
    return o;
}

static void note_error(struct worker *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note_error(struct worker *w, const char *fmt, ...)
{
    va_list ap;
    w->errors++;
    pthread_mutex_lock(&w->sh->lock);
    if (w->sh->first_message[0] == '\0') {
        va_start(ap, fmt);
        vsnprintf(w->sh->first_message, sizeof(w->sh->first_message), fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&w->sh->lock);
}

static size_t on_reply(char *data, size_t size, size_t nmemb, void *arg)
{
    struct conn *c = arg;
    size_t n = size * nmemb, room = REPLY_CAP - 1 - c->reply_len;
    memcpy(c->reply + c->reply_len, data, n < room ? n : room);
    c->reply_len += n < room ? n : room;
    c->reply[c->reply_len] = '\0';
    return n;
}

/* The JSON body of the next request on |c|: a new key for put, one of the
 * prepared keys for get. */
static void build_body(struct shared *sh, int conn_index, struct conn *c)
{
    char key[96], key_b64[132];
    int len;
    if (sh->op == OP_PUT)
        len = snprintf(key, sizeof(key), "bench/%lx/%d/%ld", sh->run_tag, conn_index, c->seq);
    else
        len = snprintf(key, sizeof(key), "bench/%lx/get/%ld", sh->run_tag,
                       (conn_index + c->seq) % sh->n_keys);
    c->seq++;
    b64((const uint8_t *)key, (size_t)len, key_b64);
    if (sh->op == OP_PUT)
        snprintf(c->body, sizeof(c->body), "{\"key\":\"%s\",\"value\":\"%s\"}", key_b64,
                 sh->value_b64);
    else
        snprintf(c->body, sizeof(c->body), "{\"key\":\"%s\"%s}", key_b64,
                 sh->serializable ? ",\"serializable\":true" : "");
}

static int conn_init(struct shared *sh, struct conn *c, int index, int put)
{
    c->easy = curl_easy_init();
    c->headers = curl_slist_append(NULL, "Content-Type: application/json");
    if (c->headers != NULL)
        c->headers = curl_slist_append(c->headers, "Expect:"); /* no 100-continue round trip */
    if (c->easy == NULL || c->headers == NULL)
        return -1;
    snprintf(c->url, sizeof(c->url), "%s/v3/kv/%s", sh->endpoints[index % sh->n_endpoints],
             put ? "put" : "range");
    curl_easy_setopt(c->easy, CURLOPT_URL, c->url);
    curl_easy_setopt(c->easy, CURLOPT_HTTPHEADER, c->headers);
    curl_easy_setopt(c->easy, CURLOPT_POSTFIELDS, c->body); /* borrowed, not copied */
    curl_easy_setopt(c->easy, CURLOPT_WRITEFUNCTION, on_reply);
    curl_easy_setopt(c->easy, CURLOPT_WRITEDATA, c);
    curl_easy_setopt(c->easy, CURLOPT_PRIVATE, c);
    curl_easy_setopt(c->easy, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(c->easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c->easy, CURLOPT_TIMEOUT_MS, 30000L);
    curl_easy_setopt(c->easy, CURLOPT_HTTP_VERSION, (long)CURL_HTTP_VERSION_1_1);
    return 0;
}

static void conn_cleanup(struct conn *c)
{
    if (c->easy != NULL)
        curl_easy_cleanup(c->easy);
    curl_slist_free_all(c->headers);
}

static int take_op(struct shared *sh)
{
    return atomic_fetch_add(&sh->issued, 1) < sh->max_ops;
}

static void start(struct worker *w, CURLM *multi, struct conn *c, int conn_index)
{
    build_body(w->sh, conn_index, c);
    curl_easy_setopt(c->easy, CURLOPT_POSTFIELDSIZE, (long)strlen(c->body));
    c->reply_len = 0;
    c->reply[0] = '\0';
    c->t0 = now_s();
    curl_multi_add_handle(multi, c->easy);
}

/* Checks a finished request; 1 when etcd did what was asked. */
static int finished_ok(struct worker *w, struct conn *c, CURLcode result)
{
    long code = 0;
    if (result != CURLE_OK) {
        note_error(w, "curl: %s", curl_easy_strerror(result));
        return 0;
    }
    curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &code);
    if (code != 200 || strstr(c->reply, "\"error\"") != NULL) {
        note_error(w, "HTTP %ld: %.200s", code, c->reply);
        return 0;
    }
    if (w->sh->op == OP_GET && strstr(c->reply, "\"kvs\"") == NULL) {
        note_error(w, "HTTP %ld: a prepared key is missing: %.200s", code, c->reply);
        return 0;
    }
    return 1;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    struct shared *sh = w->sh;
    CURLM *multi = curl_multi_init();
    int running = 0;
    double last_ok = now_s();

    if (multi == NULL) {
        note_error(w, "curl: cannot make a multi handle");
        return NULL;
    }
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long)w->n_conns);
    for (int i = 0; i < w->n_conns; i++) {
        if (now_s() < sh->end && take_op(sh)) {
            start(w, multi, &w->conns[i], w->first_conn + i);
            running++;
        }
    }
    while (running > 0) {
        int still = 0, msgs = 0;
        curl_multi_perform(multi, &still);
        CURLMsg *m;
        while ((m = curl_multi_info_read(multi, &msgs)) != NULL) {
            if (m->msg != CURLMSG_DONE)
                continue;
            struct conn *c = NULL;
            CURL *easy = m->easy_handle;
            CURLcode result = m->data.result;
            double t1 = now_s();
            curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&c);
            curl_multi_remove_handle(multi, easy);
            running--;
            if (finished_ok(w, c, result)) {
                if ((t1 - last_ok) * 1000.0 > w->max_gap_ms)
                    w->max_gap_ms = (t1 - last_ok) * 1000.0;
                last_ok = t1;
                if (w->n == w->cap) {
                    w->cap = w->cap ? w->cap * 2 : 4096;
                    w->lat_ms = realloc(w->lat_ms, (size_t)w->cap * sizeof(double));
                    if (w->lat_ms == NULL)
                        abort();
                }
                w->lat_ms[w->n++] = (t1 - c->t0) * 1000.0;
            }
            if (t1 < sh->end && take_op(sh)) {
                start(w, multi, c, w->first_conn + (int)(c - w->conns));
                running++;
            }
        }
        if (running > 0)
            curl_multi_poll(multi, NULL, 0, 100, NULL);
    }
    curl_multi_cleanup(multi);
    return NULL;
}

/* Writes the K keys gets read, untimed, on one connection. */
static int prepare_keys(struct shared *sh)
{
    struct conn *c = calloc(1, sizeof(*c));
    int rc = -1;
    if (c == NULL || conn_init(sh, c, 0, 1) != 0)
        goto out;
    for (long i = 0; i < sh->n_keys; i++) {
        char key[96], key_b64[132];
        int len = snprintf(key, sizeof(key), "bench/%lx/get/%ld", sh->run_tag, i);
        b64((const uint8_t *)key, (size_t)len, key_b64);
        snprintf(c->body, sizeof(c->body), "{\"key\":\"%s\",\"value\":\"%s\"}", key_b64,
                 sh->value_b64);
        curl_easy_setopt(c->easy, CURLOPT_POSTFIELDSIZE, (long)strlen(c->body));
        c->reply_len = 0;
        c->reply[0] = '\0';
        CURLcode res = curl_easy_perform(c->easy);
        long code = 0;
        curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &code);
        if (res != CURLE_OK || code != 200) {
            fprintf(stderr, "etcd_bench: preparing key %ld at %s: %s, HTTP %ld: %.200s\n", i,
                    c->url, curl_easy_strerror(res), code, c->reply);
            goto out;
        }
    }
    rc = 0;
out:
    if (c != NULL)
        conn_cleanup(c);
    free(c);
    return rc;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(void)
{
    fprintf(stderr, "usage: etcd_bench --endpoint http://HOST:PORT[,...] --op put|get "
                    "[--serializable]\n"
                    "                  [--conns C] [--threads T] [--seconds S] [--max-ops N]\n"
                    "                  [--size BYTES] [--keys K]\n");
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"endpoint", required_argument, NULL, 'e'}, {"op", required_argument, NULL, 'o'},
        {"serializable", no_argument, NULL, 'r'},   {"conns", required_argument, NULL, 'c'},
        {"threads", required_argument, NULL, 't'},  {"seconds", required_argument, NULL, 's'},
        {"max-ops", required_argument, NULL, 'm'},  {"size", required_argument, NULL, 'z'},
        {"keys", required_argument, NULL, 'k'},     {NULL, 0, NULL, 0}};
    static struct shared sh;
    static uint8_t value[MAX_SIZE];
    char *endpoint_list = NULL;
    const char *op = "put";
    int conns = 1, threads = 1, ch, rc = 1;

    sh.size = 256;
    sh.seconds = 5;
    sh.max_ops = 1000000;
    sh.n_keys = 1000;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'e': endpoint_list = optarg; break;
        case 'o': op = optarg; break;
        case 'r': sh.serializable = 1; break;
        case 'c': conns = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 's': sh.seconds = atof(optarg); break;
        case 'm': sh.max_ops = atol(optarg); break;
        case 'z': sh.size = (size_t)atol(optarg); break;
        case 'k': sh.n_keys = atoi(optarg); break;
        default: usage(); return 2;
        }
    }
    if (strcmp(op, "put") == 0)
        sh.op = OP_PUT;
    else if (strcmp(op, "get") == 0)
        sh.op = OP_GET;
    else
        endpoint_list = NULL; /* refused below */
    for (char *save = NULL, *tok = endpoint_list != NULL ? strtok_r(endpoint_list, ",", &save)
                                                         : NULL;
         tok != NULL && sh.n_endpoints < MAX_ENDPOINTS; tok = strtok_r(NULL, ",", &save))
        sh.endpoints[sh.n_endpoints++] = tok;
    if (sh.n_endpoints == 0 || conns < 1 || conns > MAX_CONNS || threads < 1 ||
        threads > MAX_THREADS || threads > conns || sh.size > MAX_SIZE || sh.seconds <= 0 ||
        sh.seconds > 3600 || sh.max_ops < 1 || sh.n_keys < 1 || sh.n_keys > MAX_KEYS) {
        usage();
        fprintf(stderr, "etcd_bench: op put|get, conns 1..%d, threads 1..min(%d, conns), "
                        "size <= %d, seconds 0..3600, keys 1..%d\n",
                MAX_CONNS, MAX_THREADS, MAX_SIZE, MAX_KEYS);
        return 2;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, "etcd_bench: curl_global_init failed\n");
        return 1;
    }
    memset(value, 0x5a, sh.size);
    b64(value, sh.size, sh.value_b64);
    sh.run_tag = (long)time(NULL) << 20 ^ (long)getpid();
    pthread_mutex_init(&sh.lock, NULL);
    struct worker *w = calloc((size_t)threads, sizeof(*w));
    pthread_t *tid = calloc((size_t)threads, sizeof(*tid));
    struct conn *all_conns = calloc((size_t)conns, sizeof(*all_conns));
    double *all = NULL;
    int started = 0;
    if (w == NULL || tid == NULL || all_conns == NULL)
        goto out;
    for (int i = 0; i < conns; i++)
        if (conn_init(&sh, &all_conns[i], i, sh.op == OP_PUT) != 0)
            goto out;
    if (sh.op == OP_GET && prepare_keys(&sh) != 0)
        goto out;
    for (int i = 0, next = 0; i < threads; i++) {
        w[i].sh = &sh;
        w[i].index = i;
        w[i].first_conn = next;
        w[i].n_conns = conns / threads + (i < conns % threads);
        w[i].conns = &all_conns[next];
        next += w[i].n_conns;
    }
    double t0 = now_s();
    sh.end = t0 + sh.seconds;
    for (; started < threads; started++)
        if (pthread_create(&tid[started], NULL, run, &w[started]) != 0)
            break;
    long total = 0, errors = 0;
    double max_gap_ms = 0;
    for (int i = 0; i < started; i++) {
        pthread_join(tid[i], NULL);
        total += w[i].n;
        errors += w[i].errors;
        if (w[i].max_gap_ms > max_gap_ms)
            max_gap_ms = w[i].max_gap_ms;
    }
    double elapsed = now_s() - t0;
    if (started < threads) {
        fprintf(stderr, "etcd_bench: cannot start thread %d\n", started);
        goto out;
    }
    all = malloc((size_t)(total ? total : 1) * sizeof(double));
    if (all == NULL)
        goto out;
    long k = 0;
    for (int i = 0; i < threads; i++) {
        if (w[i].n > 0)
            memcpy(all + k, w[i].lat_ms, (size_t)w[i].n * sizeof(double));
        k += w[i].n;
    }
    qsort(all, (size_t)total, sizeof(double), cmp_double);
#define PCT(p) (total ? all[(long)((double)(total - 1) * (p))] : 0.0)
    printf("op=%s threads=%d conns=%d inflight=1 batch=0 size=%zu ops=%ld errors=%ld "
           "seconds=%.2f ops_per_s=%.0f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_gap_ms=%.1f%s\n",
           op, threads, conns, sh.size, total, errors, elapsed, (double)total / elapsed,
           PCT(0.50), PCT(0.99), PCT(0.999), max_gap_ms,
           sh.op == OP_GET ? (sh.serializable ? " read=serializable" : " read=linearizable")
                           : "");
    fflush(stdout);
    if (errors)
        fprintf(stderr, "etcd_bench: %ld errors, first: %s\n", errors, sh.first_message);
    rc = errors ? 1 : 0;
out:
    for (int i = 0; all_conns != NULL && i < conns; i++)
        conn_cleanup(&all_conns[i]);
    for (int i = 0; w != NULL && i < threads; i++)
        free(w[i].lat_ms);
    free(all_conns);
    free(all);
    free(w);
    free(tid);
    pthread_mutex_destroy(&sh.lock);
    curl_global_cleanup();
    return rc;
}
