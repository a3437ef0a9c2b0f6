/* node.h: the composition root: start and stop order of every module. */
#ifndef KR_NODE_H
#define KR_NODE_H

#include <stdint.h>

/* Runs the node described by |config_path| until SIGINT/SIGTERM. With
 * |until_ready| it stops once the default domain exists (used by init).
 * Returns 0 or a KR_E* code (the reason is logged). */
int node_run(const char *config_path, int until_ready);

/* A joining node's files in its data dir, and the label of the RSA transport
 * key its token makes for the MWK copy. */
#define NODE_JOIN_REQUEST "join-request"
#define NODE_JOIN_BUNDLE "join-bundle"
#define NODE_TRANSPORT_KEY_LABEL "keyraft-transport"
#define NODE_JOIN_CHECK_TEXT "keyraft-join-check"

struct node_init_options {
    const char *data_dir;
    uint64_t node_id;
    const char *listen;        /* NULL: 127.0.0.1:7300 */
    const char *raft_address;  /* NULL: 127.0.0.1:7301 */
    const char *hsm_module;    /* NULL: SoftHSM2 */
    const char *join;          /* HOST:PORT of a member: prepare to join instead of bootstrapping */
};

/* Makes a node in an empty |data_dir|: SoftHSM token + MWK, cluster CA, node
 * and admin certificates, configs, a one-voter raft log and the first domain
 * key. KR_EEXIST when the directory already holds a node. */
int node_init(const struct node_init_options *options);

#endif
