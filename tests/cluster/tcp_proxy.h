/* tcp_proxy.h: a loopback TCP forwarder on one thread, for fault injection
 * between raft peers: it listens where a node's peers dial (raft_address)
 * and forwards to where the node listens (raft_listen), until it is cut. */
#ifndef KR_TEST_TCP_PROXY_H
#define KR_TEST_TCP_PROXY_H

struct tcp_proxy;

/* Listens on 127.0.0.1:|listen_port| and forwards each connection to
 * 127.0.0.1:|upstream_port| (connecting when a peer arrives; a refused
 * upstream closes the peer's connection). The thread runs until
 * tcp_proxy_free. 0 and *out, or -1 (the reason printed). */
int tcp_proxy_new(int listen_port, int upstream_port, struct tcp_proxy **out);

/* |cut| 1: every forwarded connection is closed, bytes in flight dropped,
 * and new ones are accepted and closed at once, so the node behind hears
 * from no peer. 0: forwarding again for new connections. Takes effect
 * within one poll round (20 ms); returns once it has. */
void tcp_proxy_cut(struct tcp_proxy *p, int cut);

/* Connections forwarded since start (for a test to see traffic passed). */
unsigned long tcp_proxy_accepted(struct tcp_proxy *p);

/* Stops the thread, closes every socket. Accepts NULL. */
void tcp_proxy_free(struct tcp_proxy *p);

#endif
