/* One-pass CPU decode of q8 cache rows (format version 2, codec.py), the compiled path of
 * codec.decode_into. Built by setup.py as an optional extension; codec.py falls back to its numpy /
 * torch decode when the module is missing (no compiler at install time) or RGKD_CACHE_NATIVE=0.
 *
 * q8_rows(n, k, id_bits, codes, qparams, ids_lo, ids_hi, lse, tail,
 *         out_logprobs, out_ids, out_lse, out_tail, row0, isa="auto")
 *
 *   codes     [n, k-1] uint8       qparams [n, 2] fp16 (m, s)
 *   ids_lo    [n, k]   uint16      ids_hi  [n, ceil(k * (id_bits - 16) / 8)] uint8, or None (id_bits <= 16)
 *   lse, tail [n]      fp16
 *   out_*     C-contiguous fp32 [N, k] / int32 [N, k] / fp32 [N] / fp32 [N]: rows row0 .. row0 + n written
 *
 *   logprobs[r, 0] = m - 0 * s, logprobs[r, j] = m - c_j * s (fp32; c_j * s, an 8-bit integer times an
 *   fp16, is exact in fp32, so the result has the one rounding of the difference, as torch's two-op
 *   decode: the same bits, NaN payloads aside);
 *   ids[r, j] = lo | hi_bits << 16 (bits LSB first in each row's packed bytes); lse / tail widened.
 *
 * Every buffer's byte length is checked against n, k and id_bits before anything is written; the
 * element types are the caller's contract (codec.py passes the shard's sections and its own outputs).
 * The GIL is released while decoding. isa: "auto" (an AVX2 build of the loops on x86-64 CPUs that have
 * it, else the baseline one), "baseline" or "avx2" (tests run both).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan (payload kept) */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man != 0) { /* subnormal: normalise */
        uint32_t e = 113u;
        while (!(man & 0x400u)) {
            man <<= 1;
            e--;
        }
        bits = sign | (e << 23) | ((man & 0x3ffu) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) void decode(Py_ssize_t n, Py_ssize_t k, int hi_bits, Py_ssize_t hi_row, const uint8_t *codes,
                   const uint16_t *qparams, const uint16_t *lo, const uint8_t *hi, const uint16_t *lse,
                   const uint16_t *tail, float *out_lp, int32_t *out_ids, float *out_lse,
                   float *out_tail) {
    for (Py_ssize_t r = 0; r < n; r++) {
        const float m = half_to_float(qparams[2 * r]);
        const float s = half_to_float(qparams[2 * r + 1]);
        const uint8_t *c = codes + r * (k - 1);
        float *o = out_lp + r * k;
        o[0] = m - 0.0f * s; /* m for every finite s >= 0, as the fallback's m - code 0 * s */
        if (k > 1 && r + 1 < n) { /* reads c[k - 1], the next row's first code */
            /* k values from o[1]: the last lands on the next row's o[0], rewritten with its m next;
             * a k-long loop vectorises without a scalar tail when k is a multiple of the width */
            for (Py_ssize_t j = 0; j < k; j++) {
                const float step = (float)c[j] * s;
                o[j + 1] = m - step;
            }
        } else {
            for (Py_ssize_t j = 1; j < k; j++) {
                const float step = (float)c[j - 1] * s;
                o[j] = m - step;
            }
        }
        const uint16_t *l = lo + r * k;
        int32_t *d = out_ids + r * k;
        for (Py_ssize_t j = 0; j < k; j++) d[j] = (int32_t)l[j];
        if (hi_bits > 0) {
            const uint8_t *row = hi + r * hi_row;
            for (Py_ssize_t j = 0; j < k; j++) {
                uint32_t v = 0;
                for (int b = 0; b < hi_bits; b++) {
                    Py_ssize_t bit = j * hi_bits + b;
                    v |= (uint32_t)((row[bit >> 3] >> (bit & 7)) & 1u) << b;
                }
                d[j] |= (int32_t)(v << 16);
            }
        }
        out_lse[r] = half_to_float(lse[r]);
        out_tail[r] = half_to_float(tail[r]);
    }
}

typedef void (*decode_fn)(Py_ssize_t, Py_ssize_t, int, Py_ssize_t, const uint8_t *, const uint16_t *,
                          const uint16_t *, const uint8_t *, const uint16_t *, const uint16_t *, float *,
                          int32_t *, float *, float *);

#define DECODE_ARGS                                                                                     \
    Py_ssize_t n, Py_ssize_t k, int hi_bits, Py_ssize_t hi_row, const uint8_t *codes,                  \
        const uint16_t *qparams, const uint16_t *lo, const uint8_t *hi, const uint16_t *lse,            \
        const uint16_t *tail, float *out_lp, int32_t *out_ids, float *out_lse, float *out_tail
#define DECODE_CALL n, k, hi_bits, hi_row, codes, qparams, lo, hi, lse, tail, out_lp, out_ids, out_lse, out_tail

static void decode_baseline(DECODE_ARGS) { decode(DECODE_CALL); }

/* x86-64 with GCC / clang: an AVX2 build of the same loops (AVX2 without FMA: the product and the
 * difference stay two operations), taken when the CPU has AVX2 */
#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_AVX2_BUILD 1
__attribute__((target("avx2"))) static void decode_avx2(DECODE_ARGS) { decode(DECODE_CALL); }
static int cpu_has_avx2 = 0; /* set once when the module loads (PyInit__rowdecode) */
#else
#define HAVE_AVX2_BUILD 0
#endif

/* isa: "auto" (AVX2 when the CPU has it), "baseline", "avx2" (ValueError without it) */
static decode_fn pick(const char *isa) {
    if (strcmp(isa, "baseline") == 0) return decode_baseline;
    int want_avx2 = strcmp(isa, "avx2") == 0;
    if (!want_avx2 && strcmp(isa, "auto") != 0) {
        PyErr_Format(PyExc_ValueError, "q8_rows: isa=%s, expected auto, baseline or avx2", isa);
        return NULL;
    }
#if HAVE_AVX2_BUILD
    if (cpu_has_avx2) return decode_avx2;
#endif
    if (want_avx2) {
        PyErr_SetString(PyExc_ValueError, "q8_rows: isa=avx2 but this CPU or build has no AVX2");
        return NULL;
    }
    return decode_baseline;
}

static int need(const Py_buffer *b, Py_ssize_t bytes, const char *name) {
    if (b->len != bytes) {
        PyErr_Format(PyExc_ValueError, "q8_rows: %s has %zd bytes, expected %zd", name, b->len, bytes);
        return 0;
    }
    return 1;
}

static int need_at_least(const Py_buffer *b, Py_ssize_t bytes, const char *name) {
    if (b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "q8_rows: %s has %zd bytes, needs at least %zd", name, b->len,
                     bytes);
        return 0;
    }
    return 1;
}

#define MAX_ROWS ((Py_ssize_t)1 << 40)
#define MAX_K ((Py_ssize_t)1 << 20)

static PyObject *q8_rows(PyObject *self, PyObject *args) {
    Py_ssize_t n, k, row0;
    int id_bits;
    PyObject *objs[11];
    const char *isa = "auto";
    if (!PyArg_ParseTuple(args, "nniOOOOOOOOOOn|s", &n, &k, &id_bits, &objs[0], &objs[1], &objs[2],
                          &objs[3], &objs[4], &objs[5], &objs[6], &objs[7], &objs[8], &objs[9], &row0,
                          &isa))
        return NULL;
    decode_fn run = pick(isa);
    if (run == NULL) return NULL;
    /* bounds that keep every byte count below (n + row0) * k * 4 < 2^63: no overflow in the checks */
    if (n < 0 || n > MAX_ROWS || k < 1 || k > MAX_K || row0 < 0 || row0 > MAX_ROWS || id_bits < 1 ||
        id_bits > 31) {
        PyErr_Format(PyExc_ValueError,
                     "q8_rows: n=%zd k=%zd id_bits=%d row0=%zd out of range (0 <= n, row0 <= 2^40, "
                     "1 <= k <= 2^20, 1 <= id_bits <= 31)",
                     n, k, id_bits, row0);
        return NULL;
    }
    const int hi_bits = id_bits > 16 ? id_bits - 16 : 0;
    const Py_ssize_t hi_row = (k * hi_bits + 7) / 8;
    static const char *names[10] = {"codes", "qparams", "ids_lo", "ids_hi", "lse", "tail",
                                    "out_logprobs", "out_ids", "out_lse", "out_tail"};
    Py_buffer buf[10];
    int got[10] = {0};
    PyObject *result = NULL;
    for (int i = 0; i < 10; i++) {
        if (i == 3 && objs[i] == Py_None) continue;
        int flags = i >= 6 ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS;
        if (PyObject_GetBuffer(objs[i], &buf[i], flags) < 0) goto done;
        got[i] = 1;
    }
    if ((hi_bits > 0) != (got[3] == 1)) {
        PyErr_Format(PyExc_ValueError, "q8_rows: ids_hi must be %s for id_bits=%d",
                     hi_bits > 0 ? "a buffer" : "None", id_bits);
        goto done;
    }
    const Py_ssize_t rows_end = row0 + n;
    if (!need(&buf[0], n * (k - 1), names[0]) || !need(&buf[1], n * 4, names[1]) ||
        !need(&buf[2], n * k * 2, names[2]) || (hi_bits > 0 && !need(&buf[3], n * hi_row, names[3])) ||
        !need(&buf[4], n * 2, names[4]) || !need(&buf[5], n * 2, names[5]) ||
        !need_at_least(&buf[6], rows_end * k * 4, names[6]) ||
        !need_at_least(&buf[7], rows_end * k * 4, names[7]) ||
        !need_at_least(&buf[8], rows_end * 4, names[8]) || !need_at_least(&buf[9], rows_end * 4, names[9]))
        goto done;
    Py_BEGIN_ALLOW_THREADS;
    run(n, k, hi_bits, hi_row, (const uint8_t *)buf[0].buf, (const uint16_t *)buf[1].buf,
           (const uint16_t *)buf[2].buf, got[3] ? (const uint8_t *)buf[3].buf : NULL,
           (const uint16_t *)buf[4].buf, (const uint16_t *)buf[5].buf, (float *)buf[6].buf + row0 * k,
           (int32_t *)buf[7].buf + row0 * k, (float *)buf[8].buf + row0, (float *)buf[9].buf + row0);
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
done:
    for (int i = 0; i < 10; i++)
        if (got[i]) PyBuffer_Release(&buf[i]);
    return result;
}

#ifndef ROWDECODE_SOURCE_SHA256
#define ROWDECODE_SOURCE_SHA256 "unknown"
#endif

static PyMethodDef methods[] = {
    {"q8_rows", q8_rows, METH_VARARGS, "Decode n q8 cache rows into fp32 / int32 outputs at row0."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rowdecode",
                                    "Compiled one-pass decode of q8 teacher-cache rows.", -1, methods};

/* source_sha256: the sha256 of this file when setup.py built it (codec.py ignores a stale build) */
PyMODINIT_FUNC PyInit__rowdecode(void) {
#if HAVE_AVX2_BUILD
    __builtin_cpu_init();
    cpu_has_avx2 = __builtin_cpu_supports("avx2");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "source_sha256", ROWDECODE_SOURCE_SHA256) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
