/* The element loops that the passes spend most of their time in, compiled: rounding float32 values
 * to BF16 in place (`round_bf16`), the per-exponent float64 sums of exact products (`dot_buckets`),
 * per-row float64 sums (`segment_sums`), a method's chain of elementwise steps (`run_program`), and
 * the sparsifying methods' counts, ranks, draws and variances. Each gives the very bits of its
 * numpy form (raymerge/ops/numpy_kernel.py, exact.py, fused.py, methods/), which runs wherever this
 * module was not built (it is an optional extension: a node without a C compiler installs raymerge
 * all the same). See docs/ARCHITECTURE.md, "Native loops". Buffers come in through the buffer
 * protocol: C-contiguous, checked for type and length. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#define EXPONENTS 2048           /* float64 exponent values; a bucket per sign and exponent */
#define LANES 8                  /* independent bucket sets: consecutive products in one binade do not wait on each other */
#define LANE_PAD 24              /* float64s between two lanes' buckets: one bucket of each lane in one cache set no more */
#define LANE_SIZE (2 * EXPONENTS + LANE_PAD)
#define LOW_BITS ((UINT64_C(1) << 29) - 1) /* the float64 mantissa bits below a product's first 24 */
#define HIGH_KEYS 0x7F80         /* the largest high half of a magnitude that has no low half (infinity's) */
/* A loop worth vectorizing is compiled for wide vectors too, the CPU's best chosen at load time. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WIDE_VECTORS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define WIDE_VECTORS /* one build for the CPU the compiler targets */
#endif

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

/* A function's end: its count buffers released, then `error` (its check failed) raised as a
 * ValueError: 0; else 1. */
static int released(Py_buffer *b, int count, const char *error)
{
    release_buffers(b, count);
    if (error == NULL)
        return 1;
    PyErr_SetString(PyExc_ValueError, error);
    return 0;
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

/* The bits of a number (not a NaN) rounded to BF16, half to even: add 0x7FFF, plus one when the
 * kept half is odd, then clear the low half; a finite value overflows into the infinity's bits, as
 * it should. */
static inline uint32_t bf16_number_rounded(uint32_t v)
{
    return (v + 0x7FFFu + ((v >> 16) & 1u)) & 0xFFFF0000u;
}

/* Any float32's bits rounded to BF16: a number as above, a NaN kept as it is. */
static inline uint32_t bf16_rounded(uint32_t v)
{
    return (v & 0x7FFFFFFFu) > 0x7F800000u ? v : bf16_number_rounded(v);
}

/* The loops of round_bf16, bf16_halves, bf16_narrow and bf16_widen, compiled for the wider vector
 * units too (the default build's SSE2 has no packing of 32-bit lanes to 16 that fits them). */
WIDE_VECTORS
static void round_loop(uint32_t *restrict p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        p[i] = bf16_rounded(p[i]);
}

/* o = the high halves of p; returns the OR of the low halves (0: p held BF16 values alone). */
WIDE_VECTORS
static uint32_t halves_loop(const void *restrict x, Py_ssize_t n, void *restrict out)
{
    const uint32_t *p = x;
    uint16_t *o = out;
    uint32_t low = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        low |= p[i] & 0xFFFFu;
        o[i] = (uint16_t)(p[i] >> 16);
    }
    return low;
}

/* o = p rounded to BF16 as a number is (a NaN's bits go the same way: the caller mends NaNs). */
WIDE_VECTORS
static uint32_t narrow_loop(const void *restrict x, Py_ssize_t n, void *restrict out)
{
    const uint32_t *p = x;
    uint16_t *o = out;
    for (Py_ssize_t i = 0; i < n; i++)
        o[i] = (uint16_t)(bf16_number_rounded(p[i]) >> 16);
    return 0;
}

/* o = the float32s whose high halves are p (low halves 0). */
WIDE_VECTORS
static uint32_t widen_loop(const void *restrict x, Py_ssize_t n, void *restrict out)
{
    const uint16_t *p = x;
    uint32_t *o = out;
    for (Py_ssize_t i = 0; i < n; i++)
        o[i] = (uint32_t)p[i] << 16;
    return 0;
}

/* An elementwise conversion's loop: out's n elements from x's n (their types the loop's own);
 * returns a word of what it saw (halves_loop's low halves; 0 for the others). */
typedef uint32_t (*Conversion)(const void *restrict x, Py_ssize_t n, void *restrict out);

/* The body of name(x, out) for a Conversion: the two buffers as x and out describe them (their
 * objects taken from args), one element of out for each of x's, else ValueError `mismatch`.
 * *word: the loop's. Returns -1 with an exception set, else 0. */
static int convert(PyObject *args, Want x, Want out, const char *mismatch, Conversion loop, uint32_t *word)
{
    if (!PyArg_ParseTuple(args, "OO", &x.obj, &out.obj))
        return -1;
    const Want want[2] = {x, out};
    Py_buffer buf[2];
    if (get_buffers(want, buf, 2) < 0)
        return -1;
    Py_ssize_t n = buf[0].len / x.itemsize;
    int ok = buf[1].len / out.itemsize == n;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        *word = loop(buf[0].buf, n, buf[1].buf);
        Py_END_ALLOW_THREADS
    }
    return released(buf, 2, ok ? NULL : mismatch) ? 0 : -1;
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
    round_loop(p, n);
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

/* A part of at most 24 significant bits (a narrow product) in binade [2**e, 2**(e+1)) is a multiple
 * of 2**(e-23). SUM_BLOCK of them whose binades are at most SUM_WINDOW below the largest's add up
 * exactly in float64, in any order: their sum is below 2**(top+1+6) and a multiple of
 * 2**(top-SUM_WINDOW-23), 53 bits apart. So a block is summed first, in vector lanes, and only its
 * sum (split into parts of 24 bits: split_part) and the parts far below its largest (rare) go to the
 * buckets: their total, the only thing read of them, is the same exact value. */
#define SUM_BLOCK 64
#define SUM_WINDOW 23
#define MAGNITUDE UINT64_C(0x7FFFFFFFFFFFFFFF)
#define INFINITE UINT64_C(0x7FF0000000000000) /* a float64's bits from which on it is not finite */
#if defined(__GNUC__) || defined(__clang__)
#define IN_LOOP static inline __attribute__((always_inline)) /* compiled into each WIDE_VECTORS clone */
typedef double Sums __attribute__((vector_size(64))); /* eight float64 sums, one vector add each step */
#else
#define IN_LOOP static inline
#endif

static inline uint64_t magnitude(double v)
{
    uint64_t bits;
    memcpy(&bits, &v, 8);
    return bits & MAGNITUDE;
}

/* v's first 24 significant bits (its mantissa's bits below them cleared); v minus them is exact. */
static inline double first_24(double v)
{
    uint64_t bits;
    memcpy(&bits, &v, 8);
    bits &= ~LOW_BITS;
    memcpy(&v, &bits, 8);
    return v;
}

/* v (an exact sum of narrow parts: at most 53 significant bits) added to a lane's buckets in parts
 * of at most 24 significant bits, each exact: its first 24 bits, the next 24, the rest. Always
 * three additions, a zero part's to a bucket it leaves as it is: no branch to mispredict, as a loop
 * until nothing is left would (sums of 1 to 3 parts alternate at random). */
static inline void split_part(double *acc, double v)
{
    double high = first_24(v);
    add_part(acc, high);
    v -= high;
    double next = first_24(v);
    add_part(acc, next);
    add_part(acc, v - next);
}

#if defined(__GNUC__) || defined(__clang__)
/* The total of eight lanes of sums (exact where the callers use it: the order is free). */
IN_LOOP double lanes_total(const Sums *s)
{
    return (((*s)[0] + (*s)[1]) + ((*s)[2] + (*s)[3])) + (((*s)[4] + (*s)[5]) + ((*s)[6] + (*s)[7]));
}
#endif

/* The sum of p[0..SUM_BLOCK), in eight lanes (exact where add_block calls it: the order is free). */
IN_LOOP double block_sum(const double *restrict p)
{
#if defined(__GNUC__) || defined(__clang__)
    Sums s = {0};
    for (int k = 0; k < SUM_BLOCK; k += 8) {
        Sums v;
        memcpy(&v, p + k, sizeof v);
        s += v;
    }
    return lanes_total(&s);
#else
    double s = 0;
    for (int i = 0; i < SUM_BLOCK; i++)
        s += p[i];
    return s;
#endif
}

/* The narrow parts p[0..SUM_BLOCK) added to acc's lanes: summed whole where every nonzero part is
 * within SUM_WINDOW binades of the largest, at lane `lane`; else the parts that are, and each other
 * at its own bucket; a block with an infinity or a NaN part by part (their bucket: exact._summed).
 * A bucket gets at most one part a product (a block's far parts, or its sum's parts at most 3). */
IN_LOOP void add_block(const double *restrict p, double *acc, Py_ssize_t lane)
{
    uint64_t top = 0, bottom = MAGNITUDE;
    for (int i = 0; i < SUM_BLOCK; i++) {
        uint64_t m = magnitude(p[i]);
        top = m > top ? m : top;
        m -= 1; /* a zero's: the largest */
        bottom = m < bottom ? m : bottom;
    }
    if (top == 0) /* zeros alone (a mask's dropped block): nothing to add */
        return;
    if (top >= INFINITE) {
        for (int i = 0; i < SUM_BLOCK; i++)
            add_part(acc + (i % LANES) * LANE_SIZE, p[i]);
        return;
    }
    uint64_t low = (top & INFINITE) - ((uint64_t)SUM_WINDOW << 52); /* top's binade is above 2**-299 */
    if (bottom >= low - 1) {
        split_part(acc + lane * LANE_SIZE, block_sum(p));
        return;
    }
#if defined(__GNUC__) || defined(__clang__)
    Sums near = {0}; /* the parts within the window, in vector lanes (in any order: exact) */
    for (int k = 0; k < SUM_BLOCK; k += 8)
        for (int j = 0; j < 8; j++)
            near[j] += magnitude(p[k + j]) >= low ? p[k + j] : 0.0;
    double s = lanes_total(&near);
#else
    double s = 0;
    for (int i = 0; i < SUM_BLOCK; i++)
        s += magnitude(p[i]) >= low ? p[i] : 0.0;
#endif
    for (int i = 0; i < SUM_BLOCK; i++) { /* the far ones, each at its bucket */
        uint64_t m = magnitude(p[i]);
        if (m < low && m != 0)
            add_part(acc + (i % LANES) * LANE_SIZE, p[i]);
    }
    split_part(acc + lane * LANE_SIZE, s);
}

/* The products x[i] * y[i] (y NULL: x[i] alone) of n narrow values, exact in float64, into acc's
 * lanes a block at a time (add_block); the last partial block part by part. */
/* dot_buckets_pair's: x[i] into a's lanes and x[i] * y[i] into b's, a block of each at a time. */
WIDE_VECTORS
static void narrow_pair_sums(const float *restrict xs, const float *restrict ys, Py_ssize_t n, double *a, double *b)
{
    double p[SUM_BLOCK], q[SUM_BLOCK];
    Py_ssize_t whole = n - n % SUM_BLOCK;
    for (Py_ssize_t at = 0; at < whole; at += SUM_BLOCK) {
        for (int i = 0; i < SUM_BLOCK; i++) {
            p[i] = (double)xs[at + i];
            q[i] = p[i] * (double)ys[at + i];
        }
        add_block(p, a, (at / SUM_BLOCK) % LANES);
        add_block(q, b, (at / SUM_BLOCK) % LANES);
    }
    for (Py_ssize_t i = whole; i < n; i++) {
        add_part(a + (i % LANES) * LANE_SIZE, (double)xs[i]);
        add_part(b + (i % LANES) * LANE_SIZE, (double)xs[i] * (double)ys[i]);
    }
}

/* A float32's magnitude bits, and the bits from which on a float32 is not finite. */
#define MAGNITUDE_F32 UINT32_C(0x7FFFFFFF)
#define INFINITE_F32 UINT32_C(0x7F800000)

#if defined(__GNUC__) || defined(__clang__)
/* A block's SUM_BLOCK float32 parts q: the magnitude bits of its largest (*top) and smallest
 * (*bottom: a zero's too) part; returns all their bits or'ed (low bits clear in every part). The
 * bounds in 32-bit lanes: twice as many to a register as float64's, with native unsigned minimum
 * and maximum. */
IN_LOOP uint32_t block_bounds(const float *restrict q, uint32_t *top, uint32_t *bottom)
{
    uint32_t t = 0, b = UINT32_MAX, any = 0;
    for (int i = 0; i < SUM_BLOCK; i++) {
        uint32_t m;
        memcpy(&m, &q[i], 4);
        any |= m;
        m &= MAGNITUDE_F32;
        t = m > t ? m : t;
        b = m < b ? m : b;
    }
    *top = t, *bottom = b;
    return any;
}

/* Whether parts of these bounds (block_bounds) are all exact float32s within SUM_WINDOW binades of
 * the largest: every part finite and within the window (so none is zero: a product may be zero
 * having lost a tiny exact value), the largest's binade above 2**-102 (so every part is at least
 * 2**-125, a normal float32: none was rounded). */
IN_LOOP int in_window(uint32_t top, uint32_t bottom)
{
    return top < INFINITE_F32 && (top & INFINITE_F32) >= ((uint32_t)(SUM_WINDOW + 2) << 23) &&
           bottom >= (top & INFINITE_F32) - ((uint32_t)SUM_WINDOW << 23);
}

/* The parts q widened to float64 and added to the eight lanes s. */
IN_LOOP void add_lanes(const float *restrict q, Sums *s)
{
    for (int k = 0; k < SUM_BLOCK; k += 8) {
        Sums v;
        for (int j = 0; j < 8; j++)
            v[j] = (double)q[k + j];
        *s += v;
    }
}

/* The sum of a block's SUM_BLOCK parts q, made in float32 (narrow products: at most 24 significant
 * bits, which float32 holds unless they overflow or fall below its normal range), into *sum, where
 * it is add_block's exact sum of the exact parts: every part in the window (in_window). Returns 0,
 * summing nothing, for any other block. */
IN_LOOP int float32_block_sum(const float *restrict q, double *sum)
{
    uint32_t top, bottom;
    block_bounds(q, &top, &bottom);
    if (!in_window(top, bottom))
        return 0;
    Sums s = {0};
    add_lanes(q, &s);
    *sum = lanes_total(&s);
    return 1;
}
#endif

/* A program's sum step (OP_SUM), over one block: the products x[i] * y[i] (y NULL: times yv) of its m
 * narrow values at elements lo.. of the arrays, into acc's lanes, SUM_BLOCK at a time as narrow_sums
 * adds them (the lane of a sub-block by its place in the arrays: the same sums in any blocking); the
 * parts of a sub-block with an infinity or a NaN product are taken one by one, those counted at
 * SPECIALS instead of added (the rows may not be kept for exact._summed to count them after). */
#define SPECIALS (2 * EXPONENTS) /* lane 0's counts of +inf, -inf and NaN products, in its padding */
IN_LOOP void count_or_add(double *acc, Py_ssize_t i, double p)
{
    if (magnitude(p) < INFINITE)
        add_part(acc + (i % LANES) * LANE_SIZE, p);
    else
        acc[SPECIALS + (p != p ? 2 : p < 0)] += 1;
}

/* Sub-blocks of products of at most 16 significant bits (BF16 values': their low 8 bits clear)
 * whose parts all lie within SUM_WINDOW binades of the largest of them are summed together, up
 * to GROUP of them, in the vector lanes, before one split into the buckets: for the smallest
 * part's binade e, every part is a multiple of 2**(e-15), and at most 64 * GROUP of them lie below
 * 2**(e+SUM_WINDOW+1) each, so every partial sum is a multiple of 2**(e-15) below
 * 2**(e+SUM_WINDOW+10): 48 bits apart, exact in float64's 53. */
#if defined(__GNUC__) || defined(__clang__)
#define GROUP 8
typedef struct {
    Sums s;               /* the group's lanes */
    uint32_t top, bottom; /* the magnitude bits of its largest and smallest part */
    int blocks;           /* sub-blocks in it (0: none) */
    Py_ssize_t lane;      /* the lane its sum goes to: its first sub-block's */
} Group;

IN_LOOP void group_flush(Group *g, double *acc)
{
    if (g->blocks)
        split_part(acc + g->lane * LANE_SIZE, lanes_total(&g->s));
    g->blocks = 0;
}

/* Sub-block q of 16-bit parts in the window (block_bounds: top, bottom; in_window) into the group
 * where the window of the two allows, else into a new one. */
IN_LOOP void group_add(Group *g, const float *restrict q, uint32_t top, uint32_t bottom, Py_ssize_t lane,
                       double *acc)
{
    if (g->blocks) {
        uint32_t t = top > g->top ? top : g->top, b = bottom < g->bottom ? bottom : g->bottom;
        if (g->blocks < GROUP && b >= (t & INFINITE_F32) - ((uint32_t)SUM_WINDOW << 23)) {
            g->top = t, g->bottom = b;
        } else {
            group_flush(g, acc);
        }
    }
    if (!g->blocks) {
        Sums zero = {0};
        g->s = zero, g->top = top, g->bottom = bottom, g->lane = lane;
    }
    add_lanes(q, &g->s);
    g->blocks++;
}
#endif

IN_LOOP void program_sum(const float *restrict xs, const float *restrict ys, float yv, Py_ssize_t lo,
                         Py_ssize_t m, double *acc)
{
    Py_ssize_t whole = m - m % SUM_BLOCK;
#if defined(__GNUC__) || defined(__clang__)
    Group g = {.blocks = 0};
#endif
    for (Py_ssize_t at = 0; at < whole; at += SUM_BLOCK) {
        Py_ssize_t lane = (lo + at) / SUM_BLOCK % LANES;
        double p[SUM_BLOCK];
#if defined(__GNUC__) || defined(__clang__)
        float q[SUM_BLOCK];
        uint32_t high, low;
        if (ys)
            for (int i = 0; i < SUM_BLOCK; i++)
                q[i] = xs[at + i] * ys[at + i];
        else
            for (int i = 0; i < SUM_BLOCK; i++)
                q[i] = xs[at + i] * yv;
        uint32_t bits = block_bounds(q, &high, &low);
        if (in_window(high, low)) {
            if (bits & 0xFFu) { /* a part of more than 16 significant bits: the block alone */
                Sums s = {0};
                add_lanes(q, &s);
                split_part(acc + lane * LANE_SIZE, lanes_total(&s));
            } else {
                group_add(&g, q, high, low, lane, acc);
            }
            continue;
        }
#endif
        uint64_t top = 0;
        for (int i = 0; i < SUM_BLOCK; i++) {
            p[i] = (double)xs[at + i] * (double)(ys ? ys[at + i] : yv);
            uint64_t mag = magnitude(p[i]);
            top = mag > top ? mag : top;
        }
        if (top < INFINITE)
            add_block(p, acc, lane);
        else
            for (int i = 0; i < SUM_BLOCK; i++)
                count_or_add(acc, lo + at + i, p[i]);
    }
#if defined(__GNUC__) || defined(__clang__)
    group_flush(&g, acc);
#endif
    for (Py_ssize_t i = whole; i < m; i++)
        count_or_add(acc, lo + i, (double)xs[i] * (double)(ys ? ys[i] : yv));
}

WIDE_VECTORS
static void narrow_sums(const float *restrict xs, const float *restrict ys, Py_ssize_t n, double *acc)
{
    double p[SUM_BLOCK];
    Py_ssize_t whole = n - n % SUM_BLOCK;
    for (Py_ssize_t at = 0; at < whole; at += SUM_BLOCK) {
#if defined(__GNUC__) || defined(__clang__)
        float q[SUM_BLOCK];
        double sum;
        for (int i = 0; i < SUM_BLOCK; i++)
            q[i] = ys ? xs[at + i] * ys[at + i] : xs[at + i];
        if (float32_block_sum(q, &sum)) {
            split_part(acc + (at / SUM_BLOCK) % LANES * LANE_SIZE, sum);
            continue;
        }
#endif
        if (ys)
            for (int i = 0; i < SUM_BLOCK; i++)
                p[i] = (double)xs[at + i] * (double)ys[at + i];
        else
            for (int i = 0; i < SUM_BLOCK; i++)
                p[i] = (double)xs[at + i];
        add_block(p, acc, (at / SUM_BLOCK) % LANES);
    }
    for (Py_ssize_t i = whole; i < n; i++)
        add_part(acc + (i % LANES) * LANE_SIZE, ys ? (double)xs[i] * (double)ys[i] : (double)xs[i]);
}

/* dot_buckets(x, y, lanes, narrow): adds each product x[i] * y[i] (float32 values, exact in float64;
 * y None: 1.0) into lanes, a float64 buffer of LANES * LANE_SIZE sums, at the bucket of its sign
 * and exponent; unless narrow, a product is split first into its first 24 bits and the rest, each
 * added at its own bucket; narrow, a block of products is summed first (narrow_sums). Each bucket's
 * sum is exact below 2**29 parts, so its value does not depend on the order of the additions: the
 * lanes' total is that of exact.dot_sum's bincount. */
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
    if ((has_y && y.len != x.len) || lanes.len != LANES * LANE_SIZE * 8) {
        PyErr_SetString(PyExc_ValueError, "dot_buckets: x and y differ in length, or lanes is not 8 * 4120 float64");
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
    if (narrow)
        narrow_sums(xs, ys, n, acc);
    else
        for (Py_ssize_t i = 0; i < n; i++) {
            double *lane = acc + (i % LANES) * LANE_SIZE;
            double p = ys ? (double)xs[i] * (double)ys[i] : (double)xs[i], high = first_24(p);
            add_part(lane, high);
            add_part(lane, p - high); /* the low part, exact (NaN where the product is not finite) */
        }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x);
    if (has_y)
        PyBuffer_Release(&y);
    PyBuffer_Release(&lanes);
    Py_RETURN_NONE;
}

/* dot_buckets_pair(x, y, a, b): dot_buckets(x, None, a, narrow) and dot_buckets(x, y, b, narrow) in
 * one loop (a sum and the sum of what a mask y of 1.0 and 0.0 keeps of it: the sparsifying methods'
 * L1 norms before and after the drop); x and y narrow (a product of at most 24 significant bits). */
static PyObject *dot_buckets_pair(PyObject *self, PyObject *args)
{
    PyObject *xo, *yo, *ao, *bo;
    if (!PyArg_ParseTuple(args, "OOOO", &xo, &yo, &ao, &bo))
        return NULL;
    Py_buffer buf[4];
    const Want want[4] = {{xo, 0, "f", 4, "dot_buckets_pair x"}, {yo, 0, "f", 4, "dot_buckets_pair y"},
                          {ao, 1, "d", 8, "dot_buckets_pair a"}, {bo, 1, "d", 8, "dot_buckets_pair b"}};
    if (get_buffers(want, buf, 4) < 0)
        return NULL;
    int ok = buf[1].len == buf[0].len && buf[2].len == LANES * LANE_SIZE * 8 && buf[3].len == buf[2].len;
    if (ok) {
        const float *xs = (const float *)buf[0].buf, *ys = (const float *)buf[1].buf;
        Py_ssize_t n = buf[0].len / 4;
        Py_BEGIN_ALLOW_THREADS
        narrow_pair_sums(xs, ys, n, (double *)buf[2].buf, (double *)buf[3].buf);
        Py_END_ALLOW_THREADS
    }
    if (!released(buf, 4, ok ? NULL :
                  "dot_buckets_pair: x and y differ in length, or a or b is not 8 * 4120 float64"))
        return NULL;
    Py_RETURN_NONE;
}

/* out[i] = 1.0 where min(|x[i]|'s bits, cap) >= t (inclusive) or > t, else 0.0; how many equal t. */
WIDE_VECTORS
static Py_ssize_t above_loop(const uint32_t *restrict bits, Py_ssize_t n, uint32_t t, int inclusive, uint32_t cap,
                             float *restrict out)
{
    Py_ssize_t ties = 0;
    if (inclusive)
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t m = bits[i] & 0x7FFFFFFFu;
            m = m < cap ? m : cap;
            out[i] = m >= t ? 1.0f : 0.0f;
            ties += m == t;
        }
    else
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t m = bits[i] & 0x7FFFFFFFu;
            m = m < cap ? m : cap;
            out[i] = m > t ? 1.0f : 0.0f;
            ties += m == t;
        }
    return ties;
}

/* magnitude_above(x, threshold, inclusive, cap, out): a TIES or breadcrumbs selection's mask in
 * one loop (raymerge/methods/sparse.py's top_mask): out (float32) = 1.0 where the magnitude bits of
 * float32 x[i] (its bits but the sign), made no larger than cap (every NaN's alike), are >=
 * threshold (inclusive) or > threshold, else 0.0; returns how many equal the threshold (the ties a
 * selection places by index). x and out may not overlap. */
static PyObject *magnitude_above(PyObject *self, PyObject *args)
{
    PyObject *xo, *oo;
    unsigned long threshold, cap;
    int inclusive;
    if (!PyArg_ParseTuple(args, "OkpkO", &xo, &threshold, &inclusive, &cap, &oo))
        return NULL;
    Py_buffer buf[2];
    const Want want[2] = {{xo, 0, "f", 4, "magnitude_above x"}, {oo, 1, "f", 4, "magnitude_above out"}};
    if (get_buffers(want, buf, 2) < 0)
        return NULL;
    int ok = buf[1].len == buf[0].len && threshold <= UINT32_MAX && cap <= UINT32_MAX;
    Py_ssize_t ties = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        ties = above_loop((const uint32_t *)buf[0].buf, buf[0].len / 4, (uint32_t)threshold, inclusive,
                          (uint32_t)cap, (float *)buf[1].buf);
        Py_END_ALLOW_THREADS
    }
    if (!released(buf, 2, ok ? NULL : "magnitude_above: out must be as long as x, threshold and cap 32-bit"))
        return NULL;
    return PyLong_FromSsize_t(ties);
}

/* low_counts' loop: a block of 32 keys looked at in vector registers, counted one by one only where
 * one of them lies in the bin (most blocks hold none: the bin is a sliver of the values). */
WIDE_VECTORS
static void count_low_halves(const uint32_t *restrict bits, Py_ssize_t n, uint32_t high, int64_t *restrict counts)
{
    Py_ssize_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint32_t hit = 0;
        for (int j = 0; j < 32; j++)
            hit |= (bits[i + j] >> 16) == high;
        if (hit)
            for (int j = 0; j < 32; j++)
                if (bits[i + j] >> 16 == high)
                    counts[bits[i + j] & 0xFFFFu]++;
    }
    for (; i < n; i++)
        if (bits[i] >> 16 == high)
            counts[bits[i] & 0xFFFFu]++;
}

/* low_counts(bits, high, counts): counts[b & 0xFFFF] += 1 for each uint32 b of bits whose high half
 * is `high` (counts: int64, 1 << 16 of them): a radix selection's second digit, in one pass. */
static PyObject *low_counts(PyObject *self, PyObject *args)
{
    PyObject *bo, *co;
    unsigned long high;
    if (!PyArg_ParseTuple(args, "OkO", &bo, &high, &co))
        return NULL;
    Py_buffer buf[2];
    const Want want[2] = {{bo, 0, "I", 4, "low_counts bits"}, {co, 1, "lq", 8, "low_counts counts"}};
    if (get_buffers(want, buf, 2) < 0)
        return NULL;
    int ok = buf[1].len == (Py_ssize_t)8 << 16;
    if (ok) {
        const uint32_t *bits = (const uint32_t *)buf[0].buf;
        int64_t *counts = (int64_t *)buf[1].buf;
        Py_ssize_t n = buf[0].len / 4;
        Py_BEGIN_ALLOW_THREADS
        if (high <= 0xFFFFu) /* else no key's high half is it */
            count_low_halves(bits, n, (uint32_t)high, counts);
        Py_END_ALLOW_THREADS
    }
    if (!released(buf, 2, ok ? NULL : "low_counts: counts must be 1 << 16 int64"))
        return NULL;
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
    uint32_t low;
    if (convert(args, (Want){NULL, 0, "f", 4, "bf16_halves x"}, (Want){NULL, 1, "H", 2, "bf16_halves out"},
                "bf16_halves: out must have one element for each of x's", halves_loop, &low) < 0)
        return NULL;
    return PyBool_FromLong(low == 0);
}

/* bf16_narrow(x, out): out[i] = float32 x[i] rounded half to even to BF16, as its high half
 * (uint16); a NaN's bits are rounded as a number's (the caller gives NaNs their own). */
static PyObject *bf16_narrow(PyObject *self, PyObject *args)
{
    uint32_t none;
    if (convert(args, (Want){NULL, 0, "f", 4, "bf16_narrow x"}, (Want){NULL, 1, "H", 2, "bf16_narrow out"},
                "bf16_narrow: out must have one element for each of x's", narrow_loop, &none) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* order_keys(x, keys): keys[i] = a uint32 ordered as float32 x[i] is, as torch sorts: -0.0 the key
 * of +0.0, every NaN all ones (above +inf's). A number's bits with the sign bit set (the negatives,
 * whose order their bits reverse) inverted, the others' sign bit set. */
WIDE_VECTORS
static uint32_t order_loop(const void *restrict values, Py_ssize_t n, void *restrict out)
{
    const float *x = values;
    uint32_t *keys = out;
    for (Py_ssize_t i = 0; i < n; i++) {
        float v = x[i] + 0.0f; /* -0.0 + 0.0 is +0.0 */
        uint32_t b;
        memcpy(&b, &v, 4);
        uint32_t key = b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u);
        keys[i] = v != v ? 0xFFFFFFFFu : key;
    }
    return 0;
}

static PyObject *order_keys(PyObject *self, PyObject *args)
{
    uint32_t none;
    if (convert(args, (Want){NULL, 0, "f", 4, "order_keys x"}, (Want){NULL, 1, "I", 4, "order_keys keys"},
                "order_keys: keys must have one element for each of x's", order_loop, &none) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* bf16_widen(halves, out): out[i] = the float32 whose high half is halves[i] and low half 0. */
static PyObject *bf16_widen(PyObject *self, PyObject *args)
{
    uint32_t none;
    if (convert(args, (Want){NULL, 0, "H", 2, "bf16_widen halves"}, (Want){NULL, 1, "f", 4, "bf16_widen out"},
                "bf16_widen: out must have one element for each half", widen_loop, &none) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* A row's magnitude keys (della_keep): keys[i] = |bits[i]| with every NaN's as 0x7F800001 (above
 * every number, NaNs alike); *low: the OR of their low halves (0: BF16 magnitudes, no NaN), *least:
 * the least key but zeros less one (UINT32_MAX: all zero), *most: the largest. One vector loop. */
WIDE_VECTORS
static void magnitude_keys(const uint32_t *restrict bits, Py_ssize_t n, uint32_t *restrict keys, uint32_t *low,
                           uint32_t *least, uint32_t *most)
{
    uint32_t l = 0, lo = UINT32_MAX, hi = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t m = bits[i] & 0x7FFFFFFFu;
        m = m < 0x7F800001u ? m : 0x7F800001u;
        keys[i] = m;
        l |= m;
        uint32_t less = m - 1u; /* a zero wraps to the largest */
        lo = less < lo ? less : lo;
        hi = m > hi ? m : hi;
    }
    *low = l & 0xFFFFu, *least = lo, *most = hi;
}

/* keys[i] = the high half of keys[i], a zero's as `zero` (just below the least other's). */
WIDE_VECTORS
static void high_keys(uint32_t *restrict keys, Py_ssize_t n, uint32_t zero)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t k = keys[i] >> 16;
        keys[i] = k ? k : zero;
    }
}

/* della_keep(x, n, below, words, out): della's draw over whole rows of n float32 values x: out[i]
 * = words[i] < below[r], r the rank of |x[i]| in its row (ascending, equal magnitudes in index
 * order, every NaN's magnitude as 0x7F800001: above every number, NaNs alike), as row_ranks ranks
 * the magnitude bits that raymerge/methods/sparse.py's della_ranks makes. below: n uint64; words:
 * uint32, out: bool, each as long as x. A row of BF16 magnitudes is ranked by counting its high
 * halves, any other by radix_order (row_ranks's sort). The count runs over the row's two halves
 * side by side, each with counts of its own (offset by the first half's for the second: index
 * order kept), so that a run of equal keys is two chains of increments, not one. */
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
             (counts = PyMem_RawMalloc(2 * ((size_t)HIGH_KEYS + 1) * sizeof(int32_t))) == NULL)
        PyErr_NoMemory();
    else {
        const uint32_t *bits = (const uint32_t *)x.buf, *w = (const uint32_t *)words.buf;
        const uint64_t *b = (const uint64_t *)below.buf;
        unsigned char *o = (unsigned char *)out.buf;
        int32_t *first = counts, *second = counts + HIGH_KEYS + 1;
        Py_ssize_t h = n / 2; /* the first half: [0, h); the second: [h, n) */
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t row = 0; row < count; row += n) {
            uint32_t low, least, most;
            magnitude_keys(bits + row, n, keys, &low, &least, &most);
            least = least == UINT32_MAX ? 1 : (least + 1) >> 16;
            most >>= 16;
            const uint32_t *wr = w + row;
            unsigned char *orow = o + row;
            if (low == 0 && most + 1 - least < (uint32_t)(4 * n + 256)) {
                /* BF16 magnitudes (a NaN's has a low half) in a short span but zeros (a delta's
                 * many): a counting sort of the high halves, the zeros counted just below the
                 * least other key */
                uint32_t zero = least - 1;
                high_keys(keys, n, zero);
                size_t span = (most - zero + 1) * sizeof(int32_t);
                memset(first + zero, 0, span);
                memset(second + zero, 0, span);
                for (Py_ssize_t i = 0; i < h; i++) {
                    first[keys[i]]++;
                    second[keys[h + i]]++;
                }
                if (n % 2)
                    second[keys[n - 1]]++;
                int32_t sum = 0;
                for (uint32_t k = zero; k <= most; k++) {
                    int32_t c = first[k], d = second[k];
                    first[k] = sum;
                    second[k] = sum + c;
                    sum += c + d;
                }
                for (Py_ssize_t i = 0; i < h; i++) {
                    orow[i] = (uint64_t)wr[i] < b[first[keys[i]]++];
                    orow[h + i] = (uint64_t)wr[h + i] < b[second[keys[h + i]]++];
                }
                if (n % 2)
                    orow[n - 1] = (uint64_t)wr[n - 1] < b[second[keys[n - 1]]++];
                continue;
            }
            const int32_t *a = radix_order(keys, n, order);
            for (Py_ssize_t r = 0; r < n; r++) /* a[r]: the element of rank r */
                orow[a[r]] = (uint64_t)wr[a[r]] < b[r];
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

#ifdef __SIZEOF_INT128__ /* a 64 x 64 -> 128-bit product (GCC, Clang); elsewhere numpy draws the words */
/* One block of Philox4x64-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), as
 * numpy's np.random.Philox computes it: counter (c, 0, 0, 0), key k; out: its four 64-bit words.
 * (One block at a time: several side by side, or in vector lanes, measured slower on x86-64.) */
static inline void philox_block(uint64_t c, uint64_t k0, uint64_t k1, uint64_t out[4])
{
    uint64_t x0 = c, x1 = 0, x2 = 0, x3 = 0;
    for (int round = 0; round < 10; round++) {
        if (round) {
            k0 += UINT64_C(0x9E3779B97F4A7C15);
            k1 += UINT64_C(0xBB67AE8584CAA73B);
        }
        unsigned __int128 p0 = (unsigned __int128)UINT64_C(0xD2E7470EE14C6C93) * x0;
        unsigned __int128 p1 = (unsigned __int128)UINT64_C(0xCA5A826395121157) * x2;
        x0 = (uint64_t)(p1 >> 64) ^ x1 ^ k0;
        x1 = (uint64_t)p1;
        x2 = (uint64_t)(p0 >> 64) ^ x3 ^ k1;
        x3 = (uint64_t)p0;
    }
    out[0] = x0, out[1] = x1, out[2] = x2, out[3] = x3;
}

/* philox_words(key, begin, out): out[i] = the 32 random bits of element begin + i of a tensor
 * (raymerge/ops/sparse.py's random_words): element e is half e % 2 (the low one first) of 64-bit
 * word (e % 8) / 2 of the Philox block of counter e / 8 + 1 under the key (two uint64s): the words
 * numpy's Philox(key=key, counter=0).random_raw() gives in turn (it counts up before each block). */
static PyObject *philox_words(PyObject *self, PyObject *args)
{
    PyObject *ko, *oo;
    unsigned long long begin;
    if (!PyArg_ParseTuple(args, "OKO", &ko, &begin, &oo))
        return NULL;
    Py_buffer buf[2];
    const Want want[2] = {{ko, 0, "LQ", 8, "philox_words key"}, {oo, 1, "I", 4, "philox_words out"}};
    if (get_buffers(want, buf, 2) < 0)
        return NULL;
    int ok = buf[0].len == 16;
    if (ok) {
        const uint64_t k0 = ((const uint64_t *)buf[0].buf)[0], k1 = ((const uint64_t *)buf[0].buf)[1];
        uint32_t *o = (uint32_t *)buf[1].buf;
        uint64_t n = (uint64_t)(buf[1].len / 4), e = begin, end = begin + n;
        Py_BEGIN_ALLOW_THREADS
        uint64_t words[4]; /* in memory order, a block's halves are its elements' (numpy views them so) */
        uint32_t halves[8];
        if (e % 8 && e < end) { /* a first block begun before `begin` */
            philox_block(e / 8 + 1, k0, k1, words);
            memcpy(halves, words, sizeof(words));
            for (; e % 8 && e < end; e++)
                *o++ = halves[e % 8];
        }
        for (; end - e >= 8; e += 8, o += 8) { /* whole blocks */
            philox_block(e / 8 + 1, k0, k1, words);
            memcpy(o, words, sizeof(words));
        }
        if (e < end) { /* a last block ended after the elements */
            philox_block(e / 8 + 1, k0, k1, words);
            memcpy(o, words, (size_t)(end - e) * 4);
        }
        Py_END_ALLOW_THREADS
    }
    if (!released(buf, 2, ok ? NULL : "philox_words: the key is two uint64s"))
        return NULL;
    Py_RETURN_NONE;
}
#endif

#define WELFORD_BLOCK 512 /* elements whose float64 mean and m2 stay in L1 while each array is added */

/* welford_variance's elements at .. at + n: the arrays one after another over the block (a loop
 * over elements the compiler vectorizes), each element's operations in the same order as one
 * element at a time. */
WIDE_VECTORS
static void welford_block(const Py_buffer *xs, Py_ssize_t k, Py_ssize_t at, Py_ssize_t n, float *restrict o)
{
    double mean[WELFORD_BLOCK], m2[WELFORD_BLOCK];
    for (Py_ssize_t i = 0; i < n; i++)
        mean[i] = m2[i] = 0.0;
    for (Py_ssize_t j = 0; j < k; j++) {
        const float *restrict x = (const float *)xs[j].buf + at;
        const double count = (double)(j + 1);
        for (Py_ssize_t i = 0; i < n; i++) {
            double v = (double)x[i], delta = v - mean[i];
            mean[i] = mean[i] + delta / count;
            m2[i] = m2[i] + delta * (v - mean[i]);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        o[at + i] = (float)(m2[i] / (double)k);
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
        for (Py_ssize_t at = 0; at < m; at += WELFORD_BLOCK)
            welford_block(xs, k, at, m - at < WELFORD_BLOCK ? m - at : WELFORD_BLOCK, o);
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

/* run_program's instructions: four int32 each, (op, dst, x, y); an operand x or y >= 0 is an array
 * of the program's, -1 - k its k-th scalar. An arithmetic op may carry OP_ROUNDED: its result is
 * rounded to BF16 in the same loop (an OP_ROUND_BF16 of dst after it, without a pass of its own).
 * OP_SUM's dst is no array but a set of lanes of the program's `sums`: the exact sum of x * y is
 * added there (program_sum), x and y narrow. OP_HALVES writes the high halves of x's float32s
 * into dst, an array of uint16 (a BF16 value kept in 2 bytes, as bf16_halves), noting whether a
 * low half was set (a value no BF16 holds). */
enum { OP_WIDEN_BF16, OP_COPY, OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_ROUND_BF16, OP_GT, OP_GE, OP_EQ, OP_SUM, OP_HALVES,
       OPS };
#define OP_ROUNDED 0x100
#define IS_ARITH(op) ((op) >= OP_ADD && (op) <= OP_DIV)
#define MAX_ARRAYS 32
#define BLOCK 512 /* elements a block: a program's arrays' blocks stay in a core's L1 cache */

/* f rounded to BF16 as bf16_rounded rounds its bits; a NaN told by a float comparison (one
 * vector instruction, where the bits' unsigned comparison takes two in AVX2). */
static inline float bf16_round_value(float f)
{
    uint32_t v;
    memcpy(&v, &f, 4);
    uint32_t r = bf16_number_rounded(v);
    float g;
    memcpy(&g, &r, 4);
    return f != f ? f : g;
}

/* One arithmetic instruction over a block's m elements: out = x op y, each a float32 array or scalar.
 * Plain float operations, rounded once each as numpy's ufuncs (no contraction: the compile flags);
 * ROUND: the result rounded to BF16 after, in the same loop. */
#define ARITH_LOOPS(OPER, ROUND)                                                      \
    do {                                                                              \
        if (xs && ys)                                                                 \
            for (Py_ssize_t i = 0; i < m; i++) out[i] = ROUND(xs[i] OPER ys[i]);      \
        else if (xs)                                                                  \
            for (Py_ssize_t i = 0; i < m; i++) out[i] = ROUND(xs[i] OPER yv);         \
        else if (ys)                                                                  \
            for (Py_ssize_t i = 0; i < m; i++) out[i] = ROUND(xv OPER ys[i]);         \
        else                                                                          \
            for (Py_ssize_t i = 0; i < m; i++) out[i] = ROUND(xv OPER yv);            \
    } while (0)
#define AS_IS(v) (v)
#define ARITH(OPER)                                                                   \
    do {                                                                              \
        if (rounded)                                                                  \
            ARITH_LOOPS(OPER, bf16_round_value);                                      \
        else                                                                          \
            ARITH_LOOPS(OPER, AS_IS);                                                 \
    } while (0)

/* A comparison over a block's m elements: out = 1.0 where x op y holds, else 0.0. */
#define COMPARE(OPER)                                                                 \
    do {                                                                              \
        if (xs && ys)                                                                 \
            for (Py_ssize_t i = 0; i < m; i++) out[i] = xs[i] OPER ys[i] ? 1.0f : 0.0f; \
        else if (xs)                                                                  \
            for (Py_ssize_t i = 0; i < m; i++) out[i] = xs[i] OPER yv ? 1.0f : 0.0f;  \
        else if (ys)                                                                  \
            for (Py_ssize_t i = 0; i < m; i++) out[i] = xv OPER ys[i] ? 1.0f : 0.0f;  \
        else                                                                          \
            for (Py_ssize_t i = 0; i < m; i++) out[i] = xv OPER yv ? 1.0f : 0.0f;     \
    } while (0)

/* An input's BF16 block AHEAD blocks on, asked of memory now: it lies in another page (most
 * often), where the hardware's prefetcher does not follow a stream, so without this every page's
 * first lines are read while the loop waits. */
#define AHEAD 4
static inline void prefetch_ahead(const uint16_t *h, Py_ssize_t lo, Py_ssize_t n)
{
#if defined(__GNUC__) || defined(__clang__)
    Py_ssize_t from = AHEAD * BLOCK, to = from + BLOCK < n - lo ? from + BLOCK : n - lo;
    for (Py_ssize_t i = from; i < to; i += 32) /* a 64-byte line: 32 halves */
        __builtin_prefetch(h + i, 0, 0);
#endif
}

/* run_program's loop: every step over a block, block by block. Compiled for the wider vector units
 * too, the one the CPU has chosen at load time (each lane rounds as a scalar operation would).
 * inner[3 s + j]: whether operand j (out, x, y) of step s is the block's row in `rows` (an array
 * the caller does not read after the program, written earlier in the block) instead of the array:
 * such an array is not written back to memory, so its block stays in L1. */
WIDE_VECTORS
static uint32_t run_steps(const int32_t *ins, Py_ssize_t steps, void *const *arr, const float *sv, Py_ssize_t n,
                          const unsigned char *inner, float *rows, double *sums)
{
    uint32_t low = 0; /* the low halves OP_HALVES met, or'ed */
    for (Py_ssize_t lo = 0; lo < n; lo += BLOCK) {
        Py_ssize_t m = lo + BLOCK < n ? BLOCK : n - lo;
        for (Py_ssize_t s = 0; s < steps; s++) {
            int32_t op = ins[4 * s] & ~OP_ROUNDED, d = ins[4 * s + 1], x = ins[4 * s + 2], y = ins[4 * s + 3];
            int rounded = (ins[4 * s] & OP_ROUNDED) != 0;
            const unsigned char *at = inner + 3 * s;
            float *out = op == OP_SUM || op == OP_HALVES ? NULL : at[0] ? rows + (Py_ssize_t)d * BLOCK : (float *)arr[d] + lo;
            const float *xs = x < 0 ? NULL : at[1] ? rows + (Py_ssize_t)x * BLOCK : (const float *)arr[x] + lo;
            const float *ys = y < 0 ? NULL : at[2] ? rows + (Py_ssize_t)y * BLOCK : (const float *)arr[y] + lo;
            float xv = x < 0 ? sv[-1 - x] : 0.0f, yv = y < 0 ? sv[-1 - y] : 0.0f;
            switch (op) {
            case OP_WIDEN_BF16: {
                const uint16_t *h = (const uint16_t *)arr[x] + lo;
                uint32_t *o = (uint32_t *)out;
                prefetch_ahead(h, lo, n);
                for (Py_ssize_t i = 0; i < m; i++)
                    o[i] = (uint32_t)h[i] << 16;
                break;
            }
            case OP_COPY:
                for (Py_ssize_t i = 0; i < m; i++)
                    out[i] = xs ? xs[i] : xv;
                break;
            case OP_ADD: ARITH(+); break;
            case OP_SUB: ARITH(-); break;
            case OP_MUL: ARITH(*); break;
            case OP_DIV: ARITH(/); break;
            case OP_GT: COMPARE(>); break; /* numpy's bool, cast to float32: 1.0 or 0.0 (a NaN: 0.0) */
            case OP_GE: COMPARE(>=); break;
            case OP_EQ: COMPARE(==); break;
            case OP_SUM: program_sum(xs, ys, yv, lo, m, sums + (Py_ssize_t)d * LANES * LANE_SIZE); break;
            case OP_HALVES: {
                const uint32_t *v = (const uint32_t *)xs;
                uint16_t *o = (uint16_t *)arr[d] + lo;
                for (Py_ssize_t i = 0; i < m; i++) {
                    o[i] = (uint16_t)(v[i] >> 16);
                    low |= v[i] & 0xFFFFu;
                }
                break;
            }
            case OP_ROUND_BF16: { /* in place: x is out's array (read from where its block lies) */
                const uint32_t *v = (const uint32_t *)xs;
                uint32_t *o = (uint32_t *)out;
                for (Py_ssize_t i = 0; i < m; i++)
                    o[i] = bf16_rounded(v[i]);
                break;
            }
            }
        }
    }
    return low;
}

/* Where each step's operands lie (run_steps' `inner`): an array the caller marked `dead` lies in
 * the block's row from the step that first writes it in the program on, in the array before. */
static void place_operands(const int32_t *ins, Py_ssize_t steps, const unsigned char *dead, unsigned char *inner)
{
    unsigned char moved[MAX_ARRAYS] = {0};
    for (Py_ssize_t s = 0; s < steps; s++) {
        int32_t d = ins[4 * s + 1], x = ins[4 * s + 2], y = ins[4 * s + 3];
        inner[3 * s + 1] = x >= 0 && moved[x];
        inner[3 * s + 2] = y >= 0 && moved[y];
        int32_t op = ins[4 * s] & ~OP_ROUNDED;
        if (op == OP_SUM || op == OP_HALVES) { /* d: a set of sums, or halves written to memory */
            inner[3 * s] = 0;
            continue;
        }
        inner[3 * s] = moved[d] = moved[d] || (dead != NULL && dead[d]);
    }
}

/* run_program(code, arrays, scalars, dead=None, sums=None): a chain of elementwise steps over arrays of one
 * length, block by block (each step over a block, then the next step), so the values stay in L1
 * between steps and no step is a pass over memory: kernel primitives a method records
 * (raymerge/ops/fused.py) give the bits they give one at a time, as every step is elementwise.
 * arrays: float32 (written where an instruction's dst) or uint16 (BF16 bits, read by OP_WIDEN_BF16
 * alone); scalars: float32; dead: bytes, a flag per array whose values the caller does not read
 * after the program (what the steps write there is kept in the block's rows only: the array keeps
 * whatever it held); sums: float64, the lanes (LANES * LANE_SIZE each) of every set an OP_SUM
 * adds to (exact.dot_sum's, zeros or sums of earlier products); an array an OP_HALVES step writes:
 * uint16. Returns whether it ran: 0 where two arrays overlap in part (nothing is written then),
 * else 1, or 2 where an OP_HALVES step met a float32 with a low half set (its halves lose it). */
static PyObject *run_program(PyObject *self, PyObject *args)
{
    PyObject *co, *seq, *so, *deado = Py_None, *sumso = Py_None;
    if (!PyArg_ParseTuple(args, "OOO|OO", &co, &seq, &so, &deado, &sumso))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "run_program: arrays must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast), got = 0, n = -1;
    Py_buffer code, scalars, arr[MAX_ARRAYS];
    const Want want[2] = {{co, 0, "i", 4, "run_program code"}, {so, 0, "f", 4, "run_program scalars"}};
    Py_buffer two[2];
    if (count > MAX_ARRAYS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "run_program: too many arrays");
        return NULL;
    }
    if (get_buffers(want, two, 2) < 0) {
        Py_DECREF(fast);
        return NULL;
    }
    code = two[0];
    scalars = two[1];
    const int32_t *ins = (const int32_t *)code.buf;
    Py_ssize_t steps = code.len / 16, nscalars = scalars.len / 4;
    int written[MAX_ARRAYS] = {0}, wide[MAX_ARRAYS] = {0}, ok = code.len % 16 == 0;
    unsigned char dead[MAX_ARRAYS] = {0};
    if (deado != Py_None) { /* bytes, a flag per array: its values are not read after the program */
        char *flags;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(deado, &flags, &len) < 0 || len != count) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "run_program: dead must hold a flag for each array");
            release_buffers(two, 2);
            Py_DECREF(fast);
            return NULL;
        }
        for (Py_ssize_t j = 0; j < count; j++)
            dead[j] = flags[j] != 0;
    }
    Py_buffer sums = {0};
    Py_ssize_t sets = 0; /* of lanes in sums */
    if (sumso != Py_None) {
        if (get_buffer(sumso, &sums, 1, "d", 8, "run_program sums") < 0) {
            release_buffers(two, 2);
            Py_DECREF(fast);
            return NULL;
        }
        sets = sums.len / (8 * LANES * LANE_SIZE);
        ok = ok && sums.len % (8 * LANES * LANE_SIZE) == 0;
    }
    for (Py_ssize_t s = 0; ok && s < steps; s++) {
        int32_t op = ins[4 * s] & ~OP_ROUNDED, d = ins[4 * s + 1];
        ok = op >= 0 && op < OPS && d >= 0 && d < (op == OP_SUM ? sets : count) &&
             (op == ins[4 * s] || IS_ARITH(op)) && (op != OP_SUM || ins[4 * s + 2] >= 0);
        for (int j = 2; ok && j < 4; j++)
            ok = ins[4 * s + j] < count && ins[4 * s + j] >= -nscalars;
        if (ok && op != OP_SUM)
            written[d] |= op == OP_HALVES ? 2 : 1;
        ok = ok && (op == OP_SUM || written[d] != 3); /* an array written as float32 and as halves */
    }
    if (!ok)
        PyErr_SetString(PyExc_ValueError, "run_program: an instruction out of range, an array written both as "
                                          "float32 and as halves, or sums not whole lanes");
    for (; ok && got < count; got++) {
        PyObject *a = PySequence_Fast_GET_ITEM(fast, got);
        const char *kinds = written[got] == 2 ? "H" : written[got] ? "f" : "fH"; /* 3: refused above */
        if (get_buffer(a, &arr[got], written[got] != 0, kinds, 0, "run_program array") < 0) {
            ok = 0;
            break;
        }
        wide[got] = arr[got].itemsize == 4;
        Py_ssize_t len = arr[got].len / arr[got].itemsize;
        if (n >= 0 && len != n) {
            PyErr_SetString(PyExc_ValueError, "run_program: arrays differ in length");
            PyBuffer_Release(&arr[got]);
            ok = 0;
            break;
        }
        n = len;
    }
    for (Py_ssize_t s = 0; ok && s < steps; s++) { /* operand types: BF16 bits only where widened */
        int32_t op = ins[4 * s] & ~OP_ROUNDED, x = ins[4 * s + 2], y = ins[4 * s + 3];
        if (op == OP_WIDEN_BF16)
            ok = x >= 0 && !wide[x];
        else if (op == OP_HALVES)
            ok = x >= 0 && wide[x] && !wide[ins[4 * s + 1]];
        else if (op == OP_ROUND_BF16)
            ok = x == ins[4 * s + 1]; /* in place */
        else
            ok = (x < 0 || wide[x]) && (op == OP_COPY || op == OP_ROUND_BF16 || y < 0 || wide[y]);
        if (!ok)
            PyErr_SetString(PyExc_ValueError, "run_program: an operand of the wrong type");
    }
    /* Two arrays over the same memory are one array to the steps; over parts of each other's, the
     * blocks' order would change what a step reads: then nothing runs (False), the caller runs the
     * steps one at a time. */
    int apart = 1;
    for (Py_ssize_t i = 0; ok && apart && i < count; i++)
        for (Py_ssize_t j = i + 1; apart && j < count; j++) {
            const char *a = arr[i].buf, *b = arr[j].buf;
            int same = a == b && arr[i].len == arr[j].len && arr[i].itemsize == arr[j].itemsize;
            apart = same || a + arr[i].len <= b || b + arr[j].len <= a;
            if (same)
                dead[i] = dead[j] = 0; /* one memory under two indices: each must see the other's writes */
        }
    unsigned char *inner = ok && apart && n > 0 ? PyMem_Malloc(3 * (size_t)steps + 1) : NULL;
    float *rows = inner != NULL ? PyMem_Malloc(sizeof(float) * BLOCK * (size_t)count) : NULL;
    if (ok && apart && n > 0 && rows == NULL) {
        PyErr_NoMemory();
        ok = 0;
    }
    uint32_t low = 0;
    if (ok && apart && n > 0) {
        void *bufs[MAX_ARRAYS];
        for (Py_ssize_t j = 0; j < count; j++)
            bufs[j] = arr[j].buf;
        place_operands(ins, steps, dead, inner);
        Py_BEGIN_ALLOW_THREADS
        low = run_steps(ins, steps, bufs, (const float *)scalars.buf, n, inner, rows, (double *)sums.buf);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(rows);
    PyMem_Free(inner);
    for (Py_ssize_t j = 0; j < got; j++)
        PyBuffer_Release(&arr[j]);
    if (sumso != Py_None)
        PyBuffer_Release(&sums);
    release_buffers(two, 2);
    Py_DECREF(fast);
    if (!ok)
        return NULL;
    return PyLong_FromLong(apart ? 1 + (low != 0) : 0);
}

/* a + b, and in *err the magnitude of its rounding error, exactly (Knuth's TwoSum: round to
 * nearest, no contraction). */
static inline double two_sum(double a, double b, double *err)
{
    double s = a + b, bb = s - a;
    *err = fabs((a - (s - bb)) + (b - bb));
    return s;
}

#if defined(__GNUC__) || defined(__clang__)
typedef float Floats8 __attribute__((vector_size(32)));
typedef uint64_t Bits8 __attribute__((vector_size(64)));

/* two_sum in eight lanes: the error magnitudes added to *err. */
IN_LOOP Sums two_sums(Sums a, Sums b, Sums *err)
{
    Sums s = a + b, bb = s - a, e = (a - (s - bb)) + (b - bb);
    *err += (Sums)((Bits8)e & MAGNITUDE);
    return s;
}

/* x[*at..hi) (their squares: square), 16 at a time while 16 are left, in 16 lanes (two vectors of
 * 8: the adds do not wait on one another), joined by two_sum into *sum and *err; *at moves past
 * what was summed. */
IN_LOOP void lanes_sum(const float *restrict x, Py_ssize_t *at, Py_ssize_t hi, int square, double *sum,
                       double *err)
{
    Sums s[2] = {{0}, {0}}, a[2] = {{0}, {0}};
    Py_ssize_t i = *at;
    for (; i + 16 <= hi; i += 16)
        for (int l = 0; l < 2; l++) {
            Floats8 f;
            memcpy(&f, x + i + 8 * l, sizeof f);
            Sums p = __builtin_convertvector(f, Sums);
            s[l] = two_sums(s[l], square ? p * p : p, &a[l]);
        }
    for (int k = 0; k < 8; k++)
        for (int l = 0; l < 2; l++) {
            double e;
            *sum = two_sum(*sum, s[l][k], &e);
            *err += e + a[l][k];
        }
    *at = i;
}
#endif

#if defined(__GNUC__) || defined(__clang__)
/* The exact sum of a block's SUM_BLOCK values x[i] (their squares: square, of values of at most
 * 12 significant bits, their mantissa's last 12 bits clear, so that float32 holds each) into *sum
 * (float32_block_sum). Returns 0, summing nothing, for any other block. */
IN_LOOP int exact_block(const float *restrict x, int square, double *sum)
{
    float q[SUM_BLOCK];
    uint32_t low = 0;
    for (int i = 0; i < SUM_BLOCK; i++) {
        uint32_t m;
        memcpy(&m, &x[i], 4);
        low |= m;
        q[i] = square ? x[i] * x[i] : x[i];
    }
    return !(square && (low & 0xFFFu)) && float32_block_sum(q, sum);
}
#endif

/* segment_sums' work for one segment, x[lo..hi): its sum into *sum, the error magnitudes into *err.
 * A block whose sum is exact (exact_block: narrow values, as most rows are) is one addition. */
WIDE_VECTORS static void segment_sum(const float *restrict x, Py_ssize_t lo, Py_ssize_t hi, int square,
                                     double *sum, double *err)
{
    double s = 0, a = 0;
#if defined(__GNUC__) || defined(__clang__)
    while (hi - lo >= SUM_BLOCK) {
        double b, e;
        if (exact_block(x + lo, square, &b)) {
            s = two_sum(s, b, &e);
            a += e;
            lo += SUM_BLOCK;
        } else {
            lanes_sum(x, &lo, lo + SUM_BLOCK, square, &s, &a);
        }
    }
    if (hi - lo >= 32) /* else joining the lanes costs more than they save */
        lanes_sum(x, &lo, hi, square, &s, &a);
#endif
    for (; lo < hi; lo++) {
        double p = square ? (double)x[lo] * (double)x[lo] : (double)x[lo], e;
        s = two_sum(s, p, &e);
        a += e;
    }
    *sum = s;
    *err = a;
}

/* segment_sums(x, starts, square, sums, errs): for each segment j of float32 x (from starts[j] to
 * the next start, or x's end), sums[j] = the float64 sum of its values (their squares: square), each
 * exact in float64, and errs[j] = the sum of every addition's rounding error's magnitude (two_sum),
 * so sums[j] is within errs[j] of the exact sum, errs' own roundings aside (steps.row_sums widens
 * it): 0 where every addition was exact, as sums of narrow values often are. starts: int64,
 * ascending from 0; sums, errs: float64 as long. */
static PyObject *segment_sums(PyObject *self, PyObject *args)
{
    PyObject *xo, *so, *sumo, *erro;
    int square;
    if (!PyArg_ParseTuple(args, "OOpOO", &xo, &so, &square, &sumo, &erro))
        return NULL;
    Py_buffer buf[4];
    const Want want[4] = {{xo, 0, "f", 4, "segment_sums x"}, {so, 0, "lq", 8, "segment_sums starts"},
                          {sumo, 1, "d", 8, "segment_sums sums"}, {erro, 1, "d", 8, "segment_sums errs"}};
    if (get_buffers(want, buf, 4) < 0)
        return NULL;
    const float *x = (const float *)buf[0].buf;
    const int64_t *starts = (const int64_t *)buf[1].buf;
    double *sums = (double *)buf[2].buf, *errs = (double *)buf[3].buf;
    Py_ssize_t n = buf[0].len / 4, count = buf[1].len / 8;
    int ok = buf[2].len / 8 == count && buf[3].len / 8 == count && (count == 0 || starts[0] == 0);
    for (Py_ssize_t j = 1; ok && j < count; j++)
        ok = starts[j] >= starts[j - 1] && starts[j] <= n;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t j = 0; j < count; j++)
            segment_sum(x, (Py_ssize_t)starts[j], j + 1 < count ? (Py_ssize_t)starts[j + 1] : n, square, sums + j,
                        errs + j);
        Py_END_ALLOW_THREADS
    }
    if (!released(buf, 4, ok ? NULL :
                  "segment_sums: starts must ascend from 0 within x, sums and errs as long"))
        return NULL;
    Py_RETURN_NONE;
}

/* span(x): the memory of a C-contiguous buffer, (its first byte's address, past its last's): what
 * raymerge/ops/fused.py's _span reads of numpy's array interface, at a tenth of its cost (a fused
 * step takes it of each array it records). */
static PyObject *span(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    unsigned long long lo = (unsigned long long)(uintptr_t)b.buf;
    PyObject *r = Py_BuildValue("(KK)", lo, lo + (unsigned long long)b.len);
    PyBuffer_Release(&b);
    return r;
}

static PyMethodDef methods[] = {
    {"round_bf16", round_bf16, METH_O, "Round float32 values to BF16 in place, half to even; NaNs kept."},
    {"dot_buckets", dot_buckets, METH_VARARGS, "Add exact products into per-sign-and-exponent float64 buckets."},
    {"high_counts", high_counts, METH_VARARGS, "Count uint32 bit patterns by their high 16 bits."},
    {"row_ranks", row_ranks, METH_VARARGS, "Each key's rank in its row of n (a stable ascending sort's inverse)."},
    {"bf16_halves", bf16_halves, METH_VARARGS, "The high halves of float32 values; whether every low half is 0."},
    {"order_keys", order_keys, METH_VARARGS, "uint32 keys ordered as float32 values are, as torch sorts them."},
    {"bf16_narrow", bf16_narrow, METH_VARARGS, "float32 values rounded to BF16, as their high halves."},
    {"bf16_widen", bf16_widen, METH_VARARGS, "float32 values of BF16 high halves."},
    {"della_keep", della_keep, METH_VARARGS, "della's keep mask over whole rows: random words below their rank's threshold."},
    {"low_counts", low_counts, METH_VARARGS, "Counts of the low halves of the uint32s in one high half."},
    {"magnitude_above", magnitude_above, METH_VARARGS, "1.0 where a float32's magnitude bits reach a threshold, else 0.0."},
    {"dot_buckets_pair", dot_buckets_pair, METH_VARARGS, "dot_buckets of x and of x * y in one loop (narrow)."},
#ifdef __SIZEOF_INT128__
    {"philox_words", philox_words, METH_VARARGS, "32 random bits an element of a tensor, from numpy's Philox4x64-10."},
#endif
    {"welford_variance", welford_variance, METH_VARARGS, "Population variance across float32 arrays, Welford in float64."},
    {"segment_sums", segment_sums, METH_VARARGS, "float64 sums (of squares) per segment, and their rounding errors."},
    {"run_program", run_program, METH_VARARGS, "A chain of elementwise float32 steps, block by block."},
    {"span", span, METH_O, "A C-contiguous buffer's memory: (first byte's address, past the last's)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

/* VERSION: raymerge/ops/native.py takes these loops only from a build of this very source (an
 * install not built again after an update would hold other functions, or other buffer sizes). */
#define VERSION 52

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "VERSION", VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
