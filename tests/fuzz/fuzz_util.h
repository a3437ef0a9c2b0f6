/* fuzz_util.h: shared by the fuzz targets. */
#ifndef KR_FUZZ_UTIL_H
#define KR_FUZZ_UTIL_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

/* protobuf-c 1.4.1 accepts field number 0 written as a non-minimal varint
 * ("80 00"), keeps it as an unknown field and re-emits it as a one-byte tag
 * that it then refuses. Inputs carrying one skip the round-trip check: the
 * defect is the library's, and keyraft must not re-encode client
 * sub-messages (see the fsmtest report); everything else is still checked. */
static inline int has_field0_unknown(const ProtobufCMessage *m)
{
    if (m == NULL)
        return 0;
    for (unsigned i = 0; i < m->n_unknown_fields; i++)
        if (m->unknown_fields[i].tag == 0)
            return 1;
    const ProtobufCMessageDescriptor *d = m->descriptor;
    const char *base = (const char *)m;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(base + f->quantifier_offset);
            ProtobufCMessage *const *arr = *(ProtobufCMessage *const *const *)(base + f->offset);
            for (size_t k = 0; k < n; k++)
                if (has_field0_unknown(arr[k]))
                    return 1;
            continue;
        }
        if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
            *(const uint32_t *)(base + f->quantifier_offset) != f->id)
            continue;
        if (has_field0_unknown(*(ProtobufCMessage *const *)(base + f->offset)))
            return 1;
    }
    return 0;
}

/* Frames: small enough that the fuzzer reaches the cap, large enough for
 * real messages; at most FUZZ_MAX_FRAMES in one input. */
#define FUZZ_MAX_FRAME (64u * 1024u)
#define FUZZ_MAX_FRAMES 4096

struct ref_frame {
    size_t off; /* of the payload, in the stream */
    size_t len;
};

static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* xorshift32: chunk sizes derived from the input, so a crash reproduces. */
static inline uint32_t next_rand(uint32_t *s)
{
    uint32_t x = *s;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *s = x;
    return x;
}

/* The reference a chunked reader must match: the whole frames a one-shot
 * parse of |stream| finds (into |ref|, which holds FUZZ_MAX_FRAMES), and in
 * *toobig whether a length over FUZZ_MAX_FRAME stopped it. */
static inline size_t ref_frames(const uint8_t *stream, size_t len, struct ref_frame *ref,
                                int *toobig)
{
    size_t n_ref = 0;
    *toobig = 0;
    for (size_t pos = 0; pos + 4 <= len && n_ref < FUZZ_MAX_FRAMES;) {
        uint32_t n = be32(stream + pos);
        if (n > FUZZ_MAX_FRAME) {
            *toobig = 1;
            break;
        }
        if (len - pos - 4 < n)
            break;
        ref[n_ref].off = pos + 4;
        ref[n_ref].len = n;
        n_ref++;
        pos += 4 + (size_t)n;
    }
    return n_ref;
}

/* A fuzz input read as a stream: the first 4 bytes seed the chunk sizes,
 * the rest is the stream, and |ref| its one-shot parse. */
struct fuzz_stream {
    uint32_t seed;
    const uint8_t *bytes;
    size_t len;
    struct ref_frame *ref; /* n_ref frames */
    size_t n_ref;
    int ref_toobig;
};

/* 0 when the input is too short or could hold more than FUZZ_MAX_FRAMES
 * frames (skip it), else 1 with *fs filled. Not reentrant (one static
 * reference table), as libFuzzer runs one input at a time. */
static inline int fuzz_stream_open(const uint8_t *data, size_t size, struct fuzz_stream *fs)
{
    static struct ref_frame ref[FUZZ_MAX_FRAMES];
    if (size < 4 || size > 4 + 4 * (size_t)FUZZ_MAX_FRAMES)
        return 0;
    fs->seed = be32(data) | 1u;
    fs->bytes = data + 4;
    fs->len = size - 4;
    fs->ref = ref;
    fs->n_ref = ref_frames(fs->bytes, fs->len, ref, &fs->ref_toobig);
    return 1;
}

#endif
