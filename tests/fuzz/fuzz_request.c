/* fuzz_request.c: libFuzzer target for rpc_decode_request, the first parser
 * any client byte reaches. A Request that parses must re-encode to the size
 * protobuf-c announces and parse again to the same encoding. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"
#include "rpc.h"

/* protobuf-c 1.4.1 accepts field number 0 written as a non-minimal varint
 * ("80 00"), keeps it as an unknown field and re-emits it as a one-byte tag
 * that it then refuses. Inputs carrying one skip the round-trip check: the
 * defect is the library's, and keyraft must not re-encode client
 * sub-messages (see the fsmtest report); everything else is still checked. */
static int has_field0_unknown(const ProtobufCMessage *m)
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

static uint8_t *pack(const Keyraft__Request *req, size_t *out_len)
{
    size_t n = keyraft__request__get_packed_size(req);
    uint8_t *buf = malloc(n + 1);
    if (buf == NULL)
        abort();
    if (keyraft__request__pack(req, buf) != n)
        abort();
    *out_len = n;
    return buf;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > KR_MAX_FRAME)
        return 0; /* the reader never hands over more */
    Keyraft__Request *req = NULL;
    int rv = rpc_decode_request(data, size, &req);
    if (rv != 0) {
        if (rv != KR_EPROTO || req != NULL)
            abort();
        return 0;
    }
    if (has_field0_unknown(&req->base)) {
        rpc_request_free(req);
        return 0;
    }
    size_t n1 = 0, n2 = 0;
    uint8_t *b1 = pack(req, &n1);
    Keyraft__Request *again = NULL;
    if (rpc_decode_request(b1, n1, &again) != 0)
        abort();
    if (again->op_case != req->op_case || again->id != req->id)
        abort();
    uint8_t *b2 = pack(again, &n2);
    if (n1 != n2 || memcmp(b1, b2, n1) != 0)
        abort();
    free(b1);
    free(b2);
    rpc_request_free(again);
    rpc_request_free(req);
    return 0;
}
