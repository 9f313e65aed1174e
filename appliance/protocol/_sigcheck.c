/* The signed device request check of appliance.protocol.identity, in C (one parse call, one
 * verify call per request). docs/architecture.md ("Signed device requests") says why.
 *
 * The reference is the Python check (identity.parse_signature, identity.verify_request): this
 * module accepts exactly what it accepts and refuses the rest with the same SignatureError
 * (built by identity.refusal, so reason, status and text are the reference's own).
 * tests/test_sigcheck.py checks both against each other.
 *
 *   Key(key: bytes)            HMAC-SHA256 under one key, its inner and outer SHA-256 states
 *                              keyed once; .digest(message) -> bytes (the MAC).
 *   parse(headers: dict) -> Signed
 *                              headers: the values as received (bytes) by lower-case name.
 *                              Signed has .keyid (str), .created (int), .nonce (bytes).
 *   verify(key, signed, method, path, query, body) -> None
 *                              the Content-Digest against the body, then the HMAC of the
 *                              signature base against the Signature, both in constant time.
 *
 * Bounds: every header value is at most MAX_HEADER bytes (checked before anything reads it)
 * and every scan is one pass over a length known first; nothing is allocated by size from
 * the client (the signature base is hashed piece by piece, never assembled). No global
 * mutable state: the types, the names and identity.refusal live in the module's state.
 *
 * SHA-256 is OpenSSL's libcrypto (the one Python's _hashlib loads): its low-level SHA256_CTX,
 * keyed once per device and copied per request, as RFC 2104's precomputed states. OpenSSL 3
 * marks the low-level digests deprecated (in favour of EVP, which allocates and copies a
 * context through its provider layer at each copy: what this module exists to avoid); they
 * are present and supported through the 3.x series, so the deprecation warnings are
 * suppressed here, on purpose, for this file only.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <Python.h>
#include <structmember.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#define MAX_HEADER 256           /* identity._MAX_HEADER */
#define MAC_BYTES 32
#define BLOCK 64
#define B64_MAC 43               /* base64 of 32 bytes, without its '=' */
#define DIGEST_LEN 54            /* sha-256=:<44>: */

typedef struct {
    PyTypeObject *key_type;
    PyTypeObject *signed_type;
    PyObject *refusal;           /* identity.refusal(code, keyid="") -> SignatureError */
    PyObject *name_input;        /* "signature-input" */
    PyObject *name_signature;    /* "signature" */
    PyObject *name_digest;       /* "content-digest" */
    PyObject *code_missing[3];   /* "missing:<name>" */
    PyObject *code_long[3];      /* "long:<name>" */
    PyObject *code_input, *code_signature, *code_digest_form, *code_digest, *code_bad_signature;
} state_t;

typedef struct {
    PyObject_HEAD
    SHA256_CTX inner, outer;
} KeyObject;

typedef struct {
    PyObject_HEAD
    PyObject *keyid;     /* str */
    PyObject *created;   /* int */
    PyObject *nonce;     /* bytes, 32 lowercase hex */
    PyObject *input;     /* the Signature-Input value as received (bytes) */
    PyObject *digest;    /* the Content-Digest value as received (bytes) */
    Py_ssize_t params_at, params_len;   /* the value after "chub=", within input */
    Py_ssize_t digest_at;               /* the digest (DIGEST_LEN bytes) within digest */
    unsigned char mac[MAC_BYTES];
} SignedObject;

static const char EMPTY_DIGEST[] = "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:";
static const char INPUT_HEAD[] = "chub=(\"@method\" \"@path\" \"@query\" \"content-digest\");created=";
static const char NONCE_HEAD[] = ";nonce=\"";
static const char KEYID_HEAD[] = "\";keyid=\"";
static const char INPUT_TAIL[] = "\";alg=\"hmac-sha256\"";

/* Python's bytes.strip() with no argument: ASCII whitespace (Py_ISSPACE). */
static int
is_blank(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\x0b' || c == '\x0c';
}

static void
strip(const unsigned char *s, Py_ssize_t n, Py_ssize_t *at, Py_ssize_t *len)
{
    Py_ssize_t a = 0, b = n;
    while (a < b && is_blank(s[a]))
        a++;
    while (b > a && is_blank(s[b - 1]))
        b--;
    *at = a;
    *len = b - a;
}

static int
is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static int
is_alnum(unsigned char c)
{
    return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* The value of a base64 character of [A-Za-z0-9+/], or -1. */
static int
b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Does s[*i:] start with the literal lit (length litlen)? Advances *i if so. */
static int
take(const unsigned char *s, Py_ssize_t n, Py_ssize_t *i, const char *lit, Py_ssize_t litlen)
{
    if (n - *i < litlen || memcmp(s + *i, lit, (size_t)litlen) != 0)
        return 0;
    *i += litlen;
    return 1;
}

#define TAKE(s, n, i, lit) take((s), (n), (i), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* Raise identity.refusal(code[, keyid]); returns NULL. */
static PyObject *
refuse(state_t *st, PyObject *code, PyObject *keyid)
{
    PyObject *exc = keyid == NULL ? PyObject_CallOneArg(st->refusal, code)
                                  : PyObject_CallFunctionObjArgs(st->refusal, code, keyid, NULL);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* headers[name] as bytes of at most MAX_HEADER (a new reference), or NULL with the refusal
 * (or a TypeError) raised. */
static PyObject *
header(state_t *st, PyObject *headers, int which, PyObject *name)
{
    PyObject *value = PyDict_GetItemWithError(headers, name);
    if (value == NULL) {
        if (!PyErr_Occurred())
            refuse(st, st->code_missing[which], NULL);
        return NULL;
    }
    if (!PyBytes_Check(value)) {
        PyErr_Format(PyExc_TypeError, "header %R must be bytes, not %.100s", name, Py_TYPE(value)->tp_name);
        return NULL;
    }
    if (PyBytes_GET_SIZE(value) > MAX_HEADER) {
        refuse(st, st->code_long[which], NULL);
        return NULL;
    }
    Py_INCREF(value);  /* (held while the other lookups run: nothing can take it away) */
    return value;
}

/* --- Key -------------------------------------------------------------------------------- */

static PyObject *
Key_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Py_buffer key;
    unsigned char block[BLOCK], pad[BLOCK];
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0) {
        PyErr_SetString(PyExc_TypeError, "Key() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*:Key", &key))
        return NULL;
    memset(block, 0, sizeof block);
    if (key.len > BLOCK)
        SHA256((const unsigned char *)key.buf, (size_t)key.len, block);
    else
        memcpy(block, key.buf, (size_t)key.len);
    PyBuffer_Release(&key);
    KeyObject *self = (KeyObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        OPENSSL_cleanse(block, sizeof block);
        return NULL;
    }
    for (int i = 0; i < BLOCK; i++)
        pad[i] = block[i] ^ 0x36;
    SHA256_Init(&self->inner);
    SHA256_Update(&self->inner, pad, BLOCK);
    for (int i = 0; i < BLOCK; i++)
        pad[i] = block[i] ^ 0x5c;
    SHA256_Init(&self->outer);
    SHA256_Update(&self->outer, pad, BLOCK);
    OPENSSL_cleanse(block, sizeof block);
    OPENSSL_cleanse(pad, sizeof pad);
    return (PyObject *)self;
}

static void
Key_dealloc(KeyObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    OPENSSL_cleanse(&self->inner, sizeof self->inner);
    OPENSSL_cleanse(&self->outer, sizeof self->outer);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyObject *
Key_repr(PyObject *self)
{
    return PyUnicode_FromString("Key(...)");  /* never the key */
}

/* The outer hash over the inner's digest: the MAC. */
static void
finish(const KeyObject *key, SHA256_CTX *inner, unsigned char mac[MAC_BYTES])
{
    SHA256_CTX outer;
    unsigned char inner_digest[MAC_BYTES];
    SHA256_Final(inner_digest, inner);
    memcpy(&outer, &key->outer, sizeof outer);
    SHA256_Update(&outer, inner_digest, MAC_BYTES);
    SHA256_Final(mac, &outer);
}

static PyObject *
Key_digest(KeyObject *self, PyObject *arg)
{
    Py_buffer message;
    SHA256_CTX inner;
    unsigned char mac[MAC_BYTES];
    if (PyObject_GetBuffer(arg, &message, PyBUF_SIMPLE) < 0)
        return NULL;
    memcpy(&inner, &self->inner, sizeof inner);
    SHA256_Update(&inner, message.buf, (size_t)message.len);
    PyBuffer_Release(&message);
    finish(self, &inner, mac);
    return PyBytes_FromStringAndSize((const char *)mac, MAC_BYTES);
}

static PyMethodDef Key_methods[] = {
    {"digest", (PyCFunction)Key_digest, METH_O, "The HMAC-SHA256 of message under this key."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Key_slots[] = {
    {Py_tp_new, Key_new},
    {Py_tp_dealloc, Key_dealloc},
    {Py_tp_repr, Key_repr},
    {Py_tp_methods, Key_methods},
    {Py_tp_doc, "HMAC-SHA256 under one key, its inner and outer states keyed once."},
    {0, NULL},
};

static PyType_Spec Key_spec = {
    .name = "appliance.protocol._sigcheck.Key",
    .basicsize = sizeof(KeyObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Key_slots,
};

/* --- Signed ----------------------------------------------------------------------------- */

static void
Signed_dealloc(SignedObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    Py_XDECREF(self->keyid);
    Py_XDECREF(self->created);
    Py_XDECREF(self->nonce);
    Py_XDECREF(self->input);
    Py_XDECREF(self->digest);
    type->tp_free((PyObject *)self);
    Py_DECREF(type);
}

static PyMemberDef Signed_members[] = {
    {"keyid", T_OBJECT_EX, offsetof(SignedObject, keyid), READONLY, "the device id (str)"},
    {"created", T_OBJECT_EX, offsetof(SignedObject, created), READONLY, "unix seconds (int)"},
    {"nonce", T_OBJECT_EX, offsetof(SignedObject, nonce), READONLY, "32 lowercase hex (bytes)"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot Signed_slots[] = {
    {Py_tp_dealloc, Signed_dealloc},
    {Py_tp_members, Signed_members},
    {Py_tp_doc, "A request's signature headers, read (parse) but not yet checked (verify)."},
    {0, NULL},
};

static PyType_Spec Signed_spec = {
    .name = "appliance.protocol._sigcheck.Signed",
    .basicsize = sizeof(SignedObject),
    /* Holds only str, int and bytes: it can be in no cycle, so it is not tracked by the GC.
     * Not instantiable from Python (no tp_new): only parse() makes one. */
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Signed_slots,
};

/* --- parse ------------------------------------------------------------------------------ */

/* The Signature-Input's exact form (identity._SIG_INPUT), s[0:n] already stripped:
 *   chub=("@method" "@path" "@query" "content-digest");created=(0|[1-9][0-9]{0,11})
 *   ;nonce="([0-9a-f]{32})";keyid="([A-Za-z0-9][A-Za-z0-9._:-]{0,63})";alg="hmac-sha256"
 * Each part is a literal or a run of one class followed by a character outside it, so one
 * forward pass decides, as the pattern would. Returns 0 if it does not match. */
static int
match_input(const unsigned char *s, Py_ssize_t n, long long *created, Py_ssize_t *nonce_at,
            Py_ssize_t *keyid_at, Py_ssize_t *keyid_len)
{
    Py_ssize_t i = 0, start;
    if (!TAKE(s, n, &i, INPUT_HEAD) || i >= n)
        return 0;
    if (s[i] == '0') {
        *created = 0;
        i++;
    }
    else if (s[i] >= '1' && s[i] <= '9') {
        long long value = 0;
        start = i;
        while (i < n && i - start < 12 && is_digit(s[i]))
            value = value * 10 + (s[i++] - '0');
        *created = value;
    }
    else
        return 0;
    if (!TAKE(s, n, &i, NONCE_HEAD) || n - i < 32)
        return 0;
    *nonce_at = i;
    for (start = i; i < start + 32; i++)
        if (!(is_digit(s[i]) || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    if (!TAKE(s, n, &i, KEYID_HEAD) || i >= n || !is_alnum(s[i]))
        return 0;
    *keyid_at = start = i++;
    while (i < n && i - start < 64
           && (is_alnum(s[i]) || s[i] == '.' || s[i] == '_' || s[i] == ':' || s[i] == '-'))
        i++;
    *keyid_len = i - start;
    return TAKE(s, n, &i, INPUT_TAIL) && i == n;
}

/* chub=:<43 base64>=: (identity._SIGNATURE), s[0:n] stripped, decoded as binascii's
 * a2b_base64 decodes it (the last character's two low bits are not part of the 32 bytes). */
static int
match_signature(const unsigned char *s, Py_ssize_t n, unsigned char mac[MAC_BYTES])
{
    unsigned int acc = 0;
    int bits = 0, out = 0;
    if (n != 6 + B64_MAC + 2 || memcmp(s, "chub=:", 6) != 0 || s[6 + B64_MAC] != '=' || s[7 + B64_MAC] != ':')
        return 0;
    for (Py_ssize_t i = 6; i < 6 + B64_MAC; i++) {
        int v = b64_value(s[i]);
        if (v < 0)
            return 0;
        acc = (acc << 6) | (unsigned int)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (out < MAC_BYTES)
                mac[out++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    return out == MAC_BYTES;
}

/* sha-256=:<43 base64>=: (identity._DIGEST), s[0:n] stripped. */
static int
match_digest(const unsigned char *s, Py_ssize_t n)
{
    if (n != DIGEST_LEN || memcmp(s, "sha-256=:", 9) != 0 || s[9 + B64_MAC] != '=' || s[10 + B64_MAC] != ':')
        return 0;
    for (Py_ssize_t i = 9; i < 9 + B64_MAC; i++)
        if (b64_value(s[i]) < 0)
            return 0;
    return 1;
}

static PyObject *
sig_parse(PyObject *module, PyObject *headers)
{
    state_t *st = PyModule_GetState(module);
    const unsigned char *s;
    Py_ssize_t at, len, nonce_at = 0, keyid_at = 0, keyid_len = 0, digest_at;
    long long created = 0;
    unsigned char mac[MAC_BYTES];
    if (!PyDict_Check(headers)) {
        PyErr_Format(PyExc_TypeError, "headers must be a dict, not %.100s", Py_TYPE(headers)->tp_name);
        return NULL;
    }
    PyObject *input = NULL, *signature = NULL, *digest = NULL;
    SignedObject *self = NULL;
    if ((input = header(st, headers, 0, st->name_input)) == NULL)
        goto done;
    s = (const unsigned char *)PyBytes_AS_STRING(input);
    strip(s, PyBytes_GET_SIZE(input), &at, &len);
    if (!match_input(s + at, len, &created, &nonce_at, &keyid_at, &keyid_len)) {
        refuse(st, st->code_input, NULL);
        goto done;
    }
    Py_ssize_t params_at = at + 5, params_len = len - 5;   /* after "chub=" */
    nonce_at += at;
    keyid_at += at;

    if ((signature = header(st, headers, 1, st->name_signature)) == NULL)
        goto done;
    const unsigned char *g = (const unsigned char *)PyBytes_AS_STRING(signature);
    strip(g, PyBytes_GET_SIZE(signature), &at, &len);
    if (!match_signature(g + at, len, mac)) {
        refuse(st, st->code_signature, NULL);
        goto done;
    }

    if ((digest = header(st, headers, 2, st->name_digest)) == NULL)
        goto done;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(digest);
    strip(d, PyBytes_GET_SIZE(digest), &digest_at, &len);
    if (!match_digest(d + digest_at, len)) {   /* (the empty body's digest passes too) */
        refuse(st, st->code_digest_form, NULL);
        goto done;
    }

    self = (SignedObject *)st->signed_type->tp_alloc(st->signed_type, 0);
    if (self == NULL)
        goto done;
    /* (tp_alloc zeroed the fields: dealloc on a failure below releases what was made.) */
    self->keyid = PyUnicode_DecodeASCII((const char *)s + keyid_at, keyid_len, NULL);
    self->created = PyLong_FromLongLong(created);
    self->nonce = PyBytes_FromStringAndSize((const char *)s + nonce_at, 32);
    if (self->keyid == NULL || self->created == NULL || self->nonce == NULL) {
        Py_CLEAR(self);
        goto done;
    }
    self->input = input;     /* (the references move to the Signed) */
    self->digest = digest;
    input = digest = NULL;
    self->params_at = params_at;
    self->params_len = params_len;
    self->digest_at = digest_at;
    memcpy(self->mac, mac, MAC_BYTES);
done:
    Py_XDECREF(input);
    Py_XDECREF(signature);
    Py_XDECREF(digest);
    return (PyObject *)self;
}

/* --- verify ----------------------------------------------------------------------------- */

static void
update_upper(SHA256_CTX *ctx, const unsigned char *s, Py_ssize_t n)
{
    unsigned char chunk[BLOCK];
    while (n > 0) {
        Py_ssize_t k = n < BLOCK ? n : BLOCK;
        for (Py_ssize_t i = 0; i < k; i++)
            chunk[i] = (s[i] >= 'a' && s[i] <= 'z') ? (unsigned char)(s[i] - 32) : s[i];
        SHA256_Update(ctx, chunk, (size_t)k);
        s += k;
        n -= k;
    }
}

#define UPDATE_LIT(ctx, lit) SHA256_Update((ctx), (lit), sizeof(lit) - 1)

static PyObject *
sig_verify(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    state_t *st = PyModule_GetState(module);
    if (nargs != 6) {
        PyErr_Format(PyExc_TypeError, "verify() takes 6 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!Py_IS_TYPE(args[0], st->key_type) || !Py_IS_TYPE(args[1], st->signed_type)) {
        PyErr_SetString(PyExc_TypeError, "verify(key, signed, ...): a Key and a Signed from this module");
        return NULL;
    }
    for (int i = 2; i < 6; i++)
        if (!PyBytes_Check(args[i])) {
            PyErr_Format(PyExc_TypeError, "verify(): argument %d must be bytes, not %.100s", i + 1,
                         Py_TYPE(args[i])->tp_name);
            return NULL;
        }
    const KeyObject *key = (const KeyObject *)args[0];
    const SignedObject *signed_ = (const SignedObject *)args[1];
    PyObject *method = args[2], *path = args[3], *query = args[4], *body = args[5];
    const unsigned char *digest = (const unsigned char *)PyBytes_AS_STRING(signed_->digest) + signed_->digest_at;

    if (PyBytes_GET_SIZE(body) > 0) {
        unsigned char sum[MAC_BYTES], expected[DIGEST_LEN + 1];   /* (EVP_EncodeBlock's NUL) */
        SHA256((const unsigned char *)PyBytes_AS_STRING(body), (size_t)PyBytes_GET_SIZE(body), sum);
        memcpy(expected, "sha-256=:", 9);
        EVP_EncodeBlock(expected + 9, sum, MAC_BYTES);   /* 44 characters */
        expected[DIGEST_LEN - 1] = ':';
        if (CRYPTO_memcmp(expected, digest, DIGEST_LEN) != 0)
            return refuse(st, st->code_digest, NULL);
    }
    else if (memcmp(digest, EMPTY_DIGEST, DIGEST_LEN) != 0)   /* (not secret: public) */
        return refuse(st, st->code_digest, NULL);

    /* The signature base (identity.signature_base), hashed piece by piece. */
    SHA256_CTX inner;
    unsigned char mac[MAC_BYTES];
    memcpy(&inner, &key->inner, sizeof inner);
    UPDATE_LIT(&inner, "\"@method\": ");
    update_upper(&inner, (const unsigned char *)PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method));
    UPDATE_LIT(&inner, "\n\"@path\": ");
    SHA256_Update(&inner, PyBytes_AS_STRING(path), (size_t)PyBytes_GET_SIZE(path));
    UPDATE_LIT(&inner, "\n\"@query\": ?");
    SHA256_Update(&inner, PyBytes_AS_STRING(query), (size_t)PyBytes_GET_SIZE(query));
    UPDATE_LIT(&inner, "\n\"content-digest\": ");
    SHA256_Update(&inner, digest, DIGEST_LEN);
    UPDATE_LIT(&inner, "\n\"@signature-params\": ");
    SHA256_Update(&inner, PyBytes_AS_STRING(signed_->input) + signed_->params_at, (size_t)signed_->params_len);
    finish(key, &inner, mac);
    if (CRYPTO_memcmp(mac, signed_->mac, MAC_BYTES) != 0)
        return refuse(st, st->code_bad_signature, signed_->keyid);
    Py_RETURN_NONE;
}

/* --- the module ------------------------------------------------------------------------- */

static PyMethodDef module_methods[] = {
    {"parse", (PyCFunction)sig_parse, METH_O,
     "parse(headers) -> Signed: the signature headers read, or identity's SignatureError."},
    {"verify", (PyCFunction)(void (*)(void))sig_verify, METH_FASTCALL,
     "verify(key, signed, method, path, query, body): None, or identity's SignatureError."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *module)
{
    state_t *st = PyModule_GetState(module);
    static const char *names[3] = {"signature-input", "signature", "content-digest"};
    PyObject *identity = PyImport_ImportModule("appliance.protocol.identity");
    if (identity == NULL)
        return -1;
    st->refusal = PyObject_GetAttrString(identity, "refusal");
    Py_DECREF(identity);
    if (st->refusal == NULL)
        return -1;
    st->key_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Key_spec, NULL);
    if (st->key_type == NULL || PyModule_AddType(module, st->key_type) < 0)
        return -1;
    st->signed_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Signed_spec, NULL);
    if (st->signed_type == NULL || PyModule_AddType(module, st->signed_type) < 0)
        return -1;
    for (int i = 0; i < 3; i++) {
        st->code_missing[i] = PyUnicode_FromFormat("missing:%s", names[i]);
        st->code_long[i] = PyUnicode_FromFormat("long:%s", names[i]);
        if (st->code_missing[i] == NULL || st->code_long[i] == NULL)
            return -1;
    }
    if ((st->name_input = PyUnicode_InternFromString(names[0])) == NULL
        || (st->name_signature = PyUnicode_InternFromString(names[1])) == NULL
        || (st->name_digest = PyUnicode_InternFromString(names[2])) == NULL
        || (st->code_input = PyUnicode_FromString("input")) == NULL
        || (st->code_signature = PyUnicode_FromString("signature")) == NULL
        || (st->code_digest_form = PyUnicode_FromString("digest_form")) == NULL
        || (st->code_digest = PyUnicode_FromString("digest")) == NULL
        || (st->code_bad_signature = PyUnicode_FromString("bad_signature")) == NULL)
        return -1;
    return PyModule_AddIntConstant(module, "MAX_HEADER", MAX_HEADER);
}

static int
module_traverse(PyObject *module, visitproc visit, void *arg)
{
    state_t *st = PyModule_GetState(module);
    Py_VISIT(st->key_type);
    Py_VISIT(st->signed_type);
    Py_VISIT(st->refusal);
    return 0;
}

static int
module_clear(PyObject *module)
{
    state_t *st = PyModule_GetState(module);
    Py_CLEAR(st->key_type);
    Py_CLEAR(st->signed_type);
    Py_CLEAR(st->refusal);
    Py_CLEAR(st->name_input);
    Py_CLEAR(st->name_signature);
    Py_CLEAR(st->name_digest);
    for (int i = 0; i < 3; i++) {
        Py_CLEAR(st->code_missing[i]);
        Py_CLEAR(st->code_long[i]);
    }
    Py_CLEAR(st->code_input);
    Py_CLEAR(st->code_signature);
    Py_CLEAR(st->code_digest_form);
    Py_CLEAR(st->code_digest);
    Py_CLEAR(st->code_bad_signature);
    return 0;
}

static void
module_free(void *module)
{
    module_clear((PyObject *)module);
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "appliance.protocol._sigcheck",
    .m_doc = "The signed device request check in C (appliance.protocol.identity is the reference).",
    .m_size = sizeof(state_t),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC
PyInit__sigcheck(void)
{
    return PyModuleDef_Init(&module_def);
}
