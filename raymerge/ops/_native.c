/* The two element loops that statistics passes spend most of their time in, compiled: rounding
 * float32 values to BF16 in place (`round_bf16`) and the per-exponent float64 sums of exact products
 * (`dot_buckets`). Each gives the very bits of its numpy form in raymerge/ops/numpy_kernel.py and
 * raymerge/ops/exact.py, which run wherever this module was not built (it is an optional extension:
 * a node without a C compiler installs raymerge all the same). See docs/ARCHITECTURE.md, "Native
 * loops". Buffers come in through the buffer protocol: C-contiguous, checked for type and length. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define EXPONENTS 2048           /* float64 exponent values; a bucket per sign and exponent */
#define LANES 4                  /* independent bucket sets: consecutive products in one binade do not wait on each other */
#define LOW_BITS ((UINT64_C(1) << 29) - 1) /* the float64 mantissa bits below a product's first 24 */
#define HIGH_KEYS 0x7F80         /* the largest high half of a magnitude that has no low half (infinity's) */

/* A C-contiguous, aligned buffer in native byte order of `itemsize`-byte elements whose struct
 * format is one of `kinds` ("f", "lq": numpy names int64 'l' on some platforms and 'q' on others;
 * itemsize 0: any), or -1 with a TypeError. */
static int get_buffer(PyObject *o, Py_buffer *b, int writable, const char *kinds, Py_ssize_t itemsize,
                      const char *what)
{
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    const char *f = b->format ? b->format : "B";
    if (*f == '@' || *f == '=' || *f == (PY_LITTLE_ENDIAN ? '<' : '>') || (!PY_LITTLE_ENDIAN && *f == '!'))
        f++; /* native byte order; another order keeps its prefix and is refused below */
    if (f[0] == '\0' || f[1] != '\0' || !strchr(kinds, f[0]) || (itemsize && b->itemsize != itemsize) ||
        (uintptr_t)b->buf % (uintptr_t)b->itemsize != 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous, aligned buffer of '%s' in native byte order "
                     "(%zd bytes each), got '%s'", what, kinds, itemsize, b->format ? b->format : "B");
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* One buffer a function takes: get_buffer's arguments. */
typedef struct {
    PyObject *obj;
    int writable;
    const char *kinds;
    Py_ssize_t itemsize;
    const char *what;
} Want;

static void release_buffers(Py_buffer *b, int count)
{
    while (count > 0)
        PyBuffer_Release(&b[--count]);
}

/* Every buffer of `want` into b, in order (get_buffer); on a failure, those got are released: -1. */
static int get_buffers(const Want *want, Py_buffer *b, int count)
{
    for (int i = 0; i < count; i++)
        if (get_buffer(want[i].obj, &b[i], want[i].writable, want[i].kinds, want[i].itemsize, want[i].what) < 0) {
            release_buffers(b, i);
            return -1;
        }
    return 0;
}

/* The order of the n uint32 keys of a row, ascending, equal keys in index order: an LSD radix sort
 * by bytes, a byte that every key of the row shares skipped. order: 2n int32 of room; returns the
 * half of it that holds the indices, the element of rank r at r. */
static const int32_t *radix_order(const uint32_t *keys, Py_ssize_t n, int32_t *order)
{
    Py_ssize_t hist[4][256] = {{0}}; /* each byte's digits, counted in one pass over the keys */
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t m = keys[i];
        hist[0][m & 0xFF]++;
        hist[1][(m >> 8) & 0xFF]++;
        hist[2][(m >> 16) & 0xFF]++;
        hist[3][m >> 24]++;
    }
    int32_t *a = order, *t = order + n;
    for (Py_ssize_t i = 0; i < n; i++)
        a[i] = (int32_t)i;
    for (int byte = 0, shift = 0; byte < 4; byte++, shift += 8) {
        Py_ssize_t *at = hist[byte];
        if (at[(keys[0] >> shift) & 0xFF] == n)
            continue; /* one digit for the whole row: the order stands */
        Py_ssize_t sum = 0;
        for (int d = 0; d < 256; d++) {
            Py_ssize_t c = at[d];
            at[d] = sum;
            sum += c;
        }
        for (Py_ssize_t i = 0; i < n; i++)
            t[at[(keys[a[i]] >> shift) & 0xFF]++] = a[i];
        int32_t *swap = a;
        a = t;
        t = swap;
    }
    return a;
}

/* round_bf16(x): each float32 of x rounded to BF16, half to even, in place; a NaN keeps its bits. */
static PyObject *round_bf16(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (get_buffer(arg, &b, 1, "f", 4, "round_bf16") < 0)
        return NULL;
    uint32_t *p = (uint32_t *)b.buf;
    Py_ssize_t n = b.len / 4;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t v = p[i];
        /* add 0x7FFF, plus one when the kept half is odd, then clear the low half: a finite value
         * overflows into the infinity's bits, as it should */
        uint32_t r = (v + 0x7FFFu + ((v >> 16) & 1u)) & 0xFFFF0000u;
        p[i] = (v & 0x7FFFFFFFu) > 0x7F800000u ? v : r;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static inline void add_part(double *acc, double part)
{
    uint64_t bits;
    memcpy(&bits, &part, 8);
    acc[bits >> 52] += part; /* sign and exponent: the part's bucket */
}

/* dot_buckets(x, y, lanes, narrow): adds each product x[i] * y[i] (float32 values, exact in float64;
 * y None: 1.0) into lanes, a float64 buffer of LANES * 2 * EXPONENTS sums, at the bucket of its sign
 * and exponent; unless narrow, a product is split first into its first 24 bits and the rest, each
 * added at its own bucket. Each bucket's sum is exact below 2**29 parts, so its value does not
 * depend on the order of the additions: the lanes' sums are those of exact.dot_sum's bincount. */
static PyObject *dot_buckets(PyObject *self, PyObject *args)
{
    PyObject *xo, *yo, *lo;
    int narrow;
    if (!PyArg_ParseTuple(args, "OOOp", &xo, &yo, &lo, &narrow))
        return NULL;
    Py_buffer x, y, lanes;
    int has_y = yo != Py_None;
    if (get_buffer(xo, &x, 0, "f", 4, "dot_buckets x") < 0)
        return NULL;
    if (has_y && get_buffer(yo, &y, 0, "f", 4, "dot_buckets y") < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    if (get_buffer(lo, &lanes, 1, "d", 8, "dot_buckets lanes") < 0) {
        PyBuffer_Release(&x);
        if (has_y)
            PyBuffer_Release(&y);
        return NULL;
    }
    if ((has_y && y.len != x.len) || lanes.len != LANES * 2 * EXPONENTS * 8) {
        PyErr_SetString(PyExc_ValueError, "dot_buckets: x and y differ in length, or lanes is not 4 * 4096 float64");
        PyBuffer_Release(&x);
        if (has_y)
            PyBuffer_Release(&y);
        PyBuffer_Release(&lanes);
        return NULL;
    }
    const float *xs = (const float *)x.buf, *ys = has_y ? (const float *)y.buf : NULL;
    double *acc = (double *)lanes.buf;
    Py_ssize_t n = x.len / 4;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        double *lane = acc + (i % LANES) * 2 * EXPONENTS;
        double p = ys ? (double)xs[i] * (double)ys[i] : (double)xs[i];
        if (narrow) {
            add_part(lane, p);
        } else {
            uint64_t bits;
            double high;
            memcpy(&bits, &p, 8);
            bits &= ~LOW_BITS;
            memcpy(&high, &bits, 8);
            add_part(lane, high);
            add_part(lane, p - high); /* the low part, exact (NaN where the product is not finite) */
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x);
    if (has_y)
        PyBuffer_Release(&y);
    PyBuffer_Release(&lanes);
    Py_RETURN_NONE;
}

/* high_counts(bits, counts): counts[b >> 16] += 1 for each uint32 b of bits; counts is int64, as
 * long as the high halves may reach (1 << 15 for magnitudes, whose sign bit is clear; 1 << 16 for
 * order keys). A high half past its end is a ValueError (the counts are then not to be used). */
static PyObject *high_counts(PyObject *self, PyObject *args)
{
    PyObject *bo, *co;
    if (!PyArg_ParseTuple(args, "OO", &bo, &co))
        return NULL;
    Py_buffer buf[2];
    const Want want[2] = {{bo, 0, "I", 4, "high_counts bits"}, {co, 1, "lq", 8, "high_counts counts"}};
    if (get_buffers(want, buf, 2) < 0)
        return NULL;
    const uint32_t *bits = (const uint32_t *)buf[0].buf;
    int64_t *counts = (int64_t *)buf[1].buf;
    Py_ssize_t n = buf[0].len / 4, bins = buf[1].len / 8;
    uint32_t past = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t high = bits[i] >> 16;
        if (high < (uint32_t)bins)
            counts[high] += 1;
        else
            past = 1;
    }
    Py_END_ALLOW_THREADS
    release_buffers(buf, 2);
    if (past) {
        PyErr_Format(PyExc_ValueError, "high_counts: a high half past the %zd counts", bins);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* row_ranks(keys, n, ranks): ranks[i] = the rank of keys[i] in its row (the n keys from
 * i - i % n), ascending, equal keys ranked in index order: the inverse of a stable argsort of each
 * row. keys: uint16 or uint32; ranks: int32. An LSD radix sort by bytes, a byte that every key of
 * the row shares skipped. */
static PyObject *row_ranks(PyObject *self, PyObject *args)
{
    PyObject *ko, *ro;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OnO", &ko, &n, &ro))
        return NULL;
    Py_buffer buf[2];
    const Want want[2] = {{ko, 0, "HI", 0, "row_ranks keys"}, {ro, 1, "i", 4, "row_ranks ranks"}};
    if (get_buffers(want, buf, 2) < 0)
        return NULL;
    Py_ssize_t width = buf[0].itemsize, count = buf[0].len / width;
    int32_t *order = NULL;
    uint32_t *wide = NULL;
    if (n <= 0 || n > INT32_MAX || count % n != 0 || buf[1].len / 4 != count)
        PyErr_SetString(PyExc_ValueError, "row_ranks: keys must be whole rows of n, and ranks as long");
    else if ((order = PyMem_RawMalloc(2 * (size_t)n * sizeof(int32_t))) == NULL ||
             (wide = PyMem_RawMalloc((size_t)n * sizeof(uint32_t))) == NULL)
        PyErr_NoMemory();
    else {
        int32_t *ranks = (int32_t *)buf[1].buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t row = 0; row < count; row += n) {
            const uint32_t *keys = (const uint32_t *)buf[0].buf + row;
            if (width == 2) { /* uint16 keys, widened: the same order */
                for (Py_ssize_t i = 0; i < n; i++)
                    wide[i] = ((const uint16_t *)buf[0].buf)[row + i];
                keys = wide;
            }
            const int32_t *a = radix_order(keys, n, order);
            for (Py_ssize_t i = 0; i < n; i++)
                ranks[row + a[i]] = (int32_t)i;
        }
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(order);
    PyMem_RawFree(wide);
    release_buffers(buf, 2);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* bf16_halves(x, out): out[i] = the high half of float32 x[i]'s bits (uint16); whether every low
 * half is 0 (x holds BF16 values alone: out then holds them whole). */
static PyObject *bf16_halves(PyObject *self, PyObject *args)
{
    PyObject *xo, *oo;
    if (!PyArg_ParseTuple(args, "OO", &xo, &oo))
        return NULL;
    Py_buffer buf[2];
    const Want want[2] = {{xo, 0, "f", 4, "bf16_halves x"}, {oo, 1, "H", 2, "bf16_halves out"}};
    if (get_buffers(want, buf, 2) < 0)
        return NULL;
    uint32_t low = 0;
    int ok = buf[1].len * 2 == buf[0].len;
    if (ok) {
        const uint32_t *p = (const uint32_t *)buf[0].buf;
        uint16_t *o = (uint16_t *)buf[1].buf;
        Py_ssize_t n = buf[0].len / 4;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            low |= p[i] & 0xFFFFu;
            o[i] = (uint16_t)(p[i] >> 16);
        }
        Py_END_ALLOW_THREADS
    }
    release_buffers(buf, 2);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "bf16_halves: out must have one element for each of x's");
        return NULL;
    }
    return PyBool_FromLong(low == 0);
}

/* bf16_widen(halves, out): out[i] = the float32 whose high half is halves[i] and low half 0. */
static PyObject *bf16_widen(PyObject *self, PyObject *args)
{
    PyObject *ho, *oo;
    if (!PyArg_ParseTuple(args, "OO", &ho, &oo))
        return NULL;
    Py_buffer buf[2];
    const Want want[2] = {{ho, 0, "H", 2, "bf16_widen halves"}, {oo, 1, "f", 4, "bf16_widen out"}};
    if (get_buffers(want, buf, 2) < 0)
        return NULL;
    int ok = buf[0].len * 2 == buf[1].len;
    if (ok) {
        const uint16_t *p = (const uint16_t *)buf[0].buf;
        uint32_t *o = (uint32_t *)buf[1].buf;
        Py_ssize_t n = buf[0].len / 2;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++)
            o[i] = (uint32_t)p[i] << 16;
        Py_END_ALLOW_THREADS
    }
    release_buffers(buf, 2);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "bf16_widen: out must have one element for each half");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* della_keep(x, n, below, words, out): della's draw over whole rows of n float32 values x: out[i]
 * = words[i] < below[r], r the rank of |x[i]| in its row (ascending, equal magnitudes in index
 * order, every NaN's magnitude as 0x7F800001: above every number, NaNs alike), as row_ranks ranks
 * the magnitude bits that raymerge/methods/sparse.py's della_ranks makes. below: n uint64; words:
 * uint32, out: bool, each as long as x. A row of BF16 magnitudes is ranked by counting its high
 * halves, any other by radix_order (row_ranks's sort). */
static PyObject *della_keep(PyObject *self, PyObject *args)
{
    PyObject *xo, *bo, *wo, *oo;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "OnOOO", &xo, &n, &bo, &wo, &oo))
        return NULL;
    Py_buffer buf[4];
    const Want want[4] = {{xo, 0, "f", 4, "della_keep x"}, {bo, 0, "LQ", 8, "della_keep below"},
                          {wo, 0, "I", 4, "della_keep words"}, {oo, 1, "?", 1, "della_keep out"}};
    if (get_buffers(want, buf, 4) < 0)
        return NULL;
    const Py_buffer x = buf[0], below = buf[1], words = buf[2], out = buf[3];
    Py_ssize_t count = x.len / 4;
    int32_t *order = NULL, *counts = NULL;
    uint32_t *keys = NULL;
    if (n <= 0 || n > INT32_MAX || count % n != 0 || below.len / 8 != n || words.len / 4 != count || out.len != count)
        PyErr_SetString(PyExc_ValueError, "della_keep: x must be whole rows of n, below n long, words and out as x");
    else if ((order = PyMem_RawMalloc(2 * (size_t)n * sizeof(int32_t))) == NULL ||
             (keys = PyMem_RawMalloc((size_t)n * sizeof(uint32_t))) == NULL ||
             (counts = PyMem_RawMalloc(((size_t)HIGH_KEYS + 1) * sizeof(int32_t))) == NULL)
        PyErr_NoMemory();
    else {
        const uint32_t *bits = (const uint32_t *)x.buf, *w = (const uint32_t *)words.buf;
        const uint64_t *b = (const uint64_t *)below.buf;
        unsigned char *o = (unsigned char *)out.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t row = 0; row < count; row += n) {
            uint32_t low = 0, least = UINT32_MAX, most = 0; /* least: of the keys but zeros */
            for (Py_ssize_t i = 0; i < n; i++) {
                uint32_t m = bits[row + i] & 0x7FFFFFFFu;
                keys[i] = m = m < 0x7F800001u ? m : 0x7F800001u;
                low |= m & 0xFFFFu;
                uint32_t nonzero = m ? m : UINT32_MAX;
                least = nonzero < least ? nonzero : least;
                most = m > most ? m : most;
            }
            least = least == UINT32_MAX ? 1 : least >> 16;
            most >>= 16;
            if (low == 0 && most + 1 - least < (uint32_t)(4 * n + 256)) {
                /* BF16 magnitudes (a NaN's has a low half) in a short span but zeros (a delta's
                 * many): a counting sort of the high halves, element by element in index order, so
                 * equal keys rank by index; the zeros counted just below the least other key */
                uint32_t zero = least - 1;
                memset(counts + zero, 0, (most - zero + 1) * sizeof(int32_t));
                for (Py_ssize_t i = 0; i < n; i++) {
                    uint32_t k = keys[i] >> 16;
                    counts[k ? k : zero]++;
                }
                int32_t sum = 0;
                for (uint32_t k = zero; k <= most; k++) {
                    int32_t c = counts[k];
                    counts[k] = sum;
                    sum += c;
                }
                for (Py_ssize_t i = 0; i < n; i++) {
                    uint32_t k = keys[i] >> 16;
                    o[row + i] = (uint64_t)w[row + i] < b[counts[k ? k : zero]++];
                }
                continue;
            }
            const int32_t *a = radix_order(keys, n, order);
            for (Py_ssize_t r = 0; r < n; r++) /* a[r]: the element of rank r */
                o[row + a[r]] = (uint64_t)w[row + a[r]] < b[r];
        }
        Py_END_ALLOW_THREADS
    }
    PyMem_RawFree(counts);
    PyMem_RawFree(order);
    PyMem_RawFree(keys);
    release_buffers(buf, 4);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* welford_variance(xs, out): for each element i, the population variance of xs[0][i] .. xs[k-1][i]
 * (float32 arrays) by Welford's steps in float64, as torch.var computes it on the CPU and as the
 * numpy form in raymerge/methods/sce.py does (each operation rounded alike: no fused multiply-add,
 * see the extension's compile flags), into out (float32): mean += (x - mean) / n, m2 += (x -
 * mean_before) * (x - mean_after), then m2 / k rounded to float32. */
static PyObject *welford_variance(PyObject *self, PyObject *args)
{
    PyObject *seq, *oo;
    if (!PyArg_ParseTuple(args, "OO", &seq, &oo))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "welford_variance: xs must be a sequence of arrays");
    if (fast == NULL)
        return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(fast), got = 0;
    Py_buffer out, *xs = PyMem_Calloc(k ? k : 1, sizeof(Py_buffer));
    if (xs == NULL) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    int have_out = get_buffer(oo, &out, 1, "f", 4, "welford_variance out") == 0, ok = have_out;
    for (; ok && got < k; got++) {
        if (get_buffer(PySequence_Fast_GET_ITEM(fast, got), &xs[got], 0, "f", 4, "welford_variance xs") < 0) {
            ok = 0;
            break;
        }
        if (xs[got].len != out.len) {
            PyErr_SetString(PyExc_ValueError, "welford_variance: every array must be as long as out");
            PyBuffer_Release(&xs[got]);
            ok = 0;
            break;
        }
    }
    if (ok) {
        float *o = (float *)out.buf;
        Py_ssize_t m = out.len / 4;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < m; i++) {
            double mean = 0.0, m2 = 0.0;
            for (Py_ssize_t j = 0; j < k; j++) {
                double x = (double)((const float *)xs[j].buf)[i];
                double delta = x - mean;
                mean = mean + delta / (double)(j + 1);
                m2 = m2 + delta * (x - mean);
            }
            o[i] = (float)(m2 / (double)k);
        }
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t j = 0; j < got; j++)
        PyBuffer_Release(&xs[j]);
    if (have_out)
        PyBuffer_Release(&out);
    PyMem_Free(xs);
    Py_DECREF(fast);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"round_bf16", round_bf16, METH_O, "Round float32 values to BF16 in place, half to even; NaNs kept."},
    {"dot_buckets", dot_buckets, METH_VARARGS, "Add exact products into per-sign-and-exponent float64 buckets."},
    {"high_counts", high_counts, METH_VARARGS, "Count uint32 bit patterns by their high 16 bits."},
    {"row_ranks", row_ranks, METH_VARARGS, "Each key's rank in its row of n (a stable ascending sort's inverse)."},
    {"bf16_halves", bf16_halves, METH_VARARGS, "The high halves of float32 values; whether every low half is 0."},
    {"bf16_widen", bf16_widen, METH_VARARGS, "float32 values of BF16 high halves."},
    {"della_keep", della_keep, METH_VARARGS, "della's keep mask over whole rows: random words below their rank's threshold."},
    {"welford_variance", welford_variance, METH_VARARGS, "Population variance across float32 arrays, Welford in float64."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
