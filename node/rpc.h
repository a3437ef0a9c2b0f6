/* rpc.h: framing of the client protocol: 4-byte big-endian length + one
 * protobuf message. Pure functions over buffers; no I/O. */
#ifndef KR_RPC_H
#define KR_RPC_H

#include <stddef.h>
#include <stdint.h>

#include "keyraft.pb-c.h"

/* Accumulates stream bytes and yields whole frames. */
struct rpc_reader {
    uint8_t *buf;
    size_t start; /* first unconsumed byte */
    size_t len;   /* bytes held, from 0 */
    size_t cap;
    uint32_t max_frame;
};

void rpc_reader_init(struct rpc_reader *reader, uint32_t max_frame);
/* Wipes (requests may carry key material) and frees. */
void rpc_reader_cleanup(struct rpc_reader *reader);

/* Appends bytes. KR_ENOMEM; the reader never holds more than one frame plus
 * what was fed beyond it. */
int rpc_reader_feed(struct rpc_reader *reader, const uint8_t *data, size_t len);

/* 1 and a borrowed view of the next whole frame's payload (valid until the
 * next feed or next call); 0 when more bytes are needed; KR_ETOOBIG when the
 * announced length exceeds max_frame (the stream cannot be resynchronised). */
int rpc_reader_next(struct rpc_reader *reader, const uint8_t **payload, size_t *len);

struct pb_arena;

/* The most memory a request of |len| bytes may decode to. */
#define RPC_DECODED_LIMIT(len) (16u * (size_t)(len) + 4u * 1024u * 1024u)

/* Parses a Request payload into a new arena (pbarena.h): *out lives in
 * *arena and is valid until pb_arena_free(*arena), which wipes it (requests
 * carry plaintexts and key material); never free *out itself, nor any part
 * of it. KR_EPROTO when it does not parse, KR_ETOOBIG when it would decode
 * to more than RPC_DECODED_LIMIT, KR_ENOMEM; each leaves *out and *arena
 * NULL. |len| is at most a frame ([limits] max_frame, 64 MB at most). */
int rpc_decode_request(const uint8_t *payload, size_t len, Keyraft__Request **out,
                       struct pb_arena **arena);

/* Frees a request unpacked with protobuf-c's default allocator (malloc),
 * wiping each block first. Not for requests from rpc_decode_request. */
void rpc_request_free(Keyraft__Request *req);

/* Serialises |resp| with its length prefix into a malloc'd buffer. */
int rpc_encode_response(const Keyraft__Response *resp, uint8_t **out, size_t *out_len);
/* Bytes the framed |resp| takes (header included), and the same encoding into
 * |buf|, which holds at least that many: no copy for a caller with room. */
size_t rpc_response_frame_size(const Keyraft__Response *resp);
void rpc_encode_response_into(const Keyraft__Response *resp, size_t frame_size, uint8_t *buf);

#endif
