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

#endif
