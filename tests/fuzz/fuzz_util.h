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

#endif
