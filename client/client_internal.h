/* client_internal.h: what libkeyraft's files and the keyraft CLI share beyond
 * the public API: error-detail variants of the constructors and the call
 * helpers the typed operations are built on. Not installed. */
#ifndef KR_CLIENT_INTERNAL_H
#define KR_CLIENT_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "keyraft.h"

/* kr_client_file_load, with a one-line reason for a failure written to
 * |err| (may be NULL) so the CLI can say which file and which field. */
int kr__client_file_load_err(const char *path, kr_client_file **out_file,
                             kr_client_config *out_cfg, char *err, size_t err_len);

/* kr_client_new, with a one-line reason for a failure written to |err|. */
int kr__client_new_err(const kr_client_config *cfg, kr_client **out_client, char *err,
                       size_t err_len);

/* Sets the detail kr_client_last_error returns. */
void kr__client_set_error(kr_client *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* kr_call, then checks the outcome: returns 0 and *out_resp only when the
 * node answered status 0 with result |expect| (NOT_SET: any result);
 * otherwise the node's status or a transport code, detail in the last error,
 * and no response. */
int kr__call_ok(kr_client *c, Keyraft__Request *req, Keyraft__Response__ResultCase expect,
                Keyraft__Response **out_resp);

/* Fills |ref| to address |key|: by name when it starts with "name:", else by
 * id. |ref| borrows from |key|. Returns KR_EINVAL for an empty reference. */
int kr__key_ref(const char *key, Keyraft__KeyRef *ref);

/* Wipes every bytes field of |msg| and its sub-messages (key material,
 * plaintexts) before the message is freed. */
void kr__message_wipe(ProtobufCMessage *msg);

/* Answers read ahead of the one being returned: bytes [start, len) of |buf|
 * are plaintext received and not yet consumed. Every byte is wiped when
 * consumed or dropped (answers may carry key material). */
struct kr__readahead {
    uint8_t *buf;
    size_t start, len, cap;
};

/* Room for at least |want| more bytes (the unread bytes move to the front
 * and what they leave is wiped): *at and *room say where and how much.
 * Write into it, then add what was written to ra->len. 0 or KR_ENOMEM. */
int kr__readahead_room(struct kr__readahead *ra, size_t want, uint8_t **at, size_t *room);
/* The next answer, consumed and its bytes wiped: 1 with *out; 0 when its
 * frame is not whole yet (*missing: how many more bytes it needs, >= 1);
 * KR_ETOOBIG when the frame's length is over |max_frame| (nothing consumed);
 * KR_EPROTO when the frame does not parse as a Response (consumed). *frame_len
 * is the frame's length whenever it is known. */
int kr__readahead_next(struct kr__readahead *ra, uint32_t max_frame, Keyraft__Response **out,
                       size_t *missing, uint32_t *frame_len);
/* Wipes and forgets the unread bytes; a buffer grown past |keep| bytes is
 * freed. kr__readahead_drop(ra, 0) releases everything. */
void kr__readahead_drop(struct kr__readahead *ra, size_t keep);

#endif
