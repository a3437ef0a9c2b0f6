/* tcp_proxy.c: one poll() thread per proxy; every connection is a pair of
 * sockets with one bounded buffer per direction. */
#include "tcp_proxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROXY_MAX_PAIRS 32
#define PROXY_BUF 65536
#define PROXY_POLL_MS 20
#define PROXY_CUT_WAIT_MS 2000

/* One direction: bytes read from |from| not yet written to |to|. */
struct pipe_dir {
    uint8_t *buf;
    size_t len, off;
};

struct pair {
    int peer;     /* accepted from the dialing node */
    int upstream; /* to the node behind the proxy */
    struct pipe_dir up, down; /* peer -> upstream, upstream -> peer */
};

struct tcp_proxy {
    int listen_fd;
    int upstream_port;
    pthread_t thread;
    int thread_started;
    atomic_int stop;
    atomic_int want_cut;
    atomic_uint req_gen;  /* bumped by tcp_proxy_cut */
    atomic_uint done_gen; /* the generation the thread has applied */
    atomic_ulong accepted;
    int cut;              /* thread-local view of want_cut */
    struct pair pairs[PROXY_MAX_PAIRS];
    size_t n_pairs;
};

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static void pair_close(struct tcp_proxy *p, size_t i)
{
    struct pair *pr = &p->pairs[i];

    close(pr->peer);
    close(pr->upstream);
    free(pr->up.buf);
    free(pr->down.buf);
    p->pairs[i] = p->pairs[--p->n_pairs];
}

static int connect_upstream(int port)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;

    if (fd < 0)
        return -1;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    /* Loopback: a listening port connects at once, a closed one refuses at once. */
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        close(fd);
        return -1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    fcntl(fd, F_SETFL, O_NONBLOCK);
    return fd;
}

static void on_accept(struct tcp_proxy *p)
{
    int fd = accept4(p->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    int one = 1;

    if (fd < 0)
        return;
    if (p->cut || p->n_pairs == PROXY_MAX_PAIRS) {
        close(fd);
        return;
    }
    int up = connect_upstream(p->upstream_port);
    struct pair *pr = &p->pairs[p->n_pairs];
    memset(pr, 0, sizeof(*pr));
    pr->up.buf = malloc(PROXY_BUF);
    pr->down.buf = malloc(PROXY_BUF);
    if (up < 0 || pr->up.buf == NULL || pr->down.buf == NULL) {
        free(pr->up.buf);
        free(pr->down.buf);
        if (up >= 0)
            close(up);
        close(fd);
        return;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    pr->peer = fd;
    pr->upstream = up;
    p->n_pairs++;
    atomic_fetch_add(&p->accepted, 1);
}

/* Moves bytes one step in one direction. -1 when the pair is to be closed. */
static int pump(int from, int to, struct pipe_dir *d, short from_ev, short to_ev)
{
    if (d->len == 0 && (from_ev & (POLLIN | POLLHUP | POLLERR))) {
        ssize_t n = read(from, d->buf, PROXY_BUF);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
            return -1;
        if (n > 0) {
            d->len = (size_t)n;
            d->off = 0;
        }
    }
    if (d->len > 0 && (to_ev & (POLLOUT | POLLERR | POLLHUP))) {
        ssize_t n = send(to, d->buf + d->off, d->len - d->off, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        if (n > 0) {
            d->off += (size_t)n;
            if (d->off == d->len)
                d->len = d->off = 0;
        }
    }
    return 0;
}

static void *proxy_main(void *arg)
{
    struct tcp_proxy *p = arg;
    struct pollfd pfd[1 + 2 * PROXY_MAX_PAIRS];

    while (!atomic_load(&p->stop)) {
        unsigned gen = atomic_load(&p->req_gen);
        p->cut = atomic_load(&p->want_cut);
        if (p->cut)
            while (p->n_pairs > 0)
                pair_close(p, p->n_pairs - 1);
        atomic_store(&p->done_gen, gen);

        size_t n = p->n_pairs;
        pfd[0] = (struct pollfd){.fd = p->listen_fd, .events = POLLIN};
        for (size_t i = 0; i < n; i++) {
            struct pair *pr = &p->pairs[i];
            pfd[1 + 2 * i] = (struct pollfd){
                .fd = pr->peer,
                .events = (short)((pr->up.len == 0 ? POLLIN : 0) | (pr->down.len ? POLLOUT : 0))};
            pfd[2 + 2 * i] = (struct pollfd){
                .fd = pr->upstream,
                .events = (short)((pr->down.len == 0 ? POLLIN : 0) | (pr->up.len ? POLLOUT : 0))};
        }
        int rc = poll(pfd, 1 + 2 * n, PROXY_POLL_MS);
        if (rc < 0 && errno != EINTR)
            break;
        if (rc <= 0)
            continue;
        /* Pairs first, from the last, so closing one never moves an unvisited one. */
        for (size_t i = n; i-- > 0;) {
            struct pair *pr = &p->pairs[i];
            short pe = pfd[1 + 2 * i].revents, ue = pfd[2 + 2 * i].revents;
            if (pe == 0 && ue == 0)
                continue;
            if (pump(pr->peer, pr->upstream, &pr->up, pe, ue) != 0 ||
                pump(pr->upstream, pr->peer, &pr->down, ue, pe) != 0)
                pair_close(p, i);
        }
        if (pfd[0].revents & POLLIN)
            on_accept(p);
    }
    while (p->n_pairs > 0)
        pair_close(p, p->n_pairs - 1);
    return NULL;
}

int tcp_proxy_new(int listen_port, int upstream_port, struct tcp_proxy **out)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)listen_port)};
    struct tcp_proxy *p = calloc(1, sizeof(*p));
    int one = 1;

    if (p == NULL)
        return -1;
    p->upstream_port = upstream_port;
    p->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (p->listen_fd < 0 ||
        setsockopt(p->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        bind(p->listen_fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
        listen(p->listen_fd, 64) != 0) {
        fprintf(stderr, "tcp_proxy: listen on 127.0.0.1:%d: %s\n", listen_port, strerror(errno));
        tcp_proxy_free(p);
        return -1;
    }
    if (pthread_create(&p->thread, NULL, proxy_main, p) != 0) {
        fprintf(stderr, "tcp_proxy: no thread\n");
        tcp_proxy_free(p);
        return -1;
    }
    p->thread_started = 1;
    *out = p;
    return 0;
}

void tcp_proxy_cut(struct tcp_proxy *p, int cut)
{
    atomic_store(&p->want_cut, cut);
    unsigned gen = atomic_fetch_add(&p->req_gen, 1) + 1;
    for (int waited = 0; waited < PROXY_CUT_WAIT_MS; waited += 5) {
        if ((int)(atomic_load(&p->done_gen) - gen) >= 0)
            return;
        sleep_ms(5);
    }
    fprintf(stderr, "tcp_proxy: the thread did not apply cut=%d in %d ms\n", cut,
            PROXY_CUT_WAIT_MS);
}

unsigned long tcp_proxy_accepted(struct tcp_proxy *p)
{
    return atomic_load(&p->accepted);
}

void tcp_proxy_free(struct tcp_proxy *p)
{
    if (p == NULL)
        return;
    atomic_store(&p->stop, 1);
    if (p->thread_started)
        pthread_join(p->thread, NULL);
    if (p->listen_fd >= 0)
        close(p->listen_fd);
    free(p);
}
