/* cli_json.c: generic protobuf-c message to jansson conversion for --json. */
#include "cli_json.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

char *cli_base64(const uint8_t *data, size_t len)
{
    /* EVP_EncodeBlock takes an int length; frames are capped far below. */
    if (len > (size_t)INT32_MAX / 4 * 3)
        return NULL;
    char *out = malloc(4 * ((len + 2) / 3) + 1);
    if (out == NULL)
        return NULL;
    EVP_EncodeBlock((unsigned char *)out, data, (int)len);
    return out;
}

static json_t *json_enum(const ProtobufCEnumDescriptor *ed, int value)
{
    if (strcmp(ed->name, "keyraft.Algorithm") == 0)
        return json_string(kr_alg_name((Keyraft__Algorithm)value));
    if (strcmp(ed->name, "keyraft.KeyState") == 0)
        return json_string(kr_state_name((Keyraft__KeyState)value));
    if (strcmp(ed->name, "keyraft.RevokeReason") == 0)
        return json_string(kr_reason_name((Keyraft__RevokeReason)value));
    const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(ed, value);
    return ev != NULL ? json_string(ev->name) : json_integer(value);
}

static json_t *json_u64(uint64_t v)
{
    if (v > (uint64_t)INT64_MAX) { /* beyond json_int_t: keep it exact */
        char buf[24];
        snprintf(buf, sizeof(buf), "%llu", (unsigned long long)v);
        return json_string(buf);
    }
    return json_integer((json_int_t)v);
}

/* One value of field |f| stored at |p|. */
static json_t *json_value(const ProtobufCFieldDescriptor *f, const void *p)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        return json_integer(*(const int32_t *)p);
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        return json_integer(*(const uint32_t *)p);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        return json_integer(*(const int64_t *)p);
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        return json_u64(*(const uint64_t *)p);
    case PROTOBUF_C_TYPE_FLOAT:
        return json_real(*(const float *)p);
    case PROTOBUF_C_TYPE_DOUBLE:
        return json_real(*(const double *)p);
    case PROTOBUF_C_TYPE_BOOL:
        return json_boolean(*(const protobuf_c_boolean *)p);
    case PROTOBUF_C_TYPE_ENUM:
        return json_enum(f->descriptor, *(const int *)p);
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(char *const *)p;
        return json_string(s != NULL ? s : "");
    }
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *bd = p;
        char *b64 = cli_base64(bd->data, bd->len);
        if (b64 == NULL)
            return NULL;
        json_t *j = json_string(b64);
        free(b64);
        return j;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *m = *(ProtobufCMessage *const *)p;
        return m != NULL ? cli_json_message(m) : json_null();
    }
    }
    return json_null();
}

static size_t type_size(ProtobufCType t)
{
    switch (t) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        return 4;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        return 8;
    case PROTOBUF_C_TYPE_FLOAT:
        return sizeof(float);
    case PROTOBUF_C_TYPE_DOUBLE:
        return sizeof(double);
    case PROTOBUF_C_TYPE_BOOL:
        return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_ENUM:
        return sizeof(int);
    case PROTOBUF_C_TYPE_STRING:
        return sizeof(char *);
    case PROTOBUF_C_TYPE_BYTES:
        return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_MESSAGE:
        return sizeof(ProtobufCMessage *);
    }
    return 0;
}

/* Whether a singular field is set: the chosen oneof member, a proto2
 * optional with its has_ flag, a non-NULL sub-message; proto3 scalars always. */
static int field_present(const ProtobufCMessage *msg, const ProtobufCFieldDescriptor *f)
{
    const char *base = (const char *)msg;

    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
        return *(const uint32_t *)(base + f->quantifier_offset) == f->id;
    if (f->type == PROTOBUF_C_TYPE_MESSAGE)
        return *(ProtobufCMessage *const *)(base + f->offset) != NULL;
    if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->type != PROTOBUF_C_TYPE_STRING &&
        f->quantifier_offset != 0)
        return *(const protobuf_c_boolean *)(base + f->quantifier_offset) != 0;
    return 1;
}

json_t *cli_json_message(const ProtobufCMessage *msg)
{
    const ProtobufCMessageDescriptor *d = msg->descriptor;
    const char *base = (const char *)msg;
    json_t *obj = json_object();

    if (obj == NULL)
        return NULL;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        json_t *v = NULL;

        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(base + f->quantifier_offset);
            const char *arr = *(char *const *)(base + f->offset);
            size_t sz = type_size(f->type);
            v = json_array();
            for (size_t j = 0; v != NULL && j < n; j++) {
                if (json_array_append_new(v, json_value(f, arr + j * sz)) != 0) {
                    json_decref(v);
                    v = NULL;
                }
            }
        } else {
            if (!field_present(msg, f))
                continue;
            v = json_value(f, base + f->offset);
        }
        if (v == NULL || json_object_set_new(obj, f->name, v) != 0) {
            json_decref(obj);
            return NULL;
        }
    }
    return obj;
}

json_t *cli_json_result(const Keyraft__Response *resp)
{
    const ProtobufCMessageDescriptor *d = resp->base.descriptor;

    if (resp->result_case != KEYRAFT__RESPONSE__RESULT__NOT_SET) {
        const ProtobufCFieldDescriptor *f =
            protobuf_c_message_descriptor_get_field(d, (unsigned)resp->result_case);
        if (f != NULL && f->type == PROTOBUF_C_TYPE_MESSAGE) {
            const ProtobufCMessage *m =
                *(ProtobufCMessage *const *)((const char *)resp + f->offset);
            if (m != NULL)
                return cli_json_message(m);
        }
    }
    return cli_json_message(&resp->base);
}

void cli_print_flat(FILE *out, const json_t *obj)
{
    const char *key;
    json_t *v;

    json_object_foreach((json_t *)obj, key, v) {
        if (json_is_string(v)) {
            fprintf(out, "%s: %s\n", key, json_string_value(v));
        } else if (json_is_integer(v)) {
            fprintf(out, "%s: %lld\n", key, (long long)json_integer_value(v));
        } else if (json_is_boolean(v)) {
            fprintf(out, "%s: %s\n", key, json_is_true(v) ? "yes" : "no");
        } else {
            char *s = json_dumps(v, JSON_COMPACT);
            fprintf(out, "%s: %s\n", key, s != NULL ? s : "?");
            free(s);
        }
    }
}
