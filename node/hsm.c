/* hsm.c: the node's PKCS#11 token through p11-kit: token setup, one logged-in
 * session per handle, AES-256-GCM under the MWK inside the token, and the
 * HSM-to-HSM copy of the MWK to a new node's token (RSA-OAEP key transport). */
#include "hsm.h"

#define KR_LOG_MODULE "hsm"
#include <p11-kit/pkcs11.h>
#include <p11-kit/p11-kit.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "keyraft.h"
#include "log.h"
#include "secmem.h"

#define HSM_LABEL_LEN 32 /* CK_TOKEN_INFO.label: blank padded, not terminated */
#define HSM_MWK_LEN 32
#define HSM_GCM_OVERHEAD (HSM_GCM_IV_LEN + HSM_GCM_TAG_LEN)
#define HSM_OBJECT_LABEL_MAX 128 /* CKA_LABEL of keys: ours, so capped */
#define HSM_TRANSPORT_BITS 2048
#define HSM_RSA_MIN_BITS 2048
#define HSM_RSA_MAX_BITS 8192
#define HSM_RSA_MAX_BYTES (HSM_RSA_MAX_BITS / 8) /* also the largest blob */
#define HSM_SPKI_MAX 4096                         /* DER of an 8192-bit RSA key is ~1.1 KB */
#define HSM_AUDIT_SUFFIX "-audit"
#define HSM_P256_COORD 32

struct hsm {
    CK_FUNCTION_LIST *module;
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE mwk; /* cached; CK_INVALID_HANDLE until looked up */
    char *mwk_label;
    /* The audit signing key pair (mwk_label + "-audit"), cached like the MWK. */
    CK_OBJECT_HANDLE audit_priv, audit_pub;
    char *audit_label;
    int lock_ready;
    /* A PKCS#11 session runs one operation at a time; callers are worker threads. */
    pthread_mutex_t lock;
};

static const char *ckr_name(CK_RV rv)
{
    switch (rv) {
#define CKR_CASE(c) \
    case c:         \
        return #c
        CKR_CASE(CKR_OK);
        CKR_CASE(CKR_CANCEL);
        CKR_CASE(CKR_HOST_MEMORY);
        CKR_CASE(CKR_SLOT_ID_INVALID);
        CKR_CASE(CKR_GENERAL_ERROR);
        CKR_CASE(CKR_FUNCTION_FAILED);
        CKR_CASE(CKR_ARGUMENTS_BAD);
        CKR_CASE(CKR_CANT_LOCK);
        CKR_CASE(CKR_ATTRIBUTE_READ_ONLY);
        CKR_CASE(CKR_ATTRIBUTE_SENSITIVE);
        CKR_CASE(CKR_ATTRIBUTE_TYPE_INVALID);
        CKR_CASE(CKR_ATTRIBUTE_VALUE_INVALID);
        CKR_CASE(CKR_ACTION_PROHIBITED);
        CKR_CASE(CKR_DATA_INVALID);
        CKR_CASE(CKR_DATA_LEN_RANGE);
        CKR_CASE(CKR_DEVICE_ERROR);
        CKR_CASE(CKR_DEVICE_MEMORY);
        CKR_CASE(CKR_DEVICE_REMOVED);
        CKR_CASE(CKR_ENCRYPTED_DATA_INVALID);
        CKR_CASE(CKR_ENCRYPTED_DATA_LEN_RANGE);
        CKR_CASE(CKR_FUNCTION_CANCELED);
        CKR_CASE(CKR_FUNCTION_NOT_SUPPORTED);
        CKR_CASE(CKR_KEY_HANDLE_INVALID);
        CKR_CASE(CKR_KEY_SIZE_RANGE);
        CKR_CASE(CKR_KEY_TYPE_INCONSISTENT);
        CKR_CASE(CKR_KEY_FUNCTION_NOT_PERMITTED);
        CKR_CASE(CKR_KEY_NOT_WRAPPABLE);
        CKR_CASE(CKR_KEY_UNEXTRACTABLE);
        CKR_CASE(CKR_MECHANISM_INVALID);
        CKR_CASE(CKR_MECHANISM_PARAM_INVALID);
        CKR_CASE(CKR_OBJECT_HANDLE_INVALID);
        CKR_CASE(CKR_OPERATION_ACTIVE);
        CKR_CASE(CKR_OPERATION_NOT_INITIALIZED);
        CKR_CASE(CKR_PIN_INCORRECT);
        CKR_CASE(CKR_PIN_INVALID);
        CKR_CASE(CKR_PIN_LEN_RANGE);
        CKR_CASE(CKR_PIN_EXPIRED);
        CKR_CASE(CKR_PIN_LOCKED);
        CKR_CASE(CKR_SESSION_CLOSED);
        CKR_CASE(CKR_SESSION_COUNT);
        CKR_CASE(CKR_SESSION_HANDLE_INVALID);
        CKR_CASE(CKR_SESSION_READ_ONLY);
        CKR_CASE(CKR_SESSION_EXISTS);
        CKR_CASE(CKR_SESSION_READ_ONLY_EXISTS);
        CKR_CASE(CKR_SESSION_READ_WRITE_SO_EXISTS);
        CKR_CASE(CKR_TEMPLATE_INCOMPLETE);
        CKR_CASE(CKR_TEMPLATE_INCONSISTENT);
        CKR_CASE(CKR_TOKEN_NOT_PRESENT);
        CKR_CASE(CKR_TOKEN_NOT_RECOGNIZED);
        CKR_CASE(CKR_TOKEN_WRITE_PROTECTED);
        CKR_CASE(CKR_USER_ALREADY_LOGGED_IN);
        CKR_CASE(CKR_USER_NOT_LOGGED_IN);
        CKR_CASE(CKR_USER_PIN_NOT_INITIALIZED);
        CKR_CASE(CKR_USER_TYPE_INVALID);
        CKR_CASE(CKR_USER_ANOTHER_ALREADY_LOGGED_IN);
        CKR_CASE(CKR_USER_TOO_MANY_TYPES);
        CKR_CASE(CKR_RANDOM_NO_RNG);
        CKR_CASE(CKR_BUFFER_TOO_SMALL);
        CKR_CASE(CKR_CRYPTOKI_NOT_INITIALIZED);
        CKR_CASE(CKR_CRYPTOKI_ALREADY_INITIALIZED);
        CKR_CASE(CKR_LIBRARY_LOAD_FAILED);
        CKR_CASE(CKR_PIN_TOO_WEAK);
        CKR_CASE(CKR_FUNCTION_REJECTED);
        CKR_CASE(CKR_UNWRAPPING_KEY_HANDLE_INVALID);
        CKR_CASE(CKR_UNWRAPPING_KEY_SIZE_RANGE);
        CKR_CASE(CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT);
        CKR_CASE(CKR_WRAPPED_KEY_INVALID);
        CKR_CASE(CKR_WRAPPED_KEY_LEN_RANGE);
        CKR_CASE(CKR_WRAPPING_KEY_HANDLE_INVALID);
        CKR_CASE(CKR_WRAPPING_KEY_SIZE_RANGE);
        CKR_CASE(CKR_WRAPPING_KEY_TYPE_INCONSISTENT);
#undef CKR_CASE
    default:
        return rv >= CKR_VENDOR_DEFINED ? "CKR_VENDOR_DEFINED" : "CKR_unknown";
    }
}

static int ckr_to_kr(CK_RV rv)
{
    switch (rv) {
    case CKR_HOST_MEMORY:
    case CKR_DEVICE_MEMORY:
        return KR_ENOMEM;
    case CKR_PIN_INCORRECT:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_LOCKED:
        return KR_EPERM;
    default:
        return KR_EHSM;
    }
}

/* Logs a failed PKCS#11 call once, at the layer that knows what it was for,
 * and returns the matching KR_E* code. */
static int ck_fail(const char *fn, CK_RV rv, const char *what)
{
    log_error("%s (%s): %s (0x%lx)", fn, what, ckr_name(rv), (unsigned long)rv);
    return ckr_to_kr(rv);
}

static int module_open(const char *path, CK_FUNCTION_LIST **out)
{
    /* Managed by p11-kit: several handles (and other libraries) in one process
     * may initialise and finalise the same module independently. */
    CK_FUNCTION_LIST *module = p11_kit_module_load(path, 0);
    if (module == NULL) {
        const char *msg = p11_kit_message();
        log_error("cannot load PKCS#11 module %s: %s", path, msg ? msg : "unknown error");
        return KR_EHSM;
    }
    CK_RV rv = p11_kit_module_initialize(module);
    if (rv != CKR_OK) {
        int rc = ck_fail("C_Initialize", rv, path);
        p11_kit_module_release(module);
        return rc;
    }
    *out = module;
    return 0;
}

static void module_close(CK_FUNCTION_LIST *module)
{
    if (module == NULL)
        return;
    p11_kit_module_finalize(module);
    p11_kit_module_release(module);
}

static int label_valid(const char *label)
{
    size_t n = label ? strlen(label) : 0;
    return n > 0 && n <= HSM_LABEL_LEN;
}

static int label_matches(const CK_UTF8CHAR field[HSM_LABEL_LEN], const char *label)
{
    size_t n = HSM_LABEL_LEN;
    while (n > 0 && (field[n - 1] == ' ' || field[n - 1] == '\0'))
        n--;
    return strlen(label) == n && memcmp(field, label, n) == 0;
}

/* Slots with a token present. *out is malloc'd. */
static int list_slots(CK_FUNCTION_LIST *m, CK_SLOT_ID **out, CK_ULONG *out_n)
{
    CK_SLOT_ID *slots = NULL;
    CK_ULONG n = 0;
    CK_RV rv;
    /* The list may grow between the two calls (a token appears): retry. */
    for (int attempt = 0; attempt < 4; attempt++) {
        rv = m->C_GetSlotList(CK_TRUE, NULL, &n);
        if (rv != CKR_OK)
            return ck_fail("C_GetSlotList", rv, "count");
        free(slots);
        slots = calloc(n ? n : 1, sizeof(*slots));
        if (slots == NULL)
            return KR_ENOMEM;
        rv = m->C_GetSlotList(CK_TRUE, slots, &n);
        if (rv != CKR_BUFFER_TOO_SMALL)
            break;
    }
    if (rv != CKR_OK) {
        free(slots);
        return ck_fail("C_GetSlotList", rv, "list");
    }
    *out = slots;
    *out_n = n;
    return 0;
}

/* With |label|: the slot of the initialised token so labelled (KR_ENOTFOUND
 * when none). With NULL: the first slot whose token is not initialised. */
static int find_slot(CK_FUNCTION_LIST *m, const char *label, CK_SLOT_ID *out)
{
    CK_SLOT_ID *slots = NULL;
    CK_ULONG n = 0;
    int found = 0;
    CK_SLOT_ID slot = 0;
    int rc = list_slots(m, &slots, &n);
    if (rc != 0)
        return rc;
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        CK_RV rv = m->C_GetTokenInfo(slots[i], &info);
        if (rv != CKR_OK) {
            log_warn("C_GetTokenInfo (slot %lu): %s (0x%lx); skipping the slot",
                     (unsigned long)slots[i], ckr_name(rv), (unsigned long)rv);
            continue;
        }
        int initialised = (info.flags & CKF_TOKEN_INITIALIZED) != 0;
        if (label == NULL ? initialised : !initialised || !label_matches(info.label, label))
            continue;
        if (label != NULL && found) {
            log_error("two tokens are labelled \"%s\" (slots %lu and %lu)", label,
                      (unsigned long)slot, (unsigned long)slots[i]);
            rc = KR_EHSM;
            goto out;
        }
        slot = slots[i];
        found = 1;
        if (label == NULL)
            break;
    }
    if (!found) {
        rc = KR_ENOTFOUND;
        goto out;
    }
    *out = slot;
out:
    free(slots);
    return rc;
}

int hsm_init_token(const char *module_path, const char *token_label, const char *so_pin,
                   const char *pin)
{
    CK_FUNCTION_LIST *m = NULL;
    CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
    int logged_in = 0;
    CK_SLOT_ID slot = 0;
    CK_UTF8CHAR padded[HSM_LABEL_LEN];
    CK_RV rv;
    int rc;

    if (module_path == NULL || !label_valid(token_label) || so_pin == NULL || pin == NULL ||
        so_pin[0] == '\0' || pin[0] == '\0') {
        log_error("hsm_init_token: module path, a label of 1 to 32 bytes and both PINs are needed");
        return KR_EINVAL;
    }
    memset(padded, ' ', sizeof(padded));
    memcpy(padded, token_label, strlen(token_label));

    rc = module_open(module_path, &m);
    if (rc != 0)
        goto out;
    rc = find_slot(m, token_label, &slot);
    if (rc == 0) {
        log_error("a token labelled \"%s\" already exists (slot %lu)", token_label,
                  (unsigned long)slot);
        rc = KR_EEXIST;
        goto out;
    }
    if (rc != KR_ENOTFOUND)
        goto out;
    rc = find_slot(m, NULL, &slot);
    if (rc == KR_ENOTFOUND) {
        log_error("no free slot for token \"%s\" in %s", token_label, module_path);
        rc = KR_EHSM;
    }
    if (rc != 0)
        goto out;

    rv = m->C_InitToken(slot, (CK_UTF8CHAR *)so_pin, strlen(so_pin), padded);
    if (rv != CKR_OK) {
        rc = ck_fail("C_InitToken", rv, token_label);
        goto out;
    }
    /* SoftHSM moves a freshly initialised token to a new slot id. */
    rc = find_slot(m, token_label, &slot);
    if (rc != 0) {
        log_error("token \"%s\" not found right after C_InitToken", token_label);
        goto out;
    }
    rv = m->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session);
    if (rv != CKR_OK) {
        rc = ck_fail("C_OpenSession", rv, token_label);
        goto out;
    }
    rv = m->C_Login(session, CKU_SO, (CK_UTF8CHAR *)so_pin, strlen(so_pin));
    if (rv != CKR_OK) {
        rc = ck_fail("C_Login", rv, "security officer");
        goto out;
    }
    logged_in = 1;
    rv = m->C_InitPIN(session, (CK_UTF8CHAR *)pin, strlen(pin));
    if (rv != CKR_OK) {
        rc = ck_fail("C_InitPIN", rv, token_label);
        goto out;
    }
    log_info("initialised token \"%s\"", token_label);
    rc = 0;
out:
    if (logged_in)
        m->C_Logout(session);
    if (session != CK_INVALID_HANDLE)
        m->C_CloseSession(session);
    module_close(m);
    return rc;
}

int hsm_open(const struct hsm_config *config, struct hsm **out)
{
    struct hsm *hsm = NULL;
    CK_SLOT_ID slot = 0;
    CK_RV rv;
    int rc;

    if (config == NULL || out == NULL || config->module_path == NULL ||
        !label_valid(config->token_label) || config->pin == NULL ||
        config->mwk_label == NULL || config->mwk_label[0] == '\0') {
        log_error("hsm_open: module path, token label (1 to 32 bytes), PIN and MWK label are needed");
        return KR_EINVAL;
    }
    hsm = calloc(1, sizeof(*hsm));
    if (hsm == NULL)
        return KR_ENOMEM;
    hsm->session = CK_INVALID_HANDLE;
    hsm->mwk = CK_INVALID_HANDLE;
    hsm->audit_priv = hsm->audit_pub = CK_INVALID_HANDLE;
    hsm->mwk_label = strdup(config->mwk_label);
    if (hsm->mwk_label == NULL ||
        asprintf(&hsm->audit_label, "%s%s", config->mwk_label, HSM_AUDIT_SUFFIX) < 0) {
        hsm->audit_label = NULL;
        rc = KR_ENOMEM;
        goto out;
    }
    if (pthread_mutex_init(&hsm->lock, NULL) != 0) {
        rc = KR_EINTERNAL;
        goto out;
    }
    hsm->lock_ready = 1;

    rc = module_open(config->module_path, &hsm->module);
    if (rc != 0)
        goto out;
    rc = find_slot(hsm->module, config->token_label, &slot);
    if (rc == KR_ENOTFOUND)
        log_error("no token labelled \"%s\" in %s", config->token_label, config->module_path);
    if (rc != 0)
        goto out;
    rv = hsm->module->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
                                    &hsm->session);
    if (rv != CKR_OK) {
        hsm->session = CK_INVALID_HANDLE;
        rc = ck_fail("C_OpenSession", rv, config->token_label);
        goto out;
    }
    rv = hsm->module->C_Login(hsm->session, CKU_USER, (CK_UTF8CHAR *)config->pin,
                              strlen(config->pin));
    /* Login is per application, not per session: another handle of this
     * process may already hold it. */
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        rc = ck_fail("C_Login", rv, config->token_label);
        goto out;
    }
    *out = hsm;
    hsm = NULL;
    rc = 0;
out:
    hsm_close(hsm);
    return rc;
}

void hsm_close(struct hsm *hsm)
{
    if (hsm == NULL)
        return;
    /* No C_Logout: login belongs to the whole process, and closing its last
     * session logs the token out; an explicit logout would also log out any
     * other handle on the same token. */
    if (hsm->session != CK_INVALID_HANDLE)
        hsm->module->C_CloseSession(hsm->session);
    module_close(hsm->module);
    if (hsm->lock_ready)
        pthread_mutex_destroy(&hsm->lock);
    free(hsm->mwk_label);
    free(hsm->audit_label);
    free(hsm);
}

/* Up to |cap| objects matching |tmpl| into |found|; their number in *out_n. */
static int find_objects(CK_FUNCTION_LIST *m, CK_SESSION_HANDLE session, CK_ATTRIBUTE *tmpl,
                        CK_ULONG n_tmpl, const char *what, CK_OBJECT_HANDLE *found, CK_ULONG cap,
                        CK_ULONG *out_n)
{
    CK_ULONG n = 0;
    CK_RV rv = m->C_FindObjectsInit(session, tmpl, n_tmpl);
    if (rv != CKR_OK)
        return ck_fail("C_FindObjectsInit", rv, what);
    rv = m->C_FindObjects(session, found, cap, &n);
    CK_RV final_rv = m->C_FindObjectsFinal(session);
    if (rv != CKR_OK)
        return ck_fail("C_FindObjects", rv, what);
    if (final_rv != CKR_OK)
        return ck_fail("C_FindObjectsFinal", final_rv, what);
    *out_n = n;
    return 0;
}

/* The one object matching |tmpl|: KR_ENOTFOUND when none, KR_EHSM when
 * several (refusing to guess which is meant). |kind| and |label| name it. */
static int find_one(CK_FUNCTION_LIST *m, CK_SESSION_HANDLE session, CK_ATTRIBUTE *tmpl,
                    CK_ULONG n_tmpl, const char *kind, const char *label, CK_OBJECT_HANDLE *out)
{
    CK_OBJECT_HANDLE found[2];
    CK_ULONG n = 0;
    int rc = find_objects(m, session, tmpl, n_tmpl, label, found, 2, &n);
    if (rc != 0)
        return rc;
    if (n == 0)
        return KR_ENOTFOUND;
    if (n > 1) {
        log_error("more than one %s is labelled \"%s\": refusing to guess", kind, label);
        return KR_EHSM;
    }
    *out = found[0];
    return 0;
}

/* The MWK by label, in any session of the token. KR_ENOTFOUND when absent. */
static int mwk_find(CK_FUNCTION_LIST *m, CK_SESSION_HANDLE session, const char *label,
                    CK_OBJECT_HANDLE *out)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_LABEL, (void *)label, strlen(label)},
    };
    return find_one(m, session, tmpl, sizeof(tmpl) / sizeof(tmpl[0]), "AES key (MWK)", label,
                    out);
}

/* Looks the MWK up by label. Caller holds the lock. KR_ENOTFOUND when absent. */
static int mwk_lookup_locked(struct hsm *hsm, CK_OBJECT_HANDLE *out)
{
    return mwk_find(hsm->module, hsm->session, hsm->mwk_label, out);
}

/* The cached MWK handle, looked up on first use. Caller holds the lock. */
static int mwk_handle_locked(struct hsm *hsm, CK_OBJECT_HANDLE *out)
{
    if (hsm->mwk == CK_INVALID_HANDLE) {
        CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
        int rc = mwk_lookup_locked(hsm, &key);
        if (rc == KR_ENOTFOUND)
            log_error("no MWK labelled \"%s\" on the token", hsm->mwk_label);
        if (rc != 0)
            return rc;
        hsm->mwk = key;
    }
    *out = hsm->mwk;
    return 0;
}

int hsm_find_mwk(struct hsm *hsm)
{
    if (hsm == NULL)
        return KR_EINVAL;
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    pthread_mutex_lock(&hsm->lock);
    /* Always ask the token: the key may have been created or destroyed since. */
    int rc = mwk_lookup_locked(hsm, &key);
    hsm->mwk = rc == 0 ? key : CK_INVALID_HANDLE;
    pthread_mutex_unlock(&hsm->lock);
    return rc;
}

/* The MWK's attributes, one policy for a generated key and for a copy made
 * HSM to HSM: sensitive (never readable in plaintext), extractable only
 * under a trusted wrapping key (the copy to a new node), used for GCM only. */
#define MWK_POLICY_ATTRS 15
static void mwk_policy(CK_ATTRIBUTE *t, const char *label)
{
    static const CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    static const CK_KEY_TYPE type = CKK_AES;
    static const CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    const CK_ATTRIBUTE policy[MWK_POLICY_ATTRS] = {
        {CKA_CLASS, (void *)&cls, sizeof(cls)},
        {CKA_KEY_TYPE, (void *)&type, sizeof(type)},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_TOKEN, (void *)&yes, sizeof(yes)},
        {CKA_PRIVATE, (void *)&yes, sizeof(yes)},
        {CKA_SENSITIVE, (void *)&yes, sizeof(yes)},
        {CKA_EXTRACTABLE, (void *)&yes, sizeof(yes)},
        {CKA_WRAP_WITH_TRUSTED, (void *)&yes, sizeof(yes)},
        {CKA_ENCRYPT, (void *)&yes, sizeof(yes)},
        {CKA_DECRYPT, (void *)&yes, sizeof(yes)},
        {CKA_WRAP, (void *)&no, sizeof(no)},
        {CKA_UNWRAP, (void *)&no, sizeof(no)},
        {CKA_SIGN, (void *)&no, sizeof(no)},
        {CKA_VERIFY, (void *)&no, sizeof(no)},
        {CKA_DERIVE, (void *)&no, sizeof(no)},
    };
    memcpy(t, policy, sizeof(policy));
}

int hsm_generate_mwk(struct hsm *hsm)
{
    if (hsm == NULL)
        return KR_EINVAL;
    CK_ULONG len = HSM_MWK_LEN;
    CK_ATTRIBUTE tmpl[MWK_POLICY_ATTRS + 1];
    mwk_policy(tmpl, hsm->mwk_label);
    tmpl[MWK_POLICY_ATTRS] = (CK_ATTRIBUTE){CKA_VALUE_LEN, &len, sizeof(len)};
    CK_MECHANISM mech = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;

    pthread_mutex_lock(&hsm->lock);
    int rc = mwk_lookup_locked(hsm, &key);
    if (rc == 0) {
        log_error("an MWK labelled \"%s\" already exists", hsm->mwk_label);
        hsm->mwk = key;
        rc = KR_EEXIST;
        goto out;
    }
    if (rc != KR_ENOTFOUND)
        goto out;
    CK_RV rv = hsm->module->C_GenerateKey(hsm->session, &mech, tmpl,
                                          sizeof(tmpl) / sizeof(tmpl[0]), &key);
    if (rv != CKR_OK) {
        rc = ck_fail("C_GenerateKey", rv, hsm->mwk_label);
        goto out;
    }
    hsm->mwk = key;
    log_info("generated MWK \"%s\" in the token", hsm->mwk_label);
    rc = 0;
out:
    pthread_mutex_unlock(&hsm->lock);
    return rc;
}

/* C_EncryptInit / C_DecryptInit with the MWK. A cached handle goes stale when
 * the key was replaced behind us: look it up once more. Caller holds the lock. */
static int gcm_init_locked(struct hsm *hsm, int encrypt, CK_MECHANISM *mech)
{
    CK_FUNCTION_LIST *m = hsm->module;
    const char *fn = encrypt ? "C_EncryptInit" : "C_DecryptInit";
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    CK_RV rv = CKR_OK;
    for (int attempt = 0; attempt < 2; attempt++) {
        int rc = mwk_handle_locked(hsm, &key);
        if (rc != 0)
            return rc;
        rv = encrypt ? m->C_EncryptInit(hsm->session, mech, key)
                     : m->C_DecryptInit(hsm->session, mech, key);
        if (rv != CKR_KEY_HANDLE_INVALID && rv != CKR_OBJECT_HANDLE_INVALID)
            break;
        hsm->mwk = CK_INVALID_HANDLE;
    }
    if (rv != CKR_OK)
        return ck_fail(fn, rv, hsm->mwk_label);
    return 0;
}

int hsm_mwk_encrypt(struct hsm *hsm, const uint8_t *aad, size_t aad_len, const uint8_t *pt,
                    size_t pt_len, uint8_t **out, size_t *out_len)
{
    if (hsm == NULL || out == NULL || out_len == NULL || (aad == NULL && aad_len > 0) ||
        (pt == NULL && pt_len > 0) || pt_len > SIZE_MAX - HSM_GCM_OVERHEAD)
        return KR_EINVAL;
    uint8_t *buf = malloc(pt_len + HSM_GCM_OVERHEAD);
    if (buf == NULL)
        return KR_ENOMEM;
    CK_GCM_PARAMS params = {
        .pIv = buf,
        .ulIvLen = HSM_GCM_IV_LEN,
        .ulIvBits = HSM_GCM_IV_LEN * 8,
        .pAAD = (CK_BYTE *)aad,
        .ulAADLen = aad_len,
        .ulTagBits = HSM_GCM_TAG_LEN * 8,
    };
    CK_MECHANISM mech = {CKM_AES_GCM, &params, sizeof(params)};
    CK_ULONG ct_len = pt_len + HSM_GCM_TAG_LEN;
    CK_BYTE empty = 0;
    CK_RV rv;
    int rc;

    pthread_mutex_lock(&hsm->lock);
    rv = hsm->module->C_GenerateRandom(hsm->session, buf, HSM_GCM_IV_LEN);
    if (rv != CKR_OK) {
        rc = ck_fail("C_GenerateRandom", rv, "GCM IV");
        goto out;
    }
    rc = gcm_init_locked(hsm, 1, &mech);
    if (rc != 0)
        goto out;
    /* The buffer is exactly ciphertext + tag, so the operation always ends
     * here. SoftHSM refuses a NULL input even when it is empty. */
    rv = hsm->module->C_Encrypt(hsm->session, pt_len ? (CK_BYTE *)pt : &empty, pt_len,
                                buf + HSM_GCM_IV_LEN, &ct_len);
    if (rv != CKR_OK) {
        rc = ck_fail("C_Encrypt", rv, hsm->mwk_label);
        goto out;
    }
    if (ct_len != pt_len + HSM_GCM_TAG_LEN) {
        log_error("C_Encrypt (%s): %lu bytes out for %zu in", hsm->mwk_label,
                  (unsigned long)ct_len, pt_len);
        rc = KR_EHSM;
        goto out;
    }
    *out = buf;
    *out_len = pt_len + HSM_GCM_OVERHEAD;
    buf = NULL;
    rc = 0;
out:
    pthread_mutex_unlock(&hsm->lock);
    free(buf);
    return rc;
}

int hsm_mwk_decrypt(struct hsm *hsm, const uint8_t *aad, size_t aad_len, const uint8_t *in,
                    size_t in_len, uint8_t *out, size_t *out_len)
{
    if (hsm == NULL || out_len == NULL || (aad == NULL && aad_len > 0) ||
        (in == NULL && in_len > 0) || (out == NULL && in_len > HSM_GCM_OVERHEAD))
        return KR_EINVAL;
    if (in_len < HSM_GCM_OVERHEAD) {
        log_warn("MWK blob of %zu bytes is shorter than IV and tag: it does not open", in_len);
        return KR_EAUTH;
    }
    size_t pt_len = in_len - HSM_GCM_OVERHEAD;
    /* Modules differ on how much room they demand for GCM output (some want
     * ciphertext + tag): decrypt into a secure buffer that has it. */
    uint8_t *tmp = secmem_alloc(in_len);
    if (tmp == NULL)
        return KR_ENOMEM;
    CK_GCM_PARAMS params = {
        .pIv = (CK_BYTE *)in,
        .ulIvLen = HSM_GCM_IV_LEN,
        .ulIvBits = HSM_GCM_IV_LEN * 8,
        .pAAD = (CK_BYTE *)aad,
        .ulAADLen = aad_len,
        .ulTagBits = HSM_GCM_TAG_LEN * 8,
    };
    CK_MECHANISM mech = {CKM_AES_GCM, &params, sizeof(params)};
    CK_ULONG got = in_len;
    CK_RV rv;
    int rc;

    pthread_mutex_lock(&hsm->lock);
    rc = gcm_init_locked(hsm, 0, &mech);
    if (rc != 0)
        goto out;
    rv = hsm->module->C_Decrypt(hsm->session, (CK_BYTE *)in + HSM_GCM_IV_LEN,
                                in_len - HSM_GCM_IV_LEN, tmp, &got);
    if (rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_ENCRYPTED_DATA_LEN_RANGE ||
        rv == CKR_FUNCTION_FAILED || rv == CKR_GENERAL_ERROR) {
        /* SoftHSM reports a GCM tag mismatch as CKR_GENERAL_ERROR. */
        log_warn("C_Decrypt (%s): %s (0x%lx): wrong AAD or tampered blob", hsm->mwk_label,
                 ckr_name(rv), (unsigned long)rv);
        rc = KR_EAUTH;
        goto out;
    }
    if (rv != CKR_OK) {
        rc = ck_fail("C_Decrypt", rv, hsm->mwk_label);
        goto out;
    }
    if (got != pt_len) {
        log_error("C_Decrypt (%s): %lu bytes out for %zu expected", hsm->mwk_label,
                  (unsigned long)got, pt_len);
        rc = KR_EHSM;
        goto out;
    }
    if (pt_len > 0)
        memcpy(out, tmp, pt_len);
    *out_len = pt_len;
    rc = 0;
out:
    pthread_mutex_unlock(&hsm->lock);
    secmem_free(tmp, in_len);
    return rc;
}

int hsm_random(struct hsm *hsm, uint8_t *out, size_t len)
{
    if (hsm == NULL || (out == NULL && len > 0))
        return KR_EINVAL;
    if (len == 0)
        return 0;
    pthread_mutex_lock(&hsm->lock);
    CK_RV rv = hsm->module->C_GenerateRandom(hsm->session, out, len);
    pthread_mutex_unlock(&hsm->lock);
    if (rv != CKR_OK)
        return ck_fail("C_GenerateRandom", rv, "random bytes");
    return 0;
}

/* --- MWK copy, HSM to HSM ----------------------------------------------------- */

static int object_label_valid(const char *label)
{
    size_t n = label ? strlen(label) : 0;
    return n > 0 && n <= HSM_OBJECT_LABEL_MAX;
}

/* Reads one variable-length attribute into a malloc'd buffer. */
static int get_attribute(CK_FUNCTION_LIST *m, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE obj,
                         CK_ATTRIBUTE_TYPE type, const char *what, uint8_t **out,
                         size_t *out_len)
{
    CK_ATTRIBUTE attr = {type, NULL, 0};
    CK_RV rv = m->C_GetAttributeValue(session, obj, &attr, 1);
    if (rv != CKR_OK)
        return ck_fail("C_GetAttributeValue", rv, what);
    if (attr.ulValueLen == 0 || attr.ulValueLen > HSM_RSA_MAX_BYTES) {
        log_error("C_GetAttributeValue (%s): %lu bytes", what, (unsigned long)attr.ulValueLen);
        return KR_EHSM;
    }
    uint8_t *buf = malloc(attr.ulValueLen);
    if (buf == NULL)
        return KR_ENOMEM;
    attr.pValue = buf;
    rv = m->C_GetAttributeValue(session, obj, &attr, 1);
    if (rv != CKR_OK) {
        free(buf);
        return ck_fail("C_GetAttributeValue", rv, what);
    }
    *out = buf;
    *out_len = attr.ulValueLen;
    return 0;
}

/* DER SubjectPublicKeyInfo (malloc'd) of the |type| ("RSA", "EC") public key
 * that |params| describe; |what| names it in the log on failure. */
static int spki_from_params(const char *type, const OSSL_PARAM *params, const char *what,
                            uint8_t **out, size_t *out_len)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, type, NULL);
    EVP_PKEY *pkey = NULL;
    uint8_t *der = NULL;
    int rc = KR_ECRYPTO;

    if (ctx == NULL || EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, (OSSL_PARAM *)params) <= 0)
        goto out;
    int len = i2d_PUBKEY(pkey, NULL);
    if (len <= 0)
        goto out;
    der = malloc((size_t)len);
    if (der == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    unsigned char *p = der;
    if (i2d_PUBKEY(pkey, &p) != len)
        goto out;
    *out = der;
    *out_len = (size_t)len;
    der = NULL;
    rc = 0;
out:
    if (rc == KR_ECRYPTO) {
        log_error("cannot encode the %s public key as SubjectPublicKeyInfo: %s", what,
                  ERR_reason_error_string(ERR_peek_last_error()));
        ERR_clear_error();
    }
    free(der);
    EVP_PKEY_free(pkey);
    EVP_PKEY_CTX_free(ctx);
    return rc;
}

/* DER SubjectPublicKeyInfo of the RSA key (n, e), malloc'd. */
static int rsa_spki_encode(const uint8_t *n, size_t n_len, const uint8_t *e, size_t e_len,
                           uint8_t **out, size_t *out_len)
{
    BIGNUM *bn_n = BN_bin2bn(n, (int)n_len, NULL);
    BIGNUM *bn_e = BN_bin2bn(e, (int)e_len, NULL);
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM *params = NULL;
    int rc = KR_ECRYPTO;

    if (bn_n != NULL && bn_e != NULL && bld != NULL &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn_n) &&
        OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, bn_e) &&
        (params = OSSL_PARAM_BLD_to_param(bld)) != NULL)
        rc = spki_from_params("RSA", params, "transport", out, out_len);
    else
        ERR_clear_error();
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(bn_n);
    BN_free(bn_e);
    return rc;
}

/* Modulus and public exponent (big-endian, malloc'd) of a DER
 * SubjectPublicKeyInfo holding a plain RSA key of a size we accept. */
static int rsa_spki_decode(const uint8_t *spki, size_t spki_len, uint8_t **out_n,
                           size_t *out_n_len, uint8_t **out_e, size_t *out_e_len)
{
    EVP_PKEY *pkey = NULL;
    BIGNUM *bn_n = NULL, *bn_e = NULL;
    uint8_t *n = NULL, *e = NULL;
    int rc = KR_EINVAL;

    if (spki_len == 0 || spki_len > HSM_SPKI_MAX) {
        log_error("recipient public key of %zu bytes: not a SubjectPublicKeyInfo", spki_len);
        return KR_EINVAL;
    }
    const unsigned char *p = spki;
    pkey = d2i_PUBKEY(NULL, &p, (long)spki_len);
    if (pkey == NULL || p != spki + spki_len) {
        log_error("recipient public key: not one DER SubjectPublicKeyInfo");
        goto out;
    }
    /* Plain RSA only: an RSA-PSS key is not for key transport. */
    if (!EVP_PKEY_is_a(pkey, "RSA")) {
        log_error("recipient public key is %s, not RSA", EVP_PKEY_get0_type_name(pkey));
        goto out;
    }
    int bits = EVP_PKEY_get_bits(pkey);
    if (bits < HSM_RSA_MIN_BITS || bits > HSM_RSA_MAX_BITS) {
        log_error("recipient RSA key of %d bits: %d to %d are accepted", bits, HSM_RSA_MIN_BITS,
                  HSM_RSA_MAX_BITS);
        goto out;
    }
    if (!EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_N, &bn_n) ||
        !EVP_PKEY_get_bn_param(pkey, OSSL_PKEY_PARAM_RSA_E, &bn_e)) {
        log_error("recipient RSA key: no modulus or exponent");
        goto out;
    }
    size_t n_len = (size_t)BN_num_bytes(bn_n), e_len = (size_t)BN_num_bytes(bn_e);
    n = malloc(n_len);
    e = malloc(e_len ? e_len : 1);
    if (n == NULL || e == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    BN_bn2bin(bn_n, n);
    BN_bn2bin(bn_e, e);
    *out_n = n;
    *out_n_len = n_len;
    *out_e = e;
    *out_e_len = e_len;
    n = e = NULL;
    rc = 0;
out:
    ERR_clear_error();
    free(n);
    free(e);
    BN_free(bn_n);
    BN_free(bn_e);
    EVP_PKEY_free(pkey);
    return rc;
}

/* Destroys every key pair half labelled |label| (the transport key).
 * Caller holds the lock. */
static int transport_destroy_locked(struct hsm *hsm, const char *label)
{
    CK_FUNCTION_LIST *m = hsm->module;
    const CK_OBJECT_CLASS classes[] = {CKO_PRIVATE_KEY, CKO_PUBLIC_KEY};
    int rc = 0;
    for (size_t i = 0; i < sizeof(classes) / sizeof(classes[0]); i++) {
        CK_OBJECT_CLASS cls = classes[i];
        CK_KEY_TYPE type = CKK_RSA;
        CK_ATTRIBUTE tmpl[] = {
            {CKA_CLASS, &cls, sizeof(cls)},
            {CKA_KEY_TYPE, &type, sizeof(type)},
            {CKA_LABEL, (void *)label, strlen(label)},
        };
        CK_OBJECT_HANDLE found[4];
        CK_ULONG n = 0;
        int r = find_objects(m, hsm->session, tmpl, sizeof(tmpl) / sizeof(tmpl[0]), label, found,
                             4, &n);
        for (CK_ULONG j = 0; r == 0 && j < n; j++) {
            CK_RV rv = m->C_DestroyObject(hsm->session, found[j]);
            if (rv != CKR_OK)
                r = ck_fail("C_DestroyObject", rv, label);
        }
        if (r != 0 && rc == 0)
            rc = r;
    }
    return rc;
}

int hsm_make_transport_key(struct hsm *hsm, const char *label, uint8_t **out_spki,
                           size_t *out_len)
{
    if (hsm == NULL || out_spki == NULL || out_len == NULL || !object_label_valid(label)) {
        log_error("hsm_make_transport_key: a handle and a label of 1 to %d bytes are needed",
                  HSM_OBJECT_LABEL_MAX);
        return KR_EINVAL;
    }
    CK_FUNCTION_LIST *m = hsm->module;
    CK_ULONG bits = HSM_TRANSPORT_BITS;
    CK_BYTE exponent[] = {0x01, 0x00, 0x01};
    CK_KEY_TYPE type = CKK_RSA;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    /* Token objects: the new node may restart before the blob arrives. The
     * pair only receives the MWK: no encryption, signing or export. */
    CK_ATTRIBUTE pub_tmpl[] = {
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &no, sizeof(no)},
        {CKA_WRAP, &yes, sizeof(yes)},
        {CKA_ENCRYPT, &no, sizeof(no)},
        {CKA_VERIFY, &no, sizeof(no)},
        {CKA_VERIFY_RECOVER, &no, sizeof(no)},
        {CKA_MODULUS_BITS, &bits, sizeof(bits)},
        {CKA_PUBLIC_EXPONENT, exponent, sizeof(exponent)},
    };
    CK_ATTRIBUTE priv_tmpl[] = {
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_UNWRAP, &yes, sizeof(yes)},
        {CKA_DECRYPT, &no, sizeof(no)},
        {CKA_SIGN, &no, sizeof(no)},
        {CKA_SIGN_RECOVER, &no, sizeof(no)},
        {CKA_DERIVE, &no, sizeof(no)},
    };
    CK_ATTRIBUTE by_label[] = {{CKA_LABEL, (void *)label, strlen(label)}};
    CK_MECHANISM mech = {CKM_RSA_PKCS_KEY_PAIR_GEN, NULL, 0};
    CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE, any;
    CK_ULONG n_found = 0;
    uint8_t *modulus = NULL, *pub_exp = NULL, *spki = NULL;
    size_t modulus_len = 0, pub_exp_len = 0, spki_len = 0;
    CK_RV rv;
    int rc;

    pthread_mutex_lock(&hsm->lock);
    rc = find_objects(m, hsm->session, by_label, 1, label, &any, 1, &n_found);
    if (rc != 0)
        goto out;
    if (n_found > 0) {
        log_error("an object labelled \"%s\" already exists: not making a transport key", label);
        rc = KR_EEXIST;
        goto out;
    }
    rv = m->C_GenerateKeyPair(hsm->session, &mech, pub_tmpl, sizeof(pub_tmpl) / sizeof(pub_tmpl[0]),
                              priv_tmpl, sizeof(priv_tmpl) / sizeof(priv_tmpl[0]), &pub, &priv);
    if (rv != CKR_OK) {
        pub = priv = CK_INVALID_HANDLE;
        rc = ck_fail("C_GenerateKeyPair", rv, label);
        goto out;
    }
    rc = get_attribute(m, hsm->session, pub, CKA_MODULUS, label, &modulus, &modulus_len);
    if (rc != 0)
        goto out;
    rc = get_attribute(m, hsm->session, pub, CKA_PUBLIC_EXPONENT, label, &pub_exp, &pub_exp_len);
    if (rc != 0)
        goto out;
    rc = rsa_spki_encode(modulus, modulus_len, pub_exp, pub_exp_len, &spki, &spki_len);
    if (rc != 0)
        goto out;
    log_info("made RSA-%d transport key \"%s\" for receiving the MWK", HSM_TRANSPORT_BITS, label);
    *out_spki = spki;
    *out_len = spki_len;
    spki = NULL;
    rc = 0;
out:
    /* A half-made transport key would block the label: take it back. */
    if (rc != 0 && rc != KR_EEXIST && priv != CK_INVALID_HANDLE) {
        m->C_DestroyObject(hsm->session, priv);
        m->C_DestroyObject(hsm->session, pub);
    }
    pthread_mutex_unlock(&hsm->lock);
    free(modulus);
    free(pub_exp);
    free(spki);
    return rc;
}

/* Standalone rather than on struct hsm: making the recipient key trusted needs
 * an SO login, and SoftHSM (like the standard) keeps one login state per token
 * for the whole process: C_Login(CKU_SO) fails with
 * CKR_USER_ANOTHER_ALREADY_LOGGED_IN while any session of this process is
 * logged in as user, and C_Logout would log out every open handle (whose MWK
 * handles SoftHSM then invalidates; other threads would see the MWK vanish).
 * So the function owns its session and refuses (KR_EBUSY) instead of
 * disturbing a user login it finds. The imported key is a session object: it
 * never reaches the token's storage and goes with the session on any path. */
int hsm_wrap_mwk_for(const char *module_path, const char *token_label, const char *so_pin,
                     const char *user_pin, const char *mwk_label, const uint8_t *spki,
                     size_t spki_len, uint8_t **out_blob, size_t *out_len)
{
    CK_FUNCTION_LIST *m = NULL;
    CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
    CK_OBJECT_HANDLE recipient = CK_INVALID_HANDLE, mwk = CK_INVALID_HANDLE;
    CK_SLOT_ID slot = 0;
    int so_logged_in = 0;
    uint8_t *n = NULL, *e = NULL, *blob = NULL;
    size_t n_len = 0, e_len = 0;
    CK_RV rv;
    int rc;

    if (module_path == NULL || !label_valid(token_label) || so_pin == NULL || so_pin[0] == '\0' ||
        user_pin == NULL || user_pin[0] == '\0' || mwk_label == NULL || mwk_label[0] == '\0' ||
        spki == NULL || out_blob == NULL || out_len == NULL) {
        log_error("hsm_wrap_mwk_for: module, token label, both PINs, MWK label and the "
                  "recipient key are needed");
        return KR_EINVAL;
    }
    rc = rsa_spki_decode(spki, spki_len, &n, &n_len, &e, &e_len);
    if (rc != 0)
        goto out;

    rc = module_open(module_path, &m);
    if (rc != 0)
        goto out;
    rc = find_slot(m, token_label, &slot);
    if (rc == KR_ENOTFOUND)
        log_error("no token labelled \"%s\" in %s", token_label, module_path);
    if (rc != 0)
        goto out;
    rv = m->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &session);
    if (rv != CKR_OK) {
        session = CK_INVALID_HANDLE;
        rc = ck_fail("C_OpenSession", rv, token_label);
        goto out;
    }

    rv = m->C_Login(session, CKU_SO, (CK_UTF8CHAR *)so_pin, strlen(so_pin));
    if (rv == CKR_USER_ANOTHER_ALREADY_LOGGED_IN || rv == CKR_USER_ALREADY_LOGGED_IN) {
        log_error("token \"%s\" is already logged in by this process (%s): close its HSM "
                  "handle before copying the MWK, and reopen it after",
                  token_label, ckr_name(rv));
        rc = KR_EBUSY;
        goto out;
    }
    if (rv != CKR_OK) {
        rc = ck_fail("C_Login", rv, "security officer");
        goto out;
    }
    so_logged_in = 1;

    /* Only the SO may set CKA_TRUSTED; the MWK (CKA_WRAP_WITH_TRUSTED) can be
     * wrapped under no other key. Public, so it outlives the SO logout. */
    CK_OBJECT_CLASS cls = CKO_PUBLIC_KEY;
    CK_KEY_TYPE type = CKK_RSA;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    static const char recipient_label[] = "keyraft-mwk-recipient";
    CK_ATTRIBUTE pub_tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_LABEL, (void *)recipient_label, sizeof(recipient_label) - 1},
        {CKA_TOKEN, &no, sizeof(no)},
        {CKA_PRIVATE, &no, sizeof(no)},
        {CKA_TRUSTED, &yes, sizeof(yes)},
        {CKA_WRAP, &yes, sizeof(yes)},
        {CKA_ENCRYPT, &no, sizeof(no)},
        {CKA_VERIFY, &no, sizeof(no)},
        {CKA_MODULUS, n, n_len},
        {CKA_PUBLIC_EXPONENT, e, e_len},
    };
    rv = m->C_CreateObject(session, pub_tmpl, sizeof(pub_tmpl) / sizeof(pub_tmpl[0]), &recipient);
    if (rv != CKR_OK) {
        recipient = CK_INVALID_HANDLE;
        rc = ck_fail("C_CreateObject", rv, "trusted recipient key");
        goto out;
    }
    rv = m->C_Logout(session);
    so_logged_in = 0;
    if (rv != CKR_OK) {
        rc = ck_fail("C_Logout", rv, "security officer");
        goto out;
    }
    rv = m->C_Login(session, CKU_USER, (CK_UTF8CHAR *)user_pin, strlen(user_pin));
    /* Another thread may have opened a handle since the SO logged out. */
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        rc = ck_fail("C_Login", rv, token_label);
        goto out;
    }
    rc = mwk_find(m, session, mwk_label, &mwk);
    if (rc == KR_ENOTFOUND)
        log_error("no MWK labelled \"%s\" on token \"%s\"", mwk_label, token_label);
    if (rc != 0)
        goto out;

    CK_RSA_PKCS_OAEP_PARAMS oaep = {CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, NULL, 0};
    CK_MECHANISM mech = {CKM_RSA_PKCS_OAEP, &oaep, sizeof(oaep)};
    CK_ULONG blob_len = 0;
    rv = m->C_WrapKey(session, &mech, recipient, mwk, NULL, &blob_len);
    if (rv == CKR_OK && (blob_len == 0 || blob_len > HSM_RSA_MAX_BYTES)) {
        log_error("C_WrapKey (%s): %lu bytes asked for", mwk_label, (unsigned long)blob_len);
        rc = KR_EHSM;
        goto out;
    }
    if (rv == CKR_OK) {
        blob = malloc(blob_len);
        if (blob == NULL) {
            rc = KR_ENOMEM;
            goto out;
        }
        rv = m->C_WrapKey(session, &mech, recipient, mwk, blob, &blob_len);
    }
    if (rv == CKR_KEY_NOT_WRAPPABLE || rv == CKR_KEY_UNEXTRACTABLE) {
        log_error("C_WrapKey (%s): %s: this MWK is not copyable (it needs CKA_EXTRACTABLE "
                  "and CKA_WRAP_WITH_TRUSTED)",
                  mwk_label, ckr_name(rv));
        rc = KR_EPERM;
        goto out;
    }
    if (rv != CKR_OK) {
        rc = ck_fail("C_WrapKey", rv, mwk_label);
        goto out;
    }
    log_info("wrapped MWK \"%s\" of token \"%s\" for an RSA-%zu recipient", mwk_label,
             token_label, n_len * 8);
    *out_blob = blob;
    *out_len = blob_len;
    blob = NULL;
    rc = 0;
out:
    if (recipient != CK_INVALID_HANDLE) {
        rv = m->C_DestroyObject(session, recipient);
        if (rv != CKR_OK)
            log_warn("C_DestroyObject (recipient key): %s (0x%lx); it goes with the session",
                     ckr_name(rv), (unsigned long)rv);
    }
    if (so_logged_in)
        m->C_Logout(session);
    /* No user logout: closing the last session of the token logs it out, and
     * an explicit one would also log out a handle opened meanwhile. */
    if (session != CK_INVALID_HANDLE)
        m->C_CloseSession(session);
    module_close(m);
    free(blob);
    free(n);
    free(e);
    return rc;
}

int hsm_unwrap_mwk(struct hsm *hsm, const char *transport_label, const uint8_t *blob,
                   size_t len)
{
    if (hsm == NULL || !object_label_valid(transport_label) || blob == NULL) {
        log_error("hsm_unwrap_mwk: a handle, a transport key label and a blob are needed");
        return KR_EINVAL;
    }
    if (len == 0 || len > HSM_RSA_MAX_BYTES) {
        log_warn("MWK blob of %zu bytes: no RSA key we accept makes one", len);
        return KR_EAUTH;
    }
    CK_FUNCTION_LIST *m = hsm->module;
    CK_OBJECT_CLASS priv_cls = CKO_PRIVATE_KEY;
    CK_KEY_TYPE rsa = CKK_RSA;
    CK_ATTRIBUTE priv_tmpl[] = {
        {CKA_CLASS, &priv_cls, sizeof(priv_cls)},
        {CKA_KEY_TYPE, &rsa, sizeof(rsa)},
        {CKA_LABEL, (void *)transport_label, strlen(transport_label)},
    };
    /* The copy has the generated MWK's attributes, so it can be copied on. */
    CK_ATTRIBUTE mwk_tmpl[MWK_POLICY_ATTRS];
    mwk_policy(mwk_tmpl, hsm->mwk_label);
    CK_RSA_PKCS_OAEP_PARAMS oaep = {CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, NULL, 0};
    CK_MECHANISM mech = {CKM_RSA_PKCS_OAEP, &oaep, sizeof(oaep)};
    CK_OBJECT_HANDLE priv = CK_INVALID_HANDLE, key = CK_INVALID_HANDLE;
    CK_ULONG key_len = 0;
    CK_ATTRIBUTE len_attr = {CKA_VALUE_LEN, &key_len, sizeof(key_len)};
    CK_RV rv;
    int rc;

    pthread_mutex_lock(&hsm->lock);
    rc = mwk_lookup_locked(hsm, &key);
    if (rc == 0) {
        log_error("token already has an MWK labelled \"%s\": not receiving another",
                  hsm->mwk_label);
        hsm->mwk = key;
        key = CK_INVALID_HANDLE;
        rc = KR_EEXIST;
        goto out;
    }
    if (rc != KR_ENOTFOUND)
        goto out;
    rc = find_one(m, hsm->session, priv_tmpl, sizeof(priv_tmpl) / sizeof(priv_tmpl[0]),
                  "RSA private key", transport_label, &priv);
    if (rc == KR_ENOTFOUND)
        log_error("no transport key labelled \"%s\" on the token", transport_label);
    if (rc != 0)
        goto out;
    rv = m->C_UnwrapKey(hsm->session, &mech, priv, (CK_BYTE *)blob, len, mwk_tmpl,
                        sizeof(mwk_tmpl) / sizeof(mwk_tmpl[0]), &key);
    if (rv == CKR_WRAPPED_KEY_INVALID || rv == CKR_WRAPPED_KEY_LEN_RANGE ||
        rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_ENCRYPTED_DATA_LEN_RANGE ||
        rv == CKR_DATA_INVALID || rv == CKR_DATA_LEN_RANGE || rv == CKR_GENERAL_ERROR ||
        rv == CKR_FUNCTION_FAILED) {
        /* SoftHSM reports an OAEP decoding failure as CKR_GENERAL_ERROR. */
        key = CK_INVALID_HANDLE;
        log_warn("C_UnwrapKey (%s): %s (0x%lx): the blob is tampered or for another token",
                 transport_label, ckr_name(rv), (unsigned long)rv);
        rc = KR_EAUTH;
        goto out;
    }
    if (rv != CKR_OK) {
        key = CK_INVALID_HANDLE;
        rc = ck_fail("C_UnwrapKey", rv, transport_label);
        goto out;
    }
    /* OAEP authenticates nothing about the payload: an AES-128 key wrapped
     * for us would unwrap too. The MWK is AES-256. SoftHSM 2.6.1 leaves
     * CKA_VALUE_LEN 0 on an unwrapped key (and refuses it in the template,
     * CKR_ATTRIBUTE_READ_ONLY), so there only a known-answer decryption by
     * the caller tells; a token that reports the length is held to it. */
    rv = m->C_GetAttributeValue(hsm->session, key, &len_attr, 1);
    if (rv != CKR_OK) {
        rc = ck_fail("C_GetAttributeValue", rv, "unwrapped MWK length");
        goto out;
    }
    if (key_len != 0 && key_len != HSM_MWK_LEN) {
        log_error("unwrapped key is %lu bytes, an MWK is %d: discarding it",
                  (unsigned long)key_len, HSM_MWK_LEN);
        rc = KR_EAUTH;
        goto out;
    }
    hsm->mwk = key;
    key = CK_INVALID_HANDLE;
    /* The MWK is in place; a leftover transport key only opens blobs made
     * for this token, so failing to destroy it is not a failure of the copy. */
    if (transport_destroy_locked(hsm, transport_label) != 0)
        log_warn("transport key \"%s\" is left on the token: destroy it", transport_label);
    log_info("received MWK \"%s\" into the token", hsm->mwk_label);
    rc = 0;
out:
    if (key != CK_INVALID_HANDLE)
        m->C_DestroyObject(hsm->session, key);
    pthread_mutex_unlock(&hsm->lock);
    return rc;
}

int hsm_admit_wrap_mwk(struct hsm *hsm, const char *module_path, const char *token_label,
                       const char *so_pin, const char *user_pin, const uint8_t *spki,
                       size_t spki_len, uint8_t **out_blob, size_t *out_len)
{
    if (hsm == NULL || token_label == NULL || user_pin == NULL)
        return KR_EINVAL;
    pthread_mutex_lock(&hsm->lock);
    /* Closing this handle's session (the process's only one on the token)
     * ends the user login, so the SO may log in; the lock keeps every other
     * user of this handle out until the login is back. */
    if (hsm->session != CK_INVALID_HANDLE)
        hsm->module->C_CloseSession(hsm->session);
    hsm->session = CK_INVALID_HANDLE;
    hsm->mwk = CK_INVALID_HANDLE;
    hsm->audit_priv = hsm->audit_pub = CK_INVALID_HANDLE;
    int rc = hsm_wrap_mwk_for(module_path, token_label, so_pin, user_pin, hsm->mwk_label, spki,
                              spki_len, out_blob, out_len);
    CK_SLOT_ID slot = 0;
    int rc2 = find_slot(hsm->module, token_label, &slot);
    CK_RV rv = CKR_OK;
    if (rc2 == 0) {
        rv = hsm->module->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL,
                                        &hsm->session);
        if (rv != CKR_OK) {
            hsm->session = CK_INVALID_HANDLE;
            rc2 = ck_fail("C_OpenSession", rv, token_label);
        }
    }
    if (rc2 == 0) {
        rv = hsm->module->C_Login(hsm->session, CKU_USER, (CK_UTF8CHAR *)user_pin,
                                  strlen(user_pin));
        if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN)
            rc2 = ck_fail("C_Login", rv, token_label);
    }
    CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
    if (rc2 == 0)
        rc2 = mwk_lookup_locked(hsm, &key);
    hsm->mwk = rc2 == 0 ? key : CK_INVALID_HANDLE;
    pthread_mutex_unlock(&hsm->lock);
    if (rc2 != 0) {
        log_error("the HSM session did not come back after the MWK copy: %s", kr_strerror(rc2));
        if (rc == 0) {
            free(*out_blob);
            *out_blob = NULL;
        }
        return rc2;
    }
    return rc;
}

/* --- The audit signing key ------------------------------------------------------
 * An EC P-256 pair made inside the token: the private half signs checkpoints
 * of the audit chain and never leaves (sensitive, never extractable); the
 * public half is on the token too, so the SPKI can be rebuilt after a restart. */

/* DER of the P-256 curve OID (1.2.840.10045.3.1.7): CKA_EC_PARAMS. */
static const uint8_t p256_oid_der[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};

/* The audit key half of class |cls| by label. Caller holds the lock. */
static int audit_find_locked(struct hsm *hsm, CK_OBJECT_CLASS cls, CK_OBJECT_HANDLE *out)
{
    CK_KEY_TYPE type = CKK_EC;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_LABEL, hsm->audit_label, strlen(hsm->audit_label)},
    };
    return find_one(hsm->module, hsm->session, tmpl, sizeof(tmpl) / sizeof(tmpl[0]),
                    cls == CKO_PRIVATE_KEY ? "EC private key (audit)" : "EC public key (audit)",
                    hsm->audit_label, out);
}

/* Both halves into the cache. KR_ENOTFOUND when neither is there; KR_EHSM
 * when only one is (a signing key is never replaced behind the operator's
 * back). Caller holds the lock. */
static int audit_lookup_locked(struct hsm *hsm)
{
    CK_OBJECT_HANDLE priv = CK_INVALID_HANDLE, pub = CK_INVALID_HANDLE;
    int rc_priv = audit_find_locked(hsm, CKO_PRIVATE_KEY, &priv);
    if (rc_priv != 0 && rc_priv != KR_ENOTFOUND)
        return rc_priv;
    int rc_pub = audit_find_locked(hsm, CKO_PUBLIC_KEY, &pub);
    if (rc_pub != 0 && rc_pub != KR_ENOTFOUND)
        return rc_pub;
    if (rc_priv == KR_ENOTFOUND && rc_pub == KR_ENOTFOUND)
        return KR_ENOTFOUND;
    if (rc_priv != 0 || rc_pub != 0) {
        log_error("the token holds only the %s half of the audit key \"%s\": restore or "
                  "remove it by hand",
                  rc_priv == 0 ? "private" : "public", hsm->audit_label);
        return KR_EHSM;
    }
    hsm->audit_priv = priv;
    hsm->audit_pub = pub;
    return 0;
}

/* The cached pair, looked up on first use. Caller holds the lock. */
static int audit_handles_locked(struct hsm *hsm)
{
    if (hsm->audit_priv != CK_INVALID_HANDLE && hsm->audit_pub != CK_INVALID_HANDLE)
        return 0;
    int rc = audit_lookup_locked(hsm);
    if (rc == KR_ENOTFOUND)
        log_error("no audit key labelled \"%s\" on the token", hsm->audit_label);
    return rc;
}

int hsm_audit_key_ensure(struct hsm *hsm)
{
    if (hsm == NULL)
        return KR_EINVAL;
    CK_FUNCTION_LIST *m = hsm->module;
    const char *label = hsm->audit_label;
    CK_KEY_TYPE type = CKK_EC;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE pub_tmpl[] = {
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &no, sizeof(no)},
        {CKA_VERIFY, &yes, sizeof(yes)},
        {CKA_ENCRYPT, &no, sizeof(no)},
        {CKA_WRAP, &no, sizeof(no)},
        {CKA_DERIVE, &no, sizeof(no)},
        {CKA_EC_PARAMS, (void *)p256_oid_der, sizeof(p256_oid_der)},
    };
    /* Signs only; never readable or wrappable, not even under a trusted key. */
    CK_ATTRIBUTE priv_tmpl[] = {
        {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_SIGN, &yes, sizeof(yes)},
        {CKA_DECRYPT, &no, sizeof(no)},
        {CKA_UNWRAP, &no, sizeof(no)},
        {CKA_DERIVE, &no, sizeof(no)},
    };
    CK_MECHANISM mech = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;

    pthread_mutex_lock(&hsm->lock);
    /* Always ask the token, as hsm_find_mwk does. */
    hsm->audit_priv = hsm->audit_pub = CK_INVALID_HANDLE;
    int rc = audit_lookup_locked(hsm);
    if (rc != KR_ENOTFOUND)
        goto out;
    CK_RV rv = m->C_GenerateKeyPair(hsm->session, &mech, pub_tmpl,
                                    sizeof(pub_tmpl) / sizeof(pub_tmpl[0]), priv_tmpl,
                                    sizeof(priv_tmpl) / sizeof(priv_tmpl[0]), &pub, &priv);
    if (rv != CKR_OK) {
        rc = ck_fail("C_GenerateKeyPair", rv, label);
        goto out;
    }
    hsm->audit_priv = priv;
    hsm->audit_pub = pub;
    log_info("generated EC P-256 audit signing key \"%s\" in the token", label);
    rc = 0;
out:
    pthread_mutex_unlock(&hsm->lock);
    return rc;
}

/* DER SubjectPublicKeyInfo of a P-256 point (uncompressed, 65 bytes), malloc'd. */
static int ec_spki_encode(const uint8_t *point, size_t point_len, uint8_t **out, size_t *out_len)
{
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM *params = NULL;
    int rc = KR_ECRYPTO;

    if (bld != NULL &&
        OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, "prime256v1", 0) &&
        OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, point, point_len) &&
        (params = OSSL_PARAM_BLD_to_param(bld)) != NULL)
        rc = spki_from_params("EC", params, "audit", out, out_len);
    else
        ERR_clear_error();
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    return rc;
}

int hsm_audit_public_key(struct hsm *hsm, uint8_t **out_spki, size_t *out_len)
{
    if (hsm == NULL || out_spki == NULL || out_len == NULL)
        return KR_EINVAL;
    uint8_t *params = NULL, *point = NULL;
    size_t params_len = 0, point_len = 0;
    int rc;

    pthread_mutex_lock(&hsm->lock);
    rc = audit_handles_locked(hsm);
    if (rc != 0)
        goto out;
    rc = get_attribute(hsm->module, hsm->session, hsm->audit_pub, CKA_EC_PARAMS,
                       hsm->audit_label, &params, &params_len);
    if (rc == KR_EHSM) {
        /* Perhaps a stale cached handle: look the pair up once more. */
        hsm->audit_priv = hsm->audit_pub = CK_INVALID_HANDLE;
        if ((rc = audit_handles_locked(hsm)) == 0)
            rc = get_attribute(hsm->module, hsm->session, hsm->audit_pub, CKA_EC_PARAMS,
                               hsm->audit_label, &params, &params_len);
    }
    if (rc != 0)
        goto out;
    rc = get_attribute(hsm->module, hsm->session, hsm->audit_pub, CKA_EC_POINT, hsm->audit_label,
                       &point, &point_len);
out:
    pthread_mutex_unlock(&hsm->lock);
    if (rc == 0 && (params_len != sizeof(p256_oid_der) ||
                    memcmp(params, p256_oid_der, sizeof(p256_oid_der)) != 0)) {
        log_error("audit key \"%s\" is not on curve P-256", hsm->audit_label);
        rc = KR_EHSM;
    }
    if (rc == 0) {
        /* PKCS#11 wants CKA_EC_POINT as a DER OCTET STRING; some tokens give
         * the bare point. Either way it is an uncompressed P-256 point. */
        const uint8_t *pt = point;
        size_t pt_len = point_len;
        if (pt_len == 2 + 1 + 2 * HSM_P256_COORD && pt[0] == 0x04 &&
            pt[1] == 1 + 2 * HSM_P256_COORD) {
            pt += 2;
            pt_len -= 2;
        }
        if (pt_len != 1 + 2 * HSM_P256_COORD || pt[0] != 0x04) {
            log_error("audit key \"%s\": CKA_EC_POINT of %zu bytes is not an uncompressed "
                      "P-256 point",
                      hsm->audit_label, point_len);
            rc = KR_EHSM;
        } else {
            rc = ec_spki_encode(pt, pt_len, out_spki, out_len);
        }
    }
    free(params);
    free(point);
    return rc;
}

/* DER ECDSA-Sig-Value of a raw r | s signature, malloc'd. */
static int ecdsa_raw_to_der(const uint8_t *raw, size_t raw_len, uint8_t **out, size_t *out_len)
{
    size_t half = raw_len / 2;
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(raw, (int)half, NULL);
    BIGNUM *s = BN_bin2bn(raw + half, (int)half, NULL);
    uint8_t *der = NULL;
    int rc = KR_ECRYPTO;
    if (sig == NULL || r == NULL || s == NULL || !ECDSA_SIG_set0(sig, r, s))
        goto out;
    r = s = NULL; /* owned by sig now */
    int len = i2d_ECDSA_SIG(sig, NULL);
    if (len <= 0)
        goto out;
    der = malloc((size_t)len);
    if (der == NULL) {
        rc = KR_ENOMEM;
        goto out;
    }
    unsigned char *p = der;
    if (i2d_ECDSA_SIG(sig, &p) != len)
        goto out;
    *out = der;
    *out_len = (size_t)len;
    der = NULL;
    rc = 0;
out:
    if (rc == KR_ECRYPTO) {
        log_error("cannot encode the audit signature as DER: %s",
                  ERR_reason_error_string(ERR_peek_last_error()));
        ERR_clear_error();
    }
    free(der);
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(sig);
    return rc;
}

int hsm_audit_sign(struct hsm *hsm, const uint8_t digest[32], uint8_t **out_der_sig,
                   size_t *out_len)
{
    if (hsm == NULL || digest == NULL || out_der_sig == NULL || out_len == NULL)
        return KR_EINVAL;
    CK_FUNCTION_LIST *m = hsm->module;
    CK_MECHANISM mech = {CKM_ECDSA, NULL, 0};
    uint8_t raw[2 * HSM_P256_COORD];
    CK_ULONG raw_len = sizeof(raw);
    CK_RV rv = CKR_OK;
    int rc;

    pthread_mutex_lock(&hsm->lock);
    for (int attempt = 0; attempt < 2; attempt++) {
        rc = audit_handles_locked(hsm);
        if (rc != 0)
            goto out;
        rv = m->C_SignInit(hsm->session, &mech, hsm->audit_priv);
        if (rv != CKR_KEY_HANDLE_INVALID && rv != CKR_OBJECT_HANDLE_INVALID)
            break;
        hsm->audit_priv = hsm->audit_pub = CK_INVALID_HANDLE; /* stale: look again */
    }
    if (rv != CKR_OK) {
        rc = ck_fail("C_SignInit", rv, hsm->audit_label);
        goto out;
    }
    /* The buffer fits a P-256 signature, so the operation ends here. */
    rv = m->C_Sign(hsm->session, (CK_BYTE *)digest, 32, raw, &raw_len);
    if (rv != CKR_OK) {
        rc = ck_fail("C_Sign", rv, hsm->audit_label);
        goto out;
    }
    if (raw_len != sizeof(raw)) {
        log_error("C_Sign (%s): %lu signature bytes, a P-256 signature has %zu",
                  hsm->audit_label, (unsigned long)raw_len, sizeof(raw));
        rc = KR_EHSM;
        goto out;
    }
    rc = 0;
out:
    pthread_mutex_unlock(&hsm->lock);
    if (rc == 0)
        rc = ecdsa_raw_to_der(raw, sizeof(raw), out_der_sig, out_len);
    return rc;
}
