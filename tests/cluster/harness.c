/* harness.c: keyraftd processes, CLI runs and helpers for the integration
 * tests. Every child is tracked and killed at exit, and dies with the test
 * process (PR_SET_PDEATHSIG), so a failing test never leaves a node behind. */
#include "harness.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#define CLI_TIMEOUT_MS 30000
#define START_TIMEOUT_MS 20000
#define STOP_TIMEOUT_MS 10000
#define MAX_CLI_ARGS 64
#define MAX_TRACKED 64

/* Node processes still running: killed by the atexit handler. A registry is
 * the one global a harness needs; nothing else here is mutable state. */
static pid_t tracked[MAX_TRACKED];
static int atexit_installed;

static void kill_tracked(void)
{
    for (int i = 0; i < MAX_TRACKED; i++) {
        if (tracked[i] > 0) {
            kill(tracked[i], SIGKILL);
            waitpid(tracked[i], NULL, 0);
            tracked[i] = 0;
        }
    }
}

static void on_fatal_signal(int sig)
{
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked[i] > 0)
            kill(tracked[i], SIGKILL);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void harness_setup(void)
{
    if (atexit_installed)
        return;
    atexit_installed = 1;
    atexit(kill_tracked);
    signal(SIGPIPE, SIG_IGN); /* a peer that closes must not kill the test */
    signal(SIGINT, on_fatal_signal);
    signal(SIGTERM, on_fatal_signal);
    signal(SIGHUP, on_fatal_signal);
}

static void track(pid_t pid)
{
    for (int i = 0; i < MAX_TRACKED; i++) {
        if (tracked[i] == 0) {
            tracked[i] = pid;
            return;
        }
    }
}

static void untrack(pid_t pid)
{
    for (int i = 0; i < MAX_TRACKED; i++)
        if (tracked[i] == pid)
            tracked[i] = 0;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

const char *kr_build_dir(void)
{
    const char *d = getenv("KR_BUILD_DIR");
    return d != NULL && d[0] != '\0' ? d : ".";
}

static void bin_path(const char *name, char *buf, size_t len)
{
    snprintf(buf, len, "%s/%s", kr_build_dir(), name);
}

/* In the child between fork and exec: default signals, die with the parent. */
static void child_prepare(pid_t parent)
{
    sigset_t none;

    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(127);
    signal(SIGPIPE, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

static int exit_code(int wstatus)
{
    if (WIFEXITED(wstatus))
        return WEXITSTATUS(wstatus);
    if (WIFSIGNALED(wstatus))
        return 128 + WTERMSIG(wstatus);
    return -1;
}

/* ---- files ------------------------------------------------------------------------ */

int kr_write_file(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    const uint8_t *p = data;

    if (fd < 0)
        return -1;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            close(fd);
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return close(fd) == 0 ? 0 : -1;
}

int kr_read_file(const char *path, uint8_t **out, size_t *out_len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t cap = 4096, len = 0;
    uint8_t *buf = NULL;

    if (fd < 0)
        return -1;
    buf = malloc(cap + 1);
    if (buf == NULL)
        goto fail;
    for (;;) {
        if (len == cap) {
            uint8_t *nb = realloc(buf, cap * 2 + 1);
            if (nb == NULL)
                goto fail;
            buf = nb;
            cap *= 2;
        }
        ssize_t n = read(fd, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            goto fail;
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = 0;
    *out = buf;
    *out_len = len;
    return 0;
fail:
    free(buf);
    close(fd);
    return -1;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    if (flag == FTW_DP)
        rmdir(path);
    else
        unlink(path);
    return 0;
}

void kr_rm_rf(const char *path)
{
    if (path != NULL && path[0] != '\0')
        nftw(path, rm_entry, 32, FTW_DEPTH | FTW_PHYS);
}

int kr_scratch_file(const struct kr_node *node, const char *name, const void *data,
                    size_t len, char *path, size_t path_len)
{
    int n = snprintf(path, path_len, "%s/%s", node->scratch, name);

    if (n < 0 || (size_t)n >= path_len)
        return -1;
    return kr_write_file(path, data, len);
}

/* ---- bytes ------------------------------------------------------------------------ */

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int kr_hex_decode(const char *hex, uint8_t **out, size_t *out_len)
{
    size_t n = 0;
    uint8_t *buf = NULL;

    while (hexval((unsigned char)hex[n]) >= 0)
        n++;
    for (const char *p = hex + n; *p != '\0'; p++)
        if (*p != '\n' && *p != '\r' && *p != ' ' && *p != '\t')
            return -1;
    if (n % 2 != 0)
        return -1;
    buf = malloc(n / 2 + 1);
    if (buf == NULL)
        return -1;
    for (size_t i = 0; i < n / 2; i++)
        buf[i] = (uint8_t)(hexval((unsigned char)hex[2 * i]) << 4 |
                           hexval((unsigned char)hex[2 * i + 1]));
    *out = buf;
    *out_len = n / 2;
    return 0;
}

int kr_b64_decode(const char *b64, uint8_t **out, size_t *out_len)
{
    size_t n = strlen(b64), pad = 0;
    uint8_t *buf = NULL;
    int len;

    while (n > 0 && (b64[n - 1] == '\n' || b64[n - 1] == ' ' || b64[n - 1] == '\r'))
        n--;
    if (n % 4 != 0 || n > (size_t)INT32_MAX)
        return -1;
    if (n > 0 && b64[n - 1] == '=')
        pad++;
    if (n > 1 && b64[n - 2] == '=')
        pad++;
    buf = malloc(n / 4 * 3 + 1);
    if (buf == NULL)
        return -1;
    len = n > 0 ? EVP_DecodeBlock(buf, (const unsigned char *)b64, (int)n) : 0;
    if (len < 0 || (size_t)len < pad) {
        free(buf);
        return -1;
    }
    *out = buf;
    *out_len = (size_t)len - pad;
    return 0;
}

int kr_is_hex(const char *s, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return s[i] == '\0' || s[i] == '\n';
}

char *kr_chomp_dup(const char *s, size_t len)
{
    while (len > 0 && (s[len - 1] == '\n' || s[len - 1] == '\r' || s[len - 1] == ' '))
        len--;
    return strndup(s, len);
}

/* ---- processes ----------------------------------------------------------------------- */

/* Runs |argv| with stdin from |in|, capturing stdout/stderr, killed after
 * |timeout_ms|. Returns the exit code (128+sig; -1 on timeout or failure). */
static int run_capture(const char *const *argv, const void *in, size_t in_len,
                       struct kr_out *out, int timeout_ms)
{
    int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1};
    size_t cap_o = 4096, cap_e = 4096, in_off = 0;
    pid_t parent = getpid(), pid;
    uint64_t deadline = now_ms() + (uint64_t)timeout_ms;
    int wstatus = 0, timed_out = 0;

    harness_setup();
    memset(out, 0, sizeof(*out));
    out->status = -1;
    out->out = malloc(cap_o + 1);
    out->err = malloc(cap_e + 1);
    if (out->out == NULL || out->err == NULL)
        goto fail;
    out->out[0] = 0;
    out->err[0] = 0;
    if (pipe2(pin, O_CLOEXEC) != 0 || pipe2(pout, O_CLOEXEC) != 0 || pipe2(perr, O_CLOEXEC) != 0)
        goto fail;
    pid = fork();
    if (pid < 0)
        goto fail;
    if (pid == 0) {
        child_prepare(parent);
        dup2(pin[0], 0);
        dup2(pout[1], 1);
        dup2(perr[1], 2);
        execv(argv[0], (char *const *)argv);
        fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(pin[0]);
    close(pout[1]);
    close(perr[1]);
    pin[0] = pout[1] = perr[1] = -1;
    fcntl(pin[1], F_SETFL, O_NONBLOCK);
    if (in_len == 0) {
        close(pin[1]);
        pin[1] = -1;
    }
    while (pout[0] >= 0 || perr[0] >= 0) {
        struct pollfd pfd[3];
        int nfd = 0, io = -1, oo = -1, eo = -1;
        uint64_t now = now_ms();

        if (now >= deadline) {
            timed_out = 1;
            kill(pid, SIGKILL);
            break;
        }
        if (pin[1] >= 0) {
            io = nfd;
            pfd[nfd++] = (struct pollfd){.fd = pin[1], .events = POLLOUT};
        }
        if (pout[0] >= 0) {
            oo = nfd;
            pfd[nfd++] = (struct pollfd){.fd = pout[0], .events = POLLIN};
        }
        if (perr[0] >= 0) {
            eo = nfd;
            pfd[nfd++] = (struct pollfd){.fd = perr[0], .events = POLLIN};
        }
        int rc = poll(pfd, (nfds_t)nfd, (int)(deadline - now));
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc < 0)
            break;
        if (io >= 0 && pfd[io].revents != 0) {
            ssize_t n = write(pin[1], (const uint8_t *)in + in_off, in_len - in_off);
            if (n > 0)
                in_off += (size_t)n;
            if ((n < 0 && errno != EAGAIN && errno != EINTR) || in_off == in_len) {
                close(pin[1]);
                pin[1] = -1;
            }
        }
        for (int k = 0; k < 2; k++) {
            int idx = k == 0 ? oo : eo;
            int *fd = k == 0 ? &pout[0] : &perr[0];
            if (idx < 0 || pfd[idx].revents == 0)
                continue;
            uint8_t **buf = k == 0 ? &out->out : (uint8_t **)&out->err;
            size_t *len = k == 0 ? &out->out_len : &out->err_len;
            size_t *cap = k == 0 ? &cap_o : &cap_e;
            if (*len == *cap) {
                uint8_t *nb = realloc(*buf, *cap * 2 + 1);
                if (nb == NULL) {
                    kill(pid, SIGKILL);
                    break;
                }
                *buf = nb;
                *cap *= 2;
            }
            ssize_t n = read(*fd, *buf + *len, *cap - *len);
            if (n < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            if (n <= 0) {
                close(*fd);
                *fd = -1;
                continue;
            }
            *len += (size_t)n;
            (*buf)[*len] = 0;
        }
    }
    while (waitpid(pid, &wstatus, 0) < 0 && errno == EINTR)
        ;
    out->status = timed_out ? -1 : exit_code(wstatus);
    if (timed_out)
        fprintf(stderr, "harness: %s timed out after %d ms; killed\n", argv[0], timeout_ms);
fail:
    for (int i = 0; i < 2; i++) {
        if (pin[i] >= 0)
            close(pin[i]);
        if (pout[i] >= 0)
            close(pout[i]);
        if (perr[i] >= 0)
            close(perr[i]);
    }
    return out->status;
}

void kr_out_free(struct kr_out *out)
{
    if (out == NULL)
        return;
    free(out->out);
    free(out->err);
    memset(out, 0, sizeof(*out));
}

int kr_conf_of(const char *client_conf, const char *principal, char *out, size_t cap)
{
    const char *slash = strrchr(client_conf, '/');
    int dir_len = slash ? (int)(slash - client_conf) : 1;
    const char *dir = slash ? client_conf : ".";
    int n = snprintf(out, cap, "%.*s/%s.conf", dir_len, dir,
                     strcmp(principal, "app") == 0 ? "client" : principal);
    return n > 0 && (size_t)n < cap ? 0 : -1;
}

/* The identity `keyraftd init` made for a command's duty: admin for the
 * cluster and governance, auditor for the audit trail, app otherwise. */
static const char *principal_for(const char *verb)
{
    static const char *const admin_verbs[] = {"cluster", "principal", "domain", "policy",
                                              "quorum"};
    for (size_t i = 0; verb && i < sizeof(admin_verbs) / sizeof(admin_verbs[0]); i++)
        if (strcmp(verb, admin_verbs[i]) == 0)
            return "admin";
    return verb && strcmp(verb, "audit") == 0 ? "auditor" : "app";
}

/* The command word of a CLI argument list: past global options and their values. */
static const char *verb_of(const char *const *argv)
{
    static const char *const with_value[] = {"--endpoint", "--cert", "--key", "--ca",
                                             "--timeout", "--approval", "--wait", "--config"};
    for (size_t i = 0; argv[i] != NULL; i++) {
        if (strncmp(argv[i], "--", 2) != 0)
            return argv[i];
        for (size_t j = 0; j < sizeof(with_value) / sizeof(with_value[0]); j++)
            if (strcmp(argv[i], with_value[j]) == 0 && argv[i + 1] != NULL) {
                i++;
                break;
            }
    }
    return NULL;
}

int kr_cli_argv(const struct kr_node *node, const void *stdin_data, size_t stdin_len,
                struct kr_out *out, const char *const *argv)
{
    return kr_cli_as_argv(node, principal_for(verb_of(argv)), stdin_data, stdin_len, out, argv);
}

int kr_cli_as_argv(const struct kr_node *node, const char *principal, const void *stdin_data,
                   size_t stdin_len, struct kr_out *out, const char *const *argv)
{
    const char *full[MAX_CLI_ARGS + 4];
    char bin[KR_PATH_MAX];
    char conf[KR_PATH_MAX + 32];
    int n = 0;

    if (kr_conf_of(node->client_conf, principal, conf, sizeof(conf)) != 0)
        return -1;
    bin_path("keyraft", bin, sizeof(bin));
    full[n++] = bin;
    full[n++] = "--config";
    full[n++] = conf;
    for (int i = 0; argv[i] != NULL && i < MAX_CLI_ARGS; i++)
        full[n++] = argv[i];
    full[n] = NULL;
    return run_capture(full, stdin_data, stdin_len, out, CLI_TIMEOUT_MS);
}

int kr_cli(const struct kr_node *node, const void *stdin_data, size_t stdin_len,
           struct kr_out *out, const char *arg, ...)
{
    const char *argv[MAX_CLI_ARGS + 1];
    va_list ap;
    int n = 0;

    va_start(ap, arg);
    for (const char *a = arg; a != NULL && n < MAX_CLI_ARGS; a = va_arg(ap, const char *))
        argv[n++] = a;
    va_end(ap);
    argv[n] = NULL;
    return kr_cli_argv(node, stdin_data, stdin_len, out, argv);
}

int kr_run(const char *const *argv, struct kr_out *out, int timeout_ms)
{
    return run_capture(argv, NULL, 0, out, timeout_ms);
}

/* ---- nodes ------------------------------------------------------------------------- */

/* Two distinct free loopback ports: both bound at once, then released. */
static int free_ports(int *a, int *b)
{
    int fds[2] = {-1, -1}, ports[2] = {0, 0}, rc = -1;

    for (int i = 0; i < 2; i++) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0};
        socklen_t sl = sizeof(sa);
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
            getsockname(fds[i], (struct sockaddr *)&sa, &sl) != 0)
            goto out;
        ports[i] = ntohs(sa.sin_port);
    }
    *a = ports[0];
    *b = ports[1];
    rc = 0;
out:
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    return rc;
}

int kr_free_port_pair(int *a, int *b)
{
    return free_ports(a, b);
}

int kr_node_raft_snapshots(const struct kr_node *node)
{
    char path[KR_PATH_MAX + 16];
    snprintf(path, sizeof(path), "%.400s/raft", node->dir);
    DIR *d = opendir(path);
    if (d == NULL)
        return 0;
    int found = 0;
    struct dirent *ent;
    while ((ent = readdir(d)) != NULL)
        found += strncmp(ent->d_name, "snapshot-", 9) == 0;
    closedir(d);
    return found;
}

void kr_node_dump_log(const struct kr_node *node, size_t max)
{
    char path[KR_PATH_MAX + 16];
    uint8_t *log = NULL;
    size_t len = 0;

    snprintf(path, sizeof(path), "%s/node.log", node->dir);
    if (kr_read_file(path, &log, &len) != 0)
        return;
    size_t from = len > max ? len - max : 0;
    fprintf(stderr, "---- %s (last %zu bytes) ----\n%s\n---- end ----\n", path, len - from,
            (const char *)log + from);
    free(log);
}

static unsigned init_crashes;

unsigned kr_node_init_crashes(void) { return init_crashes; }

int kr_node_init(struct kr_node *node)
{
    char bin[KR_PATH_MAX], listen[64], raft[64], log[KR_PATH_MAX + 16];

    harness_setup();
    memset(node, 0, sizeof(*node));
    bin_path("keyraftd", bin, sizeof(bin));
    for (int attempt = 0; attempt < 5; attempt++) {
        struct kr_out o;

        snprintf(node->dir, sizeof(node->dir), "/tmp/krtest-XXXXXX");
        if (mkdtemp(node->dir) == NULL) {
            fprintf(stderr, "harness: mkdtemp: %s\n", strerror(errno));
            return -1;
        }
        if (free_ports(&node->port, &node->raft_port) != 0) {
            kr_rm_rf(node->dir);
            return -1;
        }
        snprintf(listen, sizeof(listen), "127.0.0.1:%d", node->port);
        snprintf(raft, sizeof(raft), "127.0.0.1:%d", node->raft_port);
        const char *argv[] = {bin,    "init",   "--data", node->dir, "--listen",
                              listen, "--raft-address", raft, NULL};
        int rc = run_capture(argv, NULL, 0, &o, 60000);
        snprintf(log, sizeof(log), "%s/init.log", node->dir);
        FILE *f = fopen(log, "w");
        if (f != NULL) {
            fwrite(o.out, 1, o.out_len, f);
            fwrite(o.err, 1, o.err_len, f);
            fclose(f);
        }
        if (rc == 0) {
            kr_out_free(&o);
            if (snprintf(node->client_conf, sizeof(node->client_conf), "%.400s/client.conf",
                         node->dir) < 0)
                return -1;
            snprintf(node->scratch, sizeof(node->scratch), "/tmp/krtest-scratch-XXXXXX");
            if (mkdtemp(node->scratch) == NULL) {
                kr_rm_rf(node->dir);
                return -1;
            }
            rc = kr_client_file_load(node->client_conf, &node->cfile, &node->ccfg);
            if (rc != 0) {
                fprintf(stderr, "harness: %s: %s\n", node->client_conf, kr_strerror(rc));
                kr_node_destroy(node);
                return -1;
            }
            return 0;
        }
        fprintf(stderr, "harness: keyraftd init (attempt %d, ports %d/%d) exited %d:\n%s%s\n",
                attempt + 1, node->port, node->raft_port, rc, (const char *)o.out, o.err);
        if (o.status >= 128 || o.status < 0)
            init_crashes++; /* a port taken meanwhile is a retry; a signal is a bug */
        kr_out_free(&o);
        kr_rm_rf(node->dir);
    }
    return -1;
}

int kr_node_alive(const struct kr_node *node)
{
    siginfo_t si;

    if (node->pid <= 0)
        return 0;
    /* Reaping here would lose the exit status: peek without reaping. A
     * zombie still answers kill(pid, 0), hence waitid first. */
    memset(&si, 0, sizeof(si));
    if (waitid(P_PID, (id_t)node->pid, &si, WEXITED | WNOHANG | WNOWAIT) != 0)
        return kill(node->pid, 0) == 0;
    return si.si_pid == 0 && kill(node->pid, 0) == 0;
}

int kr_node_client(const struct kr_node *node, int timeout_ms, kr_client **out_client)
{
    kr_client_config cfg = node->ccfg;
    kr_client *c = NULL;
    int rc;

    if (node->cfile == NULL)
        return KR_ECONFIG;
    if (timeout_ms > 0)
        cfg.timeout_ms = timeout_ms;
    rc = kr_client_new(&cfg, &c);
    if (rc != 0)
        return rc;
    *out_client = c;
    return 0;
}

int kr_node_client_as(const struct kr_node *node, const char *principal, int timeout_ms,
                      kr_client **out_client)
{
    char cert[KR_PATH_MAX + 32], key[KR_PATH_MAX + 32];
    kr_client_config cfg = node->ccfg;
    const char *slash = strrchr(node->client_conf, '/');
    int dir_len = slash ? (int)(slash - node->client_conf) : 1;

    if (node->cfile == NULL)
        return KR_ECONFIG;
    snprintf(cert, sizeof(cert), "%.*s/tls/%s.pem", dir_len, node->client_conf, principal);
    snprintf(key, sizeof(key), "%.*s/tls/%s.key", dir_len, node->client_conf, principal);
    cfg.cert_file = cert;
    cfg.key_file = key;
    if (timeout_ms > 0)
        cfg.timeout_ms = timeout_ms;
    return kr_client_new(&cfg, out_client);
}

void kr_node_client_free(kr_client *client)
{
    kr_client_free(client);
}

int kr_node_status_role(const struct kr_node *node, char *role, size_t role_len)
{
    Keyraft__Request req = KEYRAFT__REQUEST__INIT;
    Keyraft__StatusRequest st = KEYRAFT__STATUS_REQUEST__INIT;
    Keyraft__Response *resp = NULL;
    kr_client *c = NULL;
    int rc;

    rc = kr_node_client(node, 1000, &c);
    if (rc != 0)
        return rc;
    req.op_case = KEYRAFT__REQUEST__OP_STATUS;
    req.status = &st;
    rc = kr_call(c, &req, &resp);
    if (rc == 0 && (resp->status != 0 || resp->result_case != KEYRAFT__RESPONSE__RESULT_NODE_STATUS))
        rc = resp->status != 0 ? resp->status : KR_EPROTO;
    if (rc == 0)
        snprintf(role, role_len, "%s", resp->node_status->role);
    kr_response_free(resp);
    kr_client_free(c);
    return rc;
}

int kr_node_spawn(struct kr_node *node)
{
    char bin[KR_PATH_MAX], log[KR_PATH_MAX + 16];
    pid_t parent = getpid(), pid;
    int fd;

    harness_setup();
    if (node->pid > 0) {
        fprintf(stderr, "harness: node %s already running\n", node->dir);
        return -1;
    }
    bin_path("keyraftd", bin, sizeof(bin));
    snprintf(log, sizeof(log), "%s/node.log", node->dir);
    fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0)
        return -1;
    pid = fork();
    if (pid < 0) {
        close(fd);
        return -1;
    }
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDONLY);
        child_prepare(parent);
        dup2(devnull, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        execl(bin, bin, "--data", node->dir, (char *)NULL);
        fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    close(fd);
    node->pid = pid;
    track(pid);
    return 0;
}

int kr_node_start(struct kr_node *node)
{
    char role[32] = "";
    uint64_t deadline;
    int last = 0;

    if (kr_node_spawn(node) != 0)
        return -1;
    pid_t pid = node->pid;
    deadline = now_ms() + START_TIMEOUT_MS;
    while (now_ms() < deadline) {
        if (!kr_node_alive(node)) {
            int wstatus = 0;
            waitpid(pid, &wstatus, 0);
            untrack(pid);
            node->pid = 0;
            fprintf(stderr, "harness: keyraftd exited %d during start\n", exit_code(wstatus));
            kr_node_dump_log(node, 4000);
            return -1;
        }
        last = kr_node_status_role(node, role, sizeof(role));
        if (last == 0 && strcmp(role, "leader") == 0)
            return 0;
        sleep_ms(100);
    }
    fprintf(stderr, "harness: node %s did not become a leader in %d ms (last: %s, role '%s')\n",
            node->dir, START_TIMEOUT_MS, kr_status_name(last), role);
    kr_node_dump_log(node, 4000);
    kr_node_kill9(node);
    return -1;
}

int kr_node_stop(struct kr_node *node)
{
    uint64_t deadline;
    int wstatus = 0;
    pid_t r = 0;

    if (node->pid <= 0)
        return -1;
    kill(node->pid, SIGTERM);
    deadline = now_ms() + STOP_TIMEOUT_MS;
    while (now_ms() < deadline) {
        r = waitpid(node->pid, &wstatus, WNOHANG);
        if (r == node->pid || (r < 0 && errno != EINTR))
            break;
        sleep_ms(20);
    }
    if (r != node->pid) {
        fprintf(stderr, "harness: keyraftd %d ignored SIGTERM for %d ms; SIGKILL\n",
                (int)node->pid, STOP_TIMEOUT_MS);
        kr_node_dump_log(node, 2000);
        kill(node->pid, SIGKILL);
        waitpid(node->pid, &wstatus, 0);
        untrack(node->pid);
        node->pid = 0;
        return 128 + SIGKILL;
    }
    untrack(node->pid);
    node->pid = 0;
    return exit_code(wstatus);
}

int kr_node_wait_exit(struct kr_node *node, unsigned timeout_ms)
{
    uint64_t deadline = now_ms() + timeout_ms;
    int wstatus = 0;

    if (node->pid <= 0)
        return -1;
    for (;;) {
        pid_t r = waitpid(node->pid, &wstatus, WNOHANG);
        if (r == node->pid) {
            untrack(node->pid);
            node->pid = 0;
            return exit_code(wstatus);
        }
        if ((r < 0 && errno != EINTR) || now_ms() >= deadline)
            return -1;
        sleep_ms(10);
    }
}

int kr_node_kill9(struct kr_node *node)
{
    if (node->pid <= 0)
        return -1;
    kill(node->pid, SIGKILL);
    while (waitpid(node->pid, NULL, 0) < 0 && errno == EINTR)
        ;
    untrack(node->pid);
    node->pid = 0;
    return 0;
}

int kr_node_restart(struct kr_node *node)
{
    kr_node_stop(node);
    return kr_node_start(node);
}

void kr_node_destroy(struct kr_node *node)
{
    const char *keep = getenv("KR_KEEP_TEST_DIRS");

    if (node == NULL)
        return;
    if (node->pid > 0)
        kr_node_stop(node);
    kr_client_file_free(node->cfile);
    node->cfile = NULL;
    if (keep != NULL && keep[0] != '\0') {
        fprintf(stderr, "harness: kept %s and %s\n", node->dir, node->scratch);
        return;
    }
    kr_rm_rf(node->dir);
    kr_rm_rf(node->scratch);
    node->dir[0] = 0;
    node->scratch[0] = 0;
}

/* ---- raw connections ------------------------------------------------------------------ */

int kr_tcp_connect(int port, int timeout_s)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    struct timeval tv = {.tv_sec = timeout_s};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    harness_setup();
    if (fd < 0)
        return -1;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        fprintf(stderr, "harness: connect 127.0.0.1:%d: %s\n", port, strerror(errno));
        close(fd);
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    return fd;
}

int kr_tls_open(const struct kr_node *node, const char *cert, const char *key, int max_version,
                struct kr_tls *t)
{
    char ca[KR_PATH_MAX + 16];
    int rc = -1;

    memset(t, 0, sizeof(*t));
    t->fd = kr_tcp_connect(node->port, 5);
    if (t->fd < 0)
        return -1;
    snprintf(ca, sizeof(ca), "%s/tls/ca.pem", node->dir);
    t->ctx = SSL_CTX_new(TLS_client_method());
    if (t->ctx == NULL)
        goto out;
    SSL_CTX_set_min_proto_version(t->ctx, max_version == TLS1_2_VERSION ? TLS1_2_VERSION
                                                                        : TLS1_3_VERSION);
    if (max_version != 0)
        SSL_CTX_set_max_proto_version(t->ctx, max_version);
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
    if (SSL_CTX_load_verify_locations(t->ctx, ca, NULL) != 1 ||
        (cert != NULL && (SSL_CTX_use_certificate_chain_file(t->ctx, cert) != 1 ||
                          SSL_CTX_use_PrivateKey_file(t->ctx, key, SSL_FILETYPE_PEM) != 1))) {
        rc = KR_ECONFIG;
        goto out;
    }
    t->ssl = SSL_new(t->ctx);
    if (t->ssl == NULL)
        goto out;
    SSL_set_fd(t->ssl, t->fd);
    rc = SSL_connect(t->ssl) == 1 ? 0 : -1;
out:
    ERR_clear_error();
    return rc;
}

int kr_tls_open_app(const struct kr_node *node, struct kr_tls *t)
{
    char cert[KR_PATH_MAX + 16], key[KR_PATH_MAX + 16];

    snprintf(cert, sizeof(cert), "%s/tls/app.pem", node->dir);
    snprintf(key, sizeof(key), "%s/tls/app.key", node->dir);
    return kr_tls_open(node, cert, key, 0, t);
}

void kr_tls_close(struct kr_tls *t)
{
    if (t->ssl != NULL) {
        SSL_shutdown(t->ssl);
        SSL_free(t->ssl);
    }
    SSL_CTX_free(t->ctx);
    if (t->fd > 0)
        close(t->fd);
    memset(t, 0, sizeof(*t));
    t->fd = -1;
    ERR_clear_error();
}

int kr_tls_write(struct kr_tls *t, const void *data, size_t len)
{
    const uint8_t *p = data;

    while (len > 0) {
        int n = SSL_write(t->ssl, p, len > INT32_MAX ? INT32_MAX : (int)len);
        if (n <= 0) {
            ERR_clear_error();
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int kr_tls_read(struct kr_tls *t, void *data, size_t len)
{
    uint8_t *p = data;

    while (len > 0) {
        int n = SSL_read(t->ssl, p, len > INT32_MAX ? INT32_MAX : (int)len);
        if (n <= 0) {
            ERR_clear_error();
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int kr_tls_send_frame(struct kr_tls *t, const void *payload, size_t len)
{
    uint8_t *buf = malloc(len + 4);
    int rc;

    if (buf == NULL)
        return -1;
    buf[0] = (uint8_t)(len >> 24);
    buf[1] = (uint8_t)(len >> 16);
    buf[2] = (uint8_t)(len >> 8);
    buf[3] = (uint8_t)len;
    if (len > 0)
        memcpy(buf + 4, payload, len);
    rc = kr_tls_write(t, buf, len + 4);
    free(buf);
    return rc;
}

int kr_tls_send_request(struct kr_tls *t, const Keyraft__Request *req)
{
    size_t n = keyraft__request__get_packed_size(req);
    uint8_t *buf = malloc(n + 1);
    int rc;

    if (buf == NULL)
        return -1;
    keyraft__request__pack(req, buf);
    rc = kr_tls_send_frame(t, buf, n);
    free(buf);
    return rc;
}

Keyraft__Response *kr_tls_read_response(struct kr_tls *t, size_t *frame_len)
{
    uint8_t hdr[4];
    size_t n;
    uint8_t *buf;
    Keyraft__Response *resp;

    if (frame_len != NULL)
        *frame_len = 0;
    if (kr_tls_read(t, hdr, 4) != 0)
        return NULL;
    n = (size_t)hdr[0] << 24 | (size_t)hdr[1] << 16 | (size_t)hdr[2] << 8 | hdr[3];
    if (frame_len != NULL)
        *frame_len = n;
    if (n > 64u * 1024 * 1024)
        return NULL;
    buf = malloc(n + 1);
    if (buf == NULL)
        return NULL;
    if (kr_tls_read(t, buf, n) != 0) {
        free(buf);
        return NULL;
    }
    resp = keyraft__response__unpack(NULL, n, buf);
    free(buf);
    return resp;
}

int kr_tls_peer_closed(struct kr_tls *t)
{
    uint8_t b;
    int n = SSL_read(t->ssl, &b, 1);
    int err = SSL_get_error(t->ssl, n);
    int e = errno;

    ERR_clear_error();
    if (n > 0)
        return 0;
    return !(err == SSL_ERROR_SYSCALL && (e == EAGAIN || e == EWOULDBLOCK));
}

/* The "NAME: N kB" line of /proc/PID/status, in KiB, or -1. */
static long proc_status_kib(pid_t pid, const char *name)
{
    char path[64], line[256];
    long kib = -1;
    size_t n = strlen(name);
    FILE *f;

    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    f = fopen(path, "r");
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof(line), f) != NULL)
        if (strncmp(line, name, n) == 0 && line[n] == ':' &&
            sscanf(line + n + 1, " %ld kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

long kr_rss_kib(pid_t pid) { return proc_status_kib(pid, "VmRSS"); }

long kr_peak_rss_kib(pid_t pid) { return proc_status_kib(pid, "VmHWM"); }

/* ---- JSON ------------------------------------------------------------------------------ */

struct jp {
    const char *s, *end;
    int depth;
};

static void jp_ws(struct jp *p)
{
    while (p->s < p->end && (*p->s == ' ' || *p->s == '\n' || *p->s == '\t' || *p->s == '\r'))
        p->s++;
}

static kr_json *jp_value(struct jp *p);

static int jp_push(kr_json *j, kr_json *item)
{
    kr_json **n = realloc(j->items, (j->n_items + 1) * sizeof(*n));

    if (n == NULL)
        return -1;
    j->items = n;
    j->items[j->n_items++] = item;
    return 0;
}

static void put_utf8(char *out, size_t *o, unsigned cp)
{
    if (cp < 0x80) {
        out[(*o)++] = (char)cp;
    } else if (cp < 0x800) {
        out[(*o)++] = (char)(0xc0 | cp >> 6);
        out[(*o)++] = (char)(0x80 | (cp & 0x3f));
    } else {
        out[(*o)++] = (char)(0xe0 | cp >> 12);
        out[(*o)++] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[(*o)++] = (char)(0x80 | (cp & 0x3f));
    }
}

static char *jp_string(struct jp *p)
{
    const char *start;
    char *out;
    size_t o = 0;

    if (p->s >= p->end || *p->s != '"')
        return NULL;
    start = ++p->s;
    while (p->s < p->end && *p->s != '"')
        p->s += *p->s == '\\' && p->s + 1 < p->end ? 2 : 1;
    if (p->s >= p->end)
        return NULL;
    out = malloc((size_t)(p->s - start) + 1);
    if (out == NULL)
        return NULL;
    for (const char *q = start; q < p->s; q++) {
        if (*q != '\\') {
            out[o++] = *q;
            continue;
        }
        q++;
        switch (*q) {
        case 'n': out[o++] = '\n'; break;
        case 't': out[o++] = '\t'; break;
        case 'r': out[o++] = '\r'; break;
        case 'b': out[o++] = '\b'; break;
        case 'f': out[o++] = '\f'; break;
        case 'u': {
            unsigned cp = 0;
            for (int k = 1; k <= 4 && q + k < p->s; k++)
                cp = cp << 4 | (unsigned)(hexval((unsigned char)q[k]) & 0xf);
            q += 4;
            put_utf8(out, &o, cp); /* at most 3 bytes for the 6 consumed */
            break;
        }
        default: out[o++] = *q; break;
        }
    }
    out[o] = 0;
    p->s++;
    return out;
}

static kr_json *jp_value(struct jp *p)
{
    kr_json *j = calloc(1, sizeof(*j));

    if (j == NULL || ++p->depth > 64)
        goto fail;
    jp_ws(p);
    if (p->s >= p->end)
        goto fail;
    if (*p->s == '{' || *p->s == '[') {
        char close = *p->s == '{' ? '}' : ']';
        j->type = *p->s == '{' ? KR_JSON_OBJ : KR_JSON_ARR;
        p->s++;
        jp_ws(p);
        if (p->s < p->end && *p->s == close) {
            p->s++;
            goto done;
        }
        for (;;) {
            char *key = NULL;
            jp_ws(p);
            if (j->type == KR_JSON_OBJ) {
                key = jp_string(p);
                jp_ws(p);
                if (key == NULL || p->s >= p->end || *p->s != ':') {
                    free(key);
                    goto fail;
                }
                p->s++;
            }
            kr_json *item = jp_value(p);
            if (item == NULL) {
                free(key);
                goto fail;
            }
            item->key = key;
            if (jp_push(j, item) != 0) {
                kr_json_free(item);
                goto fail;
            }
            jp_ws(p);
            if (p->s < p->end && *p->s == ',') {
                p->s++;
                continue;
            }
            if (p->s < p->end && *p->s == close) {
                p->s++;
                goto done;
            }
            goto fail;
        }
    }
    if (*p->s == '"') {
        j->type = KR_JSON_STR;
        j->str = jp_string(p);
        if (j->str == NULL)
            goto fail;
        goto done;
    }
    if ((size_t)(p->end - p->s) >= 4 && strncmp(p->s, "true", 4) == 0) {
        j->type = KR_JSON_BOOL;
        j->boolean = 1;
        p->s += 4;
        goto done;
    }
    if ((size_t)(p->end - p->s) >= 5 && strncmp(p->s, "false", 5) == 0) {
        j->type = KR_JSON_BOOL;
        p->s += 5;
        goto done;
    }
    if ((size_t)(p->end - p->s) >= 4 && strncmp(p->s, "null", 4) == 0) {
        j->type = KR_JSON_NULL;
        p->s += 4;
        goto done;
    }
    if (*p->s == '-' || (*p->s >= '0' && *p->s <= '9')) {
        const char *start = p->s;
        while (p->s < p->end && strchr("+-0123456789.eE", *p->s) != NULL)
            p->s++;
        j->type = KR_JSON_NUM;
        j->str = strndup(start, (size_t)(p->s - start));
        if (j->str == NULL)
            goto fail;
        j->num = strtod(j->str, NULL);
        goto done;
    }
fail:
    kr_json_free(j);
    return NULL;
done:
    p->depth--;
    return j;
}

kr_json *kr_json_parse(const char *text, size_t len)
{
    struct jp p = {.s = text, .end = text + len, .depth = 0};
    kr_json *j = jp_value(&p);

    if (j == NULL)
        return NULL;
    jp_ws(&p);
    if (p.s != p.end) {
        kr_json_free(j);
        return NULL;
    }
    return j;
}

void kr_json_free(kr_json *j)
{
    if (j == NULL)
        return;
    for (size_t i = 0; i < j->n_items; i++)
        kr_json_free(j->items[i]);
    free(j->items);
    free(j->key);
    free(j->str);
    free(j);
}

const kr_json *kr_json_get(const kr_json *j, const char *key)
{
    if (j == NULL || j->type != KR_JSON_OBJ)
        return NULL;
    for (size_t i = 0; i < j->n_items; i++)
        if (strcmp(j->items[i]->key, key) == 0)
            return j->items[i];
    return NULL;
}

const kr_json *kr_json_at(const kr_json *j, size_t i)
{
    if (j == NULL || (j->type != KR_JSON_ARR && j->type != KR_JSON_OBJ) || i >= j->n_items)
        return NULL;
    return j->items[i];
}

size_t kr_json_len(const kr_json *j)
{
    return j != NULL ? j->n_items : 0;
}

const char *kr_json_str(const kr_json *j)
{
    return j != NULL && j->type == KR_JSON_STR ? j->str : NULL;
}

long long kr_json_int(const kr_json *j, long long dflt)
{
    if (j == NULL || j->type != KR_JSON_NUM)
        return dflt;
    return strtoll(j->str, NULL, 10);
}

const kr_json *kr_json_path(const kr_json *j, const char *path)
{
    char step[128];

    while (j != NULL && *path != '\0') {
        size_t n = strcspn(path, ".");
        if (n >= sizeof(step))
            return NULL;
        memcpy(step, path, n);
        step[n] = 0;
        path += n + (path[n] == '.' ? 1 : 0);
        if (j->type == KR_JSON_ARR) {
            char *end = NULL;
            unsigned long i = strtoul(step, &end, 10);
            j = end != step && *end == '\0' ? kr_json_at(j, i) : NULL;
        } else {
            j = kr_json_get(j, step);
        }
    }
    return j;
}
