/* Native quantised matrix products for the CPU: out[m, r, n] = sum_k x[m, r, k] * W_m[n, k], where each
 * W_m is a ggml-quantised [N, K] matrix given as its raw blocks (any byte offset: no alignment needed).
 *
 * Plain C, called through ctypes (which releases the GIL); the only Python C-API here is the empty
 * module init at the bottom, so setuptools can build this as an ordinary extension.
 *
 * Two numerics:
 *  - float (round_acts = 0): exact float32 activations times the dequantised weights, fp32 accumulation.
 *    Each sub-block is sc_j * (x . q)_j - mn_j * (sum of x)_j (the quants widened to float and
 *    fused-multiply-added with x), row by row: a row's result never depends on the other rows. (The
 *    portable build decodes each chunk to the reference dequantiser's floats and takes plain dots.)
 *  - llama.cpp (round_acts = 1): the activations are first rounded to 8-bit blocks the way llama.cpp's
 *    CPU backend does (Q8_K: 256 per block, iscale = -127/max, for the K-quants; Q8_0: 32 per block,
 *    fp16 d = amax/127, for Q8_0 and the 32-element legacy types), then each sub-block is an exact integer
 *    dot product of weight quants and activation quants, scaled in float32.
 *
 * The rows of all matrices (n_mat * N of them) go to n_threads threads (a grain of rows at a time from a
 * shared counter); every row is computed whole by one thread, so results do not depend on the thread count.
 * The threads are a pool started once and parked between calls (starting threads per call cost ~50 us a
 * call on a 2-core machine, about the work of a 512-row matrix); one call uses the pool at a time, and a
 * call made meanwhile from another thread starts threads of its own, as all calls did before. No other
 * state survives a call: concurrent calls from several threads are safe.
 *
 * Written from the block layouts (ggml's block_q4_K etc.); every decoder turns one chunk of up to 256
 * weights into signed 8-bit quants q[], per-sub-block float scales sc[] and mins mn[] with
 * weight = sc[j] * q - mn[j]: the generic dot products below work on that form.
 */
#ifndef QDOT_NO_PYTHON  /* -DQDOT_NO_PYTHON: a plain C library (benchmarks, other hosts) */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python asks; only for the empty module init at the end */
#else
#define _POSIX_C_SOURCE 200809L /* posix_memalign */
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QD_AVX2 1
#else
#define QD_AVX2 0
#endif
#if defined(__F16C__)
#include <immintrin.h>
#endif

/* ggml type numbers (GGMLQuantizationType) */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
       T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14 };

#define CHUNK 256   /* weights per decoded chunk */
#define MAX_SUB 16  /* sub-blocks per chunk at most (16 of 16) */

/* ------------------------------------------------------------------------------------------ fp16 */

static inline float fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
        }
    } else {
        bits = sign | (exp + 112) << 23 | man << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* float32 -> fp16, round to nearest even (as torch's .half()) */
static inline uint16_t fp32_to_fp16(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, 0);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return (uint16_t)(sign | 0x7C00 | (ax > 0x7F800000u ? 0x200 : 0));
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00);  /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {  /* fp16 subnormal or zero */
        if (ax < 0x33000000u) return (uint16_t)sign;  /* below half the smallest subnormal */
        uint32_t man = (ax & 0x7FFFFF) | 0x800000;
        int shift = 126 - (int)(ax >> 23);  /* 14..24 */
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t q = ((ax >> 13) - (112u << 10)), rem = ax & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1))) q++;
    return (uint16_t)(sign | q);
#endif
}

static inline float rd16(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return fp16_to_fp32(h); }

#if QD_AVX2
/* 8 unsigned (or signed) bytes times a float32 scale, as 8 float32 (float(byte) * d, one rounding) */
static inline void scale8(uint64_t bytes, int is_signed, float d, float *out) {
    __m128i v = _mm_cvtsi64_si128((long long)bytes);
    __m256i i = is_signed ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v);
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(i)));
}
#else
static inline void scale8(uint64_t bytes, int is_signed, float d, float *out) {
    for (int j = 0; j < 8; j++) {
        uint8_t u = (uint8_t)(bytes >> (8 * j));
        out[j] = d * (float)(is_signed ? (int)(int8_t)u : (int)u);
    }
}
#endif


/* ------------------------------------------------------------------------------------- decoders */
/* Each: (blocks, number of ggml blocks in this chunk) -> q[n], sc[n_sub], mn[n_sub] (mn only if has_min).
 * The float scales are computed exactly as the reference dequantisers do (fp16 widened, times the
 * integer sub-scale in float32). */

typedef void (*decode_fn)(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn);

static void dec_q8_0(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn) {
    (void)mn;
    for (int i = 0; i < nblk; i++, b += 34) {
        sc[i] = rd16(b);
        memcpy(q + 32 * i, b + 2, 32);
    }
}

#if QD_AVX2
/* 16 bytes of nibbles -> 32 bytes: the low nibbles, then the high ones (the legacy 32-element layout) */
static inline __m256i nibbles32(const uint8_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(15);
    return _mm256_setr_m128i(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
}

/* the 32 bits of a little-endian word at p -> 32 bytes: 16 where bit l is set, else 0 */
static inline __m256i bits32_x16(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), spread);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(16));
}
#endif

static void dec_q4_0(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn) {
    (void)mn;
    for (int i = 0; i < nblk; i++, b += 18) {
        sc[i] = rd16(b);
#if QD_AVX2
        _mm256_storeu_si256((__m256i *)(q + 32 * i), _mm256_sub_epi8(nibbles32(b + 2), _mm256_set1_epi8(8)));
#else
        for (int l = 0; l < 16; l++) {
            q[32 * i + l] = (int8_t)((b[2 + l] & 15) - 8);
            q[32 * i + l + 16] = (int8_t)((b[2 + l] >> 4) - 8);
        }
#endif
    }
}

static void dec_q4_1(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn) {
    for (int i = 0; i < nblk; i++, b += 20) {
        sc[i] = rd16(b);
        mn[i] = -rd16(b + 2);
#if QD_AVX2
        _mm256_storeu_si256((__m256i *)(q + 32 * i), nibbles32(b + 4));
#else
        for (int l = 0; l < 16; l++) {
            q[32 * i + l] = (int8_t)(b[4 + l] & 15);
            q[32 * i + l + 16] = (int8_t)(b[4 + l] >> 4);
        }
#endif
    }
}

static inline void q5_quants(const uint8_t *qh4, const uint8_t *qs, int offset, int8_t *q) {
#if QD_AVX2
    __m256i v = _mm256_or_si256(nibbles32(qs), bits32_x16(qh4));
    _mm256_storeu_si256((__m256i *)q, _mm256_sub_epi8(v, _mm256_set1_epi8((char)offset)));
#else
    uint32_t qh;
    memcpy(&qh, qh4, 4);
    for (int l = 0; l < 16; l++) {
        q[l] = (int8_t)(((qs[l] & 15) | ((qh >> l) & 1) << 4) - offset);
        q[l + 16] = (int8_t)(((qs[l] >> 4) | ((qh >> (l + 16)) & 1) << 4) - offset);
    }
#endif
}

static void dec_q5_0(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn) {
    (void)mn;
    for (int i = 0; i < nblk; i++, b += 22) {
        sc[i] = rd16(b);
        q5_quants(b + 2, b + 6, 16, q + 32 * i);
    }
}

static void dec_q5_1(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn) {
    for (int i = 0; i < nblk; i++, b += 24) {
        sc[i] = rd16(b);
        mn[i] = -rd16(b + 2);
        q5_quants(b + 4, b + 8, 0, q + 32 * i);
    }
}

static void dec_q2_k(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn) {
    (void)nblk;
    float d = rd16(b + 80), dmin = rd16(b + 82);
    uint64_t w[2];
    memcpy(w, b, 16);
    for (int h = 0; h < 2; h++) {
        scale8(w[h] & 0x0F0F0F0F0F0F0F0Full, 0, d, sc + 8 * h);
        scale8((w[h] >> 4) & 0x0F0F0F0F0F0F0F0Full, 0, dmin, mn + 8 * h);
    }
    const uint8_t *qs = b + 16;
#if QD_AVX2
    for (int h = 0; h < 2; h++) {
        __m256i Q = _mm256_loadu_si256((const __m256i *)(qs + 32 * h));
        for (int t = 0; t < 4; t++)
            _mm256_storeu_si256((__m256i *)(q + 128 * h + 32 * t),
                                _mm256_and_si256(_mm256_srli_epi16(Q, 2 * t), _mm256_set1_epi8(3)));
    }
#else
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < 4; t++)
            for (int l = 0; l < 32; l++) q[128 * h + 32 * t + l] = (int8_t)((qs[32 * h + l] >> (2 * t)) & 3);
#endif
}

static void dec_q3_k(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn) {
    (void)nblk; (void)mn;
    float d = rd16(b + 108);
    const uint8_t *hm = b, *qs = b + 32;
    uint64_t lo;
    uint32_t hi;
    memcpy(&lo, b + 96, 8);
    memcpy(&hi, b + 104, 4);
    const uint64_t m2 = 0x03030303u;
    uint64_t v[2] = {  /* the sixteen 6-bit scales, 0..63, a byte each */
        (lo & 0x0F0F0F0F0F0F0F0Full) | (((hi & m2) | ((hi >> 2) & m2) << 32) << 4),
        ((lo >> 4) & 0x0F0F0F0F0F0F0F0Full) | ((((hi >> 4) & m2) | ((hi >> 6) & m2) << 32) << 4)};
    for (int h = 0; h < 2; h++) {  /* minus 32 in each byte without carries: v ^ 32 for v >= 32, v | 0xE0 below */
        uint64_t below = ~v[h] & 0x2020202020202020ull;
        scale8((v[h] ^ 0x2020202020202020ull) | below << 1 | below << 2, 1, d, sc + 8 * h);
    }
#if QD_AVX2
    const __m256i m3 = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4);
    __m256i H = _mm256_loadu_si256((const __m256i *)hm);
    for (int h = 0; h < 2; h++) {
        __m256i Q = _mm256_loadu_si256((const __m256i *)(qs + 32 * h));
        for (int t = 0; t < 4; t++) {
            __m256i bit = _mm256_set1_epi8((char)(1 << (4 * h + t)));
            __m256i clear = _mm256_cmpeq_epi8(_mm256_and_si256(H, bit), _mm256_setzero_si256());
            __m256i v = _mm256_and_si256(_mm256_srli_epi16(Q, 2 * t), m3);
            _mm256_storeu_si256((__m256i *)(q + 128 * h + 32 * t), _mm256_sub_epi8(v, _mm256_and_si256(clear, four)));
        }
    }
#else
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < 4; t++)
            for (int l = 0; l < 32; l++) {
                int v = (qs[32 * h + l] >> (2 * t)) & 3;
                q[128 * h + 32 * t + l] = (int8_t)(v - (((hm[l] >> (4 * h + t)) & 1) ? 0 : 4));
            }
#endif
}

/* Q4_K/Q5_K: the eight 6-bit scales (*s) and mins (*m) of the 12 packed bytes, one a byte, cut four at a
 * time from 32-bit words */
static inline void k_scale_bytes(const uint8_t *b, uint64_t *s, uint64_t *m) {
    uint32_t w[3];
    memcpy(w, b + 4, 12);
    *s = (uint64_t)(w[0] & 0x3F3F3F3Fu) | (uint64_t)((w[2] & 0x0F0F0F0Fu) | ((w[0] >> 2) & 0x30303030u)) << 32;
    *m = (uint64_t)(w[1] & 0x3F3F3F3Fu) | (uint64_t)(((w[2] >> 4) & 0x0F0F0F0Fu) | ((w[1] >> 2) & 0x30303030u)) << 32;
}

/* ... as floats: d * scale, dmin * min */
static inline void k_scales(const uint8_t *b, float *sc, float *mn) {
    uint64_t s, m;
    k_scale_bytes(b, &s, &m);
    scale8(s, 0, rd16(b), sc);
    scale8(m, 0, rd16(b + 2), mn);
}

static void dec_q4_k(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn) {
    (void)nblk;
    k_scales(b, sc, mn);
    const uint8_t *qs = b + 16;
#if QD_AVX2
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int c = 0; c < 4; c++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        _mm256_storeu_si256((__m256i *)(q + 64 * c), _mm256_and_si256(v, m4));
        _mm256_storeu_si256((__m256i *)(q + 64 * c + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
    }
#else
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = (int8_t)(qs[32 * c + l] & 15);
            q[64 * c + 32 + l] = (int8_t)(qs[32 * c + l] >> 4);
        }
#endif
}

static void dec_q5_k(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn) {
    (void)nblk;
    k_scales(b, sc, mn);
    const uint8_t *qh = b + 16, *qs = b + 48;
#if QD_AVX2
    const __m256i m4 = _mm256_set1_epi8(15), b4 = _mm256_set1_epi8(16);
    __m256i h = _mm256_loadu_si256((const __m256i *)qh);
    for (int c = 0; c < 4; c++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        /* bit 2c of qh[l] -> bit 4 of element l of sub-block 2c; bit 2c+1 -> sub-block 2c+1 */
        __m256i h0 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, _mm256_set1_epi8((char)(1 << (2 * c)))),
                                                        _mm256_set1_epi8((char)(1 << (2 * c)))), b4);
        __m256i h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, _mm256_set1_epi8((char)(2 << (2 * c)))),
                                                        _mm256_set1_epi8((char)(2 << (2 * c)))), b4);
        _mm256_storeu_si256((__m256i *)(q + 64 * c), _mm256_or_si256(lo, h0));
        _mm256_storeu_si256((__m256i *)(q + 64 * c + 32), _mm256_or_si256(hi, h1));
    }
#else
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = (int8_t)((qs[32 * c + l] & 15) | ((qh[l] >> (2 * c)) & 1) << 4);
            q[64 * c + 32 + l] = (int8_t)((qs[32 * c + l] >> 4) | ((qh[l] >> (2 * c + 1)) & 1) << 4);
        }
#endif
}

static void dec_q6_k(const uint8_t *b, int nblk, int8_t *q, float *sc, float *mn) {
    (void)nblk; (void)mn;
    float d = rd16(b + 208);
    uint64_t s[2];
    memcpy(s, b + 192, 16);
    scale8(s[0], 1, d, sc);
    scale8(s[1], 1, d, sc + 8);
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
        int8_t *o = q + 128 * h;
#if QD_AVX2
        const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(0x30), o32 = _mm256_set1_epi8(32);
        __m256i a = _mm256_loadu_si256((const __m256i *)ql), c = _mm256_loadu_si256((const __m256i *)(ql + 32));
        __m256i hh = _mm256_loadu_si256((const __m256i *)qh);
        __m256i q0 = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_and_si256(_mm256_slli_epi16(hh, 4), m2));
        __m256i q1 = _mm256_or_si256(_mm256_and_si256(c, m4), _mm256_and_si256(_mm256_slli_epi16(hh, 2), m2));
        __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), _mm256_and_si256(hh, m2));
        __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), m4),
                                     _mm256_and_si256(_mm256_srli_epi16(hh, 2), m2));
        _mm256_storeu_si256((__m256i *)o, _mm256_sub_epi8(q0, o32));
        _mm256_storeu_si256((__m256i *)(o + 32), _mm256_sub_epi8(q1, o32));
        _mm256_storeu_si256((__m256i *)(o + 64), _mm256_sub_epi8(q2, o32));
        _mm256_storeu_si256((__m256i *)(o + 96), _mm256_sub_epi8(q3, o32));
#else
        for (int l = 0; l < 32; l++) {
            o[l] = (int8_t)(((ql[l] & 15) | ((qh[l] >> 0) & 3) << 4) - 32);
            o[l + 32] = (int8_t)(((ql[l + 32] & 15) | ((qh[l] >> 2) & 3) << 4) - 32);
            o[l + 64] = (int8_t)(((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32);
            o[l + 96] = (int8_t)(((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32);
        }
#endif
    }
}

/* -------------------------------------------------------------------------------- type table */

typedef struct {
    int type;
    int qk;          /* weights per ggml block */
    int bytes;       /* bytes per ggml block */
    int sub;         /* weights per sub-block (one scale): 16 or 32 */
    int has_min;
    int is_unsigned; /* all quants >= 0 (maddubs needs no sign trick) */
    int act_k;       /* activations rounded as Q8_K (1) or Q8_0 (0) */
    decode_fn decode;
} qtype_info;

static const qtype_info TYPES[] = {
    {T_Q8_0, 32, 34, 32, 0, 0, 0, dec_q8_0},
    {T_Q4_0, 32, 18, 32, 0, 0, 0, dec_q4_0},
    {T_Q4_1, 32, 20, 32, 1, 1, 0, dec_q4_1},
    {T_Q5_0, 32, 22, 32, 0, 0, 0, dec_q5_0},
    {T_Q5_1, 32, 24, 32, 1, 1, 0, dec_q5_1},
    {T_Q2_K, 256, 84, 16, 1, 1, 1, dec_q2_k},
    {T_Q3_K, 256, 110, 16, 0, 0, 1, dec_q3_k},
    {T_Q4_K, 256, 144, 32, 1, 1, 1, dec_q4_k},
    {T_Q5_K, 256, 176, 32, 1, 1, 1, dec_q5_k},
    {T_Q6_K, 256, 210, 16, 0, 0, 1, dec_q6_k},
};

static const qtype_info *find_type(int type) {
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++)
        if (TYPES[i].type == type) return &TYPES[i];
    return NULL;
}

/* --------------------------------------------------------------------------- activation rounding */
/* One rounded activation row of K (padded to a multiple of 256 with zeros):
 *   q[Kp] int8, d32[Kp/32] (the scale of each 32 elements; Q8_K's is the same for the eight of a block),
 *   dbs[Kp/16 or Kp/32] (scale times the sum of the quants of each sub-block of the weight type). */

typedef struct {
    int64_t kp;       /* K rounded up to 256 */
    int sub;          /* sub-block size of dbs */
    int8_t *q;        /* [rows][kp] */
    float *d32;       /* [rows][kp/32] */
    float *dbs;       /* [rows][kp/sub] */
} acts;

static void round_q8_k(const float *x, int64_t K, int sub, int8_t *q, float *d32, float *dbs) {
    for (int64_t b = 0; b < K / 256; b++) {
        const float *xb = x + 256 * b;
        float amax = 0.0f, mx = 0.0f;
        for (int i = 0; i < 256; i++) {
            float ax = fabsf(xb[i]);
            if (ax > amax) { amax = ax; mx = xb[i]; }
        }
        float iscale = 0.0f, d = 0.0f;
        if (mx != 0.0f) {
            iscale = -127.0f / mx;
            d = 1.0f / iscale;
        }
        int8_t *qb = q + 256 * b;
        for (int i = 0; i < 256; i++) {
            float v = nearbyintf(iscale * xb[i]);
            if (v > 127.0f) v = 127.0f;
            if (v < -128.0f) v = -128.0f;
            qb[i] = (int8_t)v;
        }
        for (int j = 0; j < 8; j++) d32[8 * b + j] = d;
        for (int j = 0; j < 256 / sub; j++) {
            int s = 0;
            for (int i = 0; i < sub; i++) s += qb[sub * j + i];
            dbs[256 / sub * b + j] = d * (float)s;
        }
    }
}

static void round_q8_0(const float *x, int64_t K, int8_t *q, float *d32, float *dbs) {
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            float ax = fabsf(xb[i]);
            if (ax > amax) amax = ax;
        }
        float d = amax / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
        int s = 0;
        for (int i = 0; i < 32; i++) {
            float v = nearbyintf(xb[i] * inv);
            if (v > 127.0f) v = 127.0f;
            if (v < -128.0f) v = -128.0f;
            q[32 * b + i] = (int8_t)v;
            s += q[32 * b + i];
        }
        float dh = fp16_to_fp32(fp32_to_fp16(d));
        d32[b] = dh;
        dbs[b] = dh * (float)s;
    }
}

/* ------------------------------------------------------------------------------- dot products */

#if QD_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 int8 weight quants times 32 int8 activation quants -> 8 int32 lane sums (4 consecutive per lane
 * pair group: lanes 0-3 cover elements 0-15, lanes 4-7 elements 16-31) as floats */
static inline __m256 idot32(__m256i w, __m256i a, int is_unsigned) {
    __m256i p;
    if (is_unsigned) p = _mm256_maddubs_epi16(w, a);
    else p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* m8 (8 lane sums) += the ns sub-block mins times their activation sums xs; mn0/mn1: mn[0..15] as vectors */
static inline void add_mins(float *m8, __m256 mn0, __m256 mn1, const float *mn, const float *xs, int ns) {
    __m256 m = _mm256_load_ps(m8);
    if (ns == 16) {
        m = _mm256_fmadd_ps(mn0, _mm256_loadu_ps(xs), m);
        m = _mm256_fmadd_ps(mn1, _mm256_loadu_ps(xs + 8), m);
    } else if (ns == 8) {
        m = _mm256_fmadd_ps(mn0, _mm256_loadu_ps(xs), m);
    } else {
        float t = 0.0f;
        for (int j = 0; j < ns; j++) t += mn[j] * xs[j];
        m = _mm256_add_ps(m, _mm256_setr_ps(t, 0, 0, 0, 0, 0, 0, 0));
    }
    _mm256_store_ps(m8, m);
}
#endif

typedef struct {
    const qtype_info *ti;
    int round_acts;
    const uint8_t *const *w;
    int64_t N, K, R;
    const float *x;
    int64_t xs_mat, xs_row;   /* float mode: element strides of x */
    const acts *a;            /* int mode: the rounded rows; float mode: a->dbs holds the x sums per sub-block */
    int64_t a_mat;            /* rows of `a` between matrices (0: shared) */
    float *out;
    int64_t rows, grain;      /* flattened (matrix, row) count, and how many a thread takes at a time */
    int64_t *next;            /* shared: the first row nobody has taken yet */
    int status;
} job;

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* res[r] = the 8 lanes of sums minus the 8 lanes of mins of each of the R rows of acc */
ALWAYS_INLINE void finish_rows(const float *acc, int64_t R, float *res) {
    for (int64_t r = 0; r < R; r++) {
#if QD_AVX2
        res[r] = hsum8(_mm256_load_ps(acc + 16 * r)) - hsum8(_mm256_load_ps(acc + 16 * r + 8));
#else
        float s = 0.0f, m = 0.0f;
        for (int i = 0; i < 8; i++) { s += acc[16 * r + i]; m += acc[16 * r + 8 + i]; }
        res[r] = s - m;
#endif
    }
}

/* float mode, one weight row against R activation rows. The chunk loop is generic; `sub` and `has_min` are
 * compile-time constants in each caller so the inner loops unroll. */
ALWAYS_INLINE void row_float_t(const job *jb, const uint8_t *wrow, const float *x0, const float *xsum,
                               float *res, int8_t *q, float *wf, float *acc, const int sub, const int has_min) {
    const qtype_info *ti = jb->ti;
    const int64_t K = jb->K, R = jb->R, kp = jb->a->kp;
    const int64_t chunk_bytes = (int64_t)(CHUNK / ti->qk) * ti->bytes;
    float sc[MAX_SUB], mn[MAX_SUB];
    memset(mn, 0, sizeof mn);
    memset(acc, 0, sizeof(float) * 16 * R);  /* per row: 8 lanes of sums, 8 of mins */
    for (int64_t k0 = 0, c = 0; k0 < K; k0 += CHUNK, c++) {
        const int n = K - k0 < CHUNK ? (int)(K - k0) : CHUNK, ns = n == CHUNK ? CHUNK / sub : n / sub;
        ti->decode(wrow + c * chunk_bytes, n == CHUNK ? CHUNK / ti->qk : n / ti->qk, q, sc, mn);
#if QD_AVX2
        /* per row: sum_j sc_j * (x . q)_j - sum_j mn_j * (sum of x)_j; each row alone, so a row's result
         * never depends on the rows beside it (batched sequences equal each alone) */
        (void)wf;
        __m256 mn0 = _mm256_loadu_ps(mn), mn1 = _mm256_loadu_ps(mn + 8);
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x0 + r * jb->xs_row + k0;
            __m256 a0 = _mm256_load_ps(acc + 16 * r), a1 = _mm256_setzero_ps();
            for (int j = 0; j < ns; j += 2) {
                __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
                for (int i = 0; i < sub; i += 8) {
                    s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                             _mm_loadl_epi64((const __m128i *)(q + j * sub + i)))),
                                         _mm256_loadu_ps(xr + j * sub + i), s0);
                    s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                             _mm_loadl_epi64((const __m128i *)(q + (j + 1) * sub + i)))),
                                         _mm256_loadu_ps(xr + (j + 1) * sub + i), s1);
                }
                a0 = _mm256_fmadd_ps(s0, _mm256_set1_ps(sc[j]), a0);
                if (j + 1 < ns) a1 = _mm256_fmadd_ps(s1, _mm256_set1_ps(sc[j + 1]), a1);
            }
            _mm256_store_ps(acc + 16 * r, _mm256_add_ps(a0, a1));
            if (has_min) add_mins(acc + 16 * r + 8, mn0, mn1, mn, xsum + r * (kp / sub) + k0 / sub, ns);
        }
#else
        (void)xsum; (void)has_min; (void)kp; (void)ns;
        for (int i = 0; i < n; i++) wf[i] = (float)q[i] * sc[i / sub] - mn[i / sub];
        for (int64_t r = 0; r < R; r++) {
            const float *xr = x0 + r * jb->xs_row + k0;
            for (int i = 0; i < n; i++) acc[16 * r + (i & 7)] += wf[i] * xr[i];
        }
#endif
    }
    finish_rows(acc, R, res);
}

/* llama.cpp mode, one weight row against R rounded activation rows (a_q/a_d/a_s: row 0 of this matrix);
 * sub, has_min, is_unsigned and act_k are compile-time constants in each caller. */
ALWAYS_INLINE void row_int_t(const job *jb, const uint8_t *wrow, const int8_t *a_q, const float *a_d,
                             const float *a_s, float *res, int8_t *q, float *acc, const int sub,
                             const int has_min, const int uns, const int act_k) {
    const qtype_info *ti = jb->ti;
    const int64_t K = jb->K, R = jb->R, kp = jb->a->kp;
    const int64_t chunk_bytes = (int64_t)(CHUNK / ti->qk) * ti->bytes;
    float sc[MAX_SUB], mn[MAX_SUB];
    memset(mn, 0, sizeof mn);
    memset(acc, 0, sizeof(float) * 16 * R);  /* per row: 8 lanes of scaled dots, 8 of mins */
    for (int64_t k0 = 0, c = 0; k0 < K; k0 += CHUNK, c++) {
        const int n = K - k0 < CHUNK ? (int)(K - k0) : CHUNK, ns = n == CHUNK ? CHUNK / sub : n / sub;
        const int ng = n == CHUNK ? CHUNK / 32 : n / 32;
        ti->decode(wrow + c * chunk_bytes, n == CHUNK ? CHUNK / ti->qk : n / ti->qk, q, sc, mn);
#if QD_AVX2
        __m256 scv[8];  /* the weight scale of each lane, per 32 quants */
        for (int g = 0; g < ng; g++)
            scv[g] = sub == 32 ? _mm256_set1_ps(sc[g])
                               : _mm256_setr_m128(_mm_set1_ps(sc[2 * g]), _mm_set1_ps(sc[2 * g + 1]));
        __m256 mn0 = _mm256_loadu_ps(mn), mn1 = _mm256_loadu_ps(mn + 8);
        __m256i wq[8];
        for (int g = 0; g < ng; g++) {
            wq[g] = _mm256_load_si256((const __m256i *)(q + 32 * g));
        }
        for (int64_t r = 0; r < R; r++) {
            const int8_t *aq = a_q + r * kp + k0;
            const float *ad = a_d + r * (kp / 32) + k0 / 32, *as = a_s + r * (kp / sub) + k0 / sub;
            __m256 acc0 = _mm256_load_ps(acc + 16 * r);
            if (act_k) {  /* one activation scale for the chunk (always a whole one) */
                __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
                for (int g = 0; g < 8; g += 2) {
                    b0 = _mm256_fmadd_ps(idot32(wq[g], _mm256_loadu_si256((const __m256i *)(aq + 32 * g)), uns),
                                         scv[g], b0);
                    b1 = _mm256_fmadd_ps(idot32(wq[g + 1], _mm256_loadu_si256((const __m256i *)(aq + 32 * g + 32)), uns),
                                         scv[g + 1], b1);
                }
                acc0 = _mm256_fmadd_ps(_mm256_add_ps(b0, b1), _mm256_set1_ps(ad[0]), acc0);
            } else {  /* Q8_0 activations: a scale per 32 */
                __m256 b0 = _mm256_setzero_ps();
                for (int g = 0; g < ng; g++) {
                    __m256 p = idot32(wq[g], _mm256_loadu_si256((const __m256i *)(aq + 32 * g)), uns);
                    if (g & 1) b0 = _mm256_fmadd_ps(p, _mm256_mul_ps(scv[g], _mm256_set1_ps(ad[g])), b0);
                    else acc0 = _mm256_fmadd_ps(p, _mm256_mul_ps(scv[g], _mm256_set1_ps(ad[g])), acc0);
                }
                acc0 = _mm256_add_ps(acc0, b0);
            }
            _mm256_store_ps(acc + 16 * r, acc0);
            if (has_min) add_mins(acc + 16 * r + 8, mn0, mn1, mn, as, ns);
        }
#else
        (void)uns; (void)act_k; (void)ng;
        for (int64_t r = 0; r < R; r++) {
            const int8_t *aq = a_q + r * kp + k0;
            const float *ad = a_d + r * (kp / 32) + k0 / 32, *as = a_s + r * (kp / sub) + k0 / sub;
            for (int j = 0; j < ns; j++) {
                int s = 0;
                for (int i = 0; i < sub; i++) s += (int)q[j * sub + i] * (int)aq[j * sub + i];
                acc[16 * r + (j & 7)] += sc[j] * ad[(j * sub) / 32] * (float)s;
                if (has_min) acc[16 * r + 8 + (j & 7)] += mn[j] * as[j];
            }
        }
#endif
    }
    finish_rows(acc, R, res);
}

/* the specialisations: (sub-block size, has mins, unsigned quants, Q8_K activations) */
#define ROW_INT(name, SUB, MIN, UNS, ACTK)                                                                   \
    static void name(const job *jb, const uint8_t *wrow, const int8_t *a_q, const float *a_d, const float *a_s, \
                     float *res, int8_t *q, float *acc) {                                                     \
        row_int_t(jb, wrow, a_q, a_d, a_s, res, q, acc, SUB, MIN, UNS, ACTK);                                 \
    }
ROW_INT(row_int_k32m, 32, 1, 1, 1)   /* Q4_K, Q5_K */
ROW_INT(row_int_k16, 16, 0, 0, 1)    /* Q6_K, Q3_K */
ROW_INT(row_int_k16m, 16, 1, 1, 1)   /* Q2_K */
ROW_INT(row_int_0, 32, 0, 0, 0)      /* Q8_0, Q4_0, Q5_0 */
ROW_INT(row_int_0m, 32, 1, 1, 0)     /* Q4_1, Q5_1 */

#define ROW_FLOAT(name, SUB, MIN)                                                                            \
    static void name(const job *jb, const uint8_t *wrow, const float *x0, const float *xsum, float *res,     \
                     int8_t *q, float *wf, float *acc) {                                                      \
        row_float_t(jb, wrow, x0, xsum, res, q, wf, acc, SUB, MIN);                                           \
    }
ROW_FLOAT(row_float_32, 32, 0)
ROW_FLOAT(row_float_32m, 32, 1)
ROW_FLOAT(row_float_16, 16, 0)
ROW_FLOAT(row_float_16m, 16, 1)

#if QD_AVX2
/* sc16[j] = int16 element j of each 128-bit lane of v, in all eight of the lane's int16 (one shuffle a j, in
 * place of cutting each scale out in a general register and broadcasting it from there) */
static inline void spread_scales(__m256i v, __m256i *sc16) {
    for (int j = 0; j < 8; j++)
        sc16[j] = _mm256_shuffle_epi8(v, _mm256_set1_epi16((short)(((2 * j + 1) << 8) | (2 * j))));
}

/* The integer dot of one superblock's 8 registers of unsigned quants wq with a row's 256 activations aq,
 * each pair of products (maddubs) times its scale in sc16 and summed again (madd): 8 int32 lanes. */
static inline __m256i scaled_dot256(const __m256i *wq, const __m256i *sc16, const int8_t *aq) {
    __m256i t0 = _mm256_setzero_si256(), t1 = _mm256_setzero_si256();
    for (int j = 0; j < 8; j += 2) {
        __m256i p0 = _mm256_maddubs_epi16(wq[j], _mm256_loadu_si256((const __m256i *)(aq + 32 * j)));
        __m256i p1 = _mm256_maddubs_epi16(wq[j + 1], _mm256_loadu_si256((const __m256i *)(aq + 32 * j + 32)));
        t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(p0, sc16[j]));
        t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(p1, sc16[j + 1]));
    }
    return _mm256_add_epi32(t0, t1);
}

/* Q4_K (Q5_K) against Q8_K-rounded rows without decoding to memory: per superblock, the nibbles of each 32 bytes
 * (with their 5th bits) straight into maddubs (unsigned 4/5-bit times signed 8-bit, pairs summed to int16: at
 * most 2 * 31 * 128),
 * the pairs times their sub-block's 6-bit scale and summed again to int32 (madd), all eight sub-blocks
 * summed in integers, converted and scaled once: d * d_x * sum_j sc_j (q . x)_j - dmin * sum_j m_j dbs_j,
 * the reference's value regrouped (the integer part exact). */
ALWAYS_INLINE void row_q45_k_t(const job *jb, const uint8_t *wrow, const int8_t *a_q, const float *a_d,
                               const float *a_s, float *res, float *acc, const int q5) {
    const int64_t K = jb->K, R = jb->R, kp = jb->a->kp, nb = K / 256;
    const __m256i m4 = _mm256_set1_epi8(15), b4 = _mm256_set1_epi8(16);
    memset(acc, 0, sizeof(float) * 16 * R);
    for (int64_t c = 0; c < nb; c++) {
        const uint8_t *b = wrow + (q5 ? 176 : 144) * c, *qs = b + (q5 ? 48 : 16);
        uint64_t s, m;
        k_scale_bytes(b, &s, &m);
        __m256i sc16[8], wq[8];
        spread_scales(_mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)s))), sc16);
        const __m256i h = q5 ? _mm256_loadu_si256((const __m256i *)(b + 16)) : m4;  /* Q5_K's 5th bits */
        for (int i = 0; i < 4; i++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * i));
            wq[2 * i] = _mm256_and_si256(v, m4);
            wq[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            if (q5) {  /* Q5_K: bit 2i of qh[l] is the 5th bit of sub-block 2i's weight l, bit 2i + 1 of 2i + 1's */
                const __m256i lo = _mm256_set1_epi8((char)(1 << (2 * i))), hi = _mm256_set1_epi8((char)(2 << (2 * i)));
                wq[2 * i] = _mm256_or_si256(wq[2 * i], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, lo), lo), b4));
                wq[2 * i + 1] = _mm256_or_si256(wq[2 * i + 1],
                                                _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, hi), hi), b4));
            }
        }
        const float d = rd16(b), dmin = rd16(b + 2);
        const __m256 mn = _mm256_mul_ps(_mm256_set1_ps(dmin),
                                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)m))));
        for (int64_t r = 0; r < R; r++) {
            const __m256i t = scaled_dot256(wq, sc16, a_q + r * kp + 256 * c);
            const float dd = d * a_d[r * (kp / 32) + 8 * c];
            _mm256_store_ps(acc + 16 * r, _mm256_fmadd_ps(_mm256_cvtepi32_ps(t),
                                                          _mm256_set1_ps(dd), _mm256_load_ps(acc + 16 * r)));
            _mm256_store_ps(acc + 16 * r + 8, _mm256_fmadd_ps(mn, _mm256_loadu_ps(a_s + r * (kp / 32) + 8 * c),
                                                              _mm256_load_ps(acc + 16 * r + 8)));
        }
    }
    finish_rows(acc, R, res);
}

static void row_q4_k_fused(const job *jb, const uint8_t *wrow, const int8_t *a_q, const float *a_d,
                           const float *a_s, float *res, int8_t *q, float *acc) {
    (void)q;
    row_q45_k_t(jb, wrow, a_q, a_d, a_s, res, acc, 0);
}

static void row_q5_k_fused(const job *jb, const uint8_t *wrow, const int8_t *a_q, const float *a_d,
                           const float *a_s, float *res, int8_t *q, float *acc) {
    (void)q;
    row_q45_k_t(jb, wrow, a_q, a_d, a_s, res, acc, 1);
}

/* Q6_K likewise: the 6-bit values v (0..63) straight into maddubs (at most 2 * 63 * 128 per pair), times the
 * signed scale of their 16 (madd), summed in integers over the superblock; the -32 offset comes back as
 * 32 * d * sum_j sc_j dbs_j (dbs: the activations' scaled sums per 16) on the minus side. */
static void row_q6_k_fused(const job *jb, const uint8_t *wrow, const int8_t *a_q, const float *a_d,
                           const float *a_s, float *res, int8_t *q, float *acc) {
    (void)q;
    const int64_t K = jb->K, R = jb->R, kp = jb->a->kp, nb = K / 256;
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(0x30);
    memset(acc, 0, sizeof(float) * 16 * R);
    for (int64_t c = 0; c < nb; c++) {
        const uint8_t *b = wrow + 210 * c;
        const int8_t *scb = (const int8_t *)(b + 192);
        __m256i sc16[8], wq[8];
        /* the even scales as int16 in the low lane, the odd ones in the high lane: sc16[j] is 2j's, then 2j+1's */
        const __m128i eo = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        spread_scales(_mm256_cvtepi8_epi16(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)scb), eo)), sc16);
        for (int h = 0; h < 2; h++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
            __m256i cc = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
            __m256i hh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
            wq[4 * h] = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_and_si256(_mm256_slli_epi16(hh, 4), m2));
            wq[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(cc, m4), _mm256_and_si256(_mm256_slli_epi16(hh, 2), m2));
            wq[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), _mm256_and_si256(hh, m2));
            wq[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(cc, 4), m4),
                                            _mm256_and_si256(_mm256_srli_epi16(hh, 2), m2));
        }
        const float d = rd16(b + 208);
        const __m256 d32 = _mm256_set1_ps(32.0f * d);
        const __m256 s0 = _mm256_mul_ps(d32, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)scb))));
        const __m256 s1 = _mm256_mul_ps(d32, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(scb + 8)))));
        for (int64_t r = 0; r < R; r++) {
            const __m256i t = scaled_dot256(wq, sc16, a_q + r * kp + 256 * c);
            const float dd = d * a_d[r * (kp / 32) + 8 * c];
            const float *as = a_s + r * (kp / 16) + 16 * c;
            _mm256_store_ps(acc + 16 * r, _mm256_fmadd_ps(_mm256_cvtepi32_ps(t),
                                                          _mm256_set1_ps(dd), _mm256_load_ps(acc + 16 * r)));
            __m256 mm = _mm256_fmadd_ps(s0, _mm256_loadu_ps(as), _mm256_load_ps(acc + 16 * r + 8));
            _mm256_store_ps(acc + 16 * r + 8, _mm256_fmadd_ps(s1, _mm256_loadu_ps(as + 8), mm));
        }
    }
    finish_rows(acc, R, res);
}
#endif

typedef void (*row_int_fn)(const job *, const uint8_t *, const int8_t *, const float *, const float *, float *,
                           int8_t *, float *);
typedef void (*row_float_fn)(const job *, const uint8_t *, const float *, const float *, float *, int8_t *,
                             float *, float *);

static row_int_fn pick_int(const qtype_info *ti) {
#if QD_AVX2
    if (ti->type == T_Q4_K) return row_q4_k_fused;
    if (ti->type == T_Q5_K) return row_q5_k_fused;
    if (ti->type == T_Q6_K) return row_q6_k_fused;
#endif
    if (ti->act_k) return ti->sub == 32 ? row_int_k32m : (ti->has_min ? row_int_k16m : row_int_k16);
    return ti->has_min ? row_int_0m : row_int_0;
}

static row_float_fn pick_float(const qtype_info *ti) {
    if (ti->sub == 32) return ti->has_min ? row_float_32m : row_float_32;
    return ti->has_min ? row_float_16m : row_float_16;
}

static void *run_job(void *arg) {
    job *jb = (job *)arg;
    const int64_t N = jb->N, R = jb->R;
    const int64_t row_bytes = jb->K / jb->ti->qk * jb->ti->bytes;
    const acts *a = jb->a;
    row_int_fn fi = pick_int(jb->ti);
    row_float_fn ff = pick_float(jb->ti);
    int8_t *q = NULL;
    float *wf = NULL, *acc = NULL, *res = NULL;
    if (posix_memalign((void **)&q, 64, CHUNK) || posix_memalign((void **)&wf, 64, CHUNK * sizeof(float)) ||
        posix_memalign((void **)&acc, 64, sizeof(float) * 16 * (size_t)R) ||
        posix_memalign((void **)&res, 64, sizeof(float) * (size_t)R)) {
        jb->status = -2;
        goto done;
    }
    /* rows are handed out a grain at a time, so a thread the OS delays does not hold up the others; each
     * row is computed whole by whichever thread takes it, so the results do not depend on the split */
    for (int64_t i = 0, i_end = 0;; i++) {
        if (i == i_end) {
            i = __atomic_fetch_add(jb->next, jb->grain, __ATOMIC_RELAXED);
            if (i >= jb->rows) break;
            i_end = i + jb->grain < jb->rows ? i + jb->grain : jb->rows;
        }
        int64_t m = i / N, n = i % N, r0 = m * jb->a_mat;
        const uint8_t *wrow = jb->w[m] + n * row_bytes;
        const float *sums = a->dbs ? a->dbs + r0 * (a->kp / a->sub) : NULL;
        if (jb->round_acts)
            fi(jb, wrow, a->q + r0 * a->kp, a->d32 + r0 * (a->kp / 32), sums, res, q, acc);
        else
            ff(jb, wrow, jb->x + m * jb->xs_mat, sums, res, q, wf, acc);
        float *o = jb->out + m * R * N + n;
        for (int64_t r = 0; r < R; r++) o[r * N] = res[r];
    }
    jb->status = 0;
done:
    free(q); free(wf); free(acc); free(res);
    return NULL;
}

/* ----------------------------------------------------------------------------------- thread pool */

/* Workers parked on a condition variable: a call hands worker i the argument args + (i + 1) * stride and
 * runs args itself; workers the OS refuses to start are simply not there (the rows are shared out
 * dynamically, so fewer threads only take longer). After fork() the child has no workers: it starts anew. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t go, done;
    int n;               /* workers started */
    unsigned long gen;   /* bumped once per call */
    int want, left;      /* workers taking part in this call (0 .. want - 1), those still running */
    void *(*fn)(void *);
    char *args;
    size_t stride;
    unsigned long start_gen[256];
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, NULL,
          0, {0}};
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;  /* one call at a time */
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static void pool_after_fork(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.go, NULL);
    pthread_cond_init(&pool.done, NULL);
    pthread_mutex_init(&pool_busy, NULL);
    pool.n = pool.want = pool.left = 0;
}

static void pool_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static void *pool_worker(void *arg) {
    const int idx = (int)(intptr_t)arg;
    pthread_mutex_lock(&pool.lock);
    unsigned long seen = pool.start_gen[idx];
    for (;;) {
        while (pool.gen == seen) pthread_cond_wait(&pool.go, &pool.lock);
        seen = pool.gen;
        if (idx < pool.want) {
            void *(*fn)(void *) = pool.fn;
            char *a = pool.args + (size_t)(idx + 1) * pool.stride;
            pthread_mutex_unlock(&pool.lock);
            fn(a);
            pthread_mutex_lock(&pool.lock);
            if (--pool.left == 0) pthread_cond_signal(&pool.done);
        }
    }
    return NULL;
}

/* fn(args + t * stride) for t < n_total, t = 0 on the calling thread. Returns the workers that took part
 * (t = 1 .. that number), or -1 where another call holds the pool (then nothing ran). */
static int pool_run(void *(*fn)(void *), void *args, size_t stride, int n_total) {
    pthread_once(&pool_once, pool_init);
    if (pthread_mutex_trylock(&pool_busy)) return -1;
    pthread_mutex_lock(&pool.lock);
    while (pool.n < n_total - 1 && pool.n < 256) {
        pthread_t t;
        pool.start_gen[pool.n] = pool.gen;  /* so that it takes the bump below as work: this call is its first */
        if (pthread_create(&t, NULL, pool_worker, (void *)(intptr_t)pool.n)) break;
        pthread_detach(t);
        pool.n++;
    }
    const int w = n_total - 1 < pool.n ? n_total - 1 : pool.n;
    pool.want = pool.left = w;
    pool.fn = fn;
    pool.args = (char *)args;
    pool.stride = stride;
    pool.gen++;
    pthread_cond_broadcast(&pool.go);
    pthread_mutex_unlock(&pool.lock);
    fn(args);
    pthread_mutex_lock(&pool.lock);
    while (pool.left) pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool_busy);
    return w;
}

/* ------------------------------------------------------------------------------------ public API */

/* 1 if qdot_mm handles ggml type `type` */
int qdot_supported(int type) { return find_type(type) != NULL; }

/* 1 if compiled with the AVX2 kernels (else portable C) */
int qdot_simd(void) { return QD_AVX2; }

/* out[m, r, n] (contiguous [n_mat, R, N]) = sum_k x[m, r, k] * W_m[n, k] for m < n_mat.
 * w[m]: the raw blocks of W_m ([N, K], K a multiple of the type's block); x element (m, r, k) at
 * x[m * xs_mat + r * xs_row + k] (xs_mat may be 0: one x for all matrices).
 * Returns 0, -1 for an unsupported type or bad K, -2 when out of memory or a thread could not start. */
int qdot_mm(int type, int round_acts, const float *x, int64_t xs_mat, int64_t xs_row,
            const uint8_t *const *w, int64_t n_mat, int64_t R, int64_t N, int64_t K, float *out, int n_threads) {
    const qtype_info *ti = find_type(type);
    if (!ti || K <= 0 || K % ti->qk || n_mat <= 0 || R <= 0 || N <= 0) return -1;
    acts a = {0};
    int rc = 0;
    a.kp = (K + 255) / 256 * 256;
    a.sub = ti->sub;
    if (!round_acts && ti->has_min) {  /* the sums of x per sub-block, for the mins */
        int64_t n_rows = (xs_mat == 0 ? 1 : n_mat) * R, ns = a.kp / a.sub;
        a.dbs = calloc((size_t)(n_rows * ns), sizeof(float));
        if (!a.dbs) { rc = -2; goto out; }
        for (int64_t i = 0; i < n_rows; i++) {
            const float *xr = x + (i / R) * xs_mat + (i % R) * xs_row;
            for (int64_t j = 0; j < K / a.sub; j++) {
                float t = 0.0f;
                for (int e = 0; e < a.sub; e++) t += xr[j * a.sub + e];
                a.dbs[i * ns + j] = t;
            }
        }
    }
    if (round_acts) {  /* round each distinct activation row once, here */
        int64_t n_rows = (xs_mat == 0 ? 1 : n_mat) * R;
        a.q = calloc((size_t)(n_rows * a.kp), 1);
        a.d32 = calloc((size_t)(n_rows * a.kp / 32), sizeof(float));
        a.dbs = calloc((size_t)(n_rows * a.kp / ti->sub), sizeof(float));
        if (!a.q || !a.d32 || !a.dbs) { rc = -2; goto out; }
        for (int64_t i = 0; i < n_rows; i++) {
            const float *xr = x + (i / R) * xs_mat + (i % R) * xs_row;
            if (ti->act_k)
                round_q8_k(xr, K, ti->sub, a.q + i * a.kp, a.d32 + i * (a.kp / 32), a.dbs + i * (a.kp / ti->sub));
            else
                round_q8_0(xr, K, a.q + i * a.kp, a.d32 + i * (a.kp / 32), a.dbs + i * (a.kp / 32));
        }
    }
    int64_t rows = n_mat * N;
    if (n_threads < 1) n_threads = 1;
    int64_t min_rows = 1 + (1 << 16) / (K * R);  /* at least ~64 K multiply-adds per thread */
    if (n_threads > rows / min_rows) n_threads = (int)(rows / min_rows > 0 ? rows / min_rows : 1);
    if (n_threads > 256) n_threads = 256;
    job jobs[256];
    pthread_t tids[256];
    int started[256] = {0};
    int64_t next = 0, grain = rows / (8 * (int64_t)n_threads);
    if (grain < 1) grain = 1;
    if (grain > 64) grain = 64;
    for (int t = 0; t < n_threads; t++) {
        job *jb = &jobs[t];
        jb->ti = ti; jb->round_acts = round_acts; jb->w = w;
        jb->N = N; jb->K = K; jb->R = R; jb->x = x; jb->xs_mat = xs_mat; jb->xs_row = xs_row;
        jb->a = &a; jb->a_mat = xs_mat == 0 ? 0 : R; jb->out = out;
        jb->rows = rows; jb->grain = grain; jb->next = &next;
        jb->status = -2;
    }
    int pooled = n_threads > 1 ? pool_run(run_job, jobs, sizeof(job), n_threads) : -1;
    if (pooled >= 0) {
        for (int t = pooled + 1; t < n_threads; t++) jobs[t].status = 0;  /* workers that are not there */
    } else {  /* one thread, or the pool is busy with another call: threads of this call's own */
        for (int t = 1; t < n_threads; t++) {  /* the rows of a thread that did not start go to the others */
            started[t] = pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0;
            if (!started[t]) jobs[t].status = 0;
        }
        run_job(&jobs[0]);
        for (int t = 1; t < n_threads; t++)
            if (started[t]) pthread_join(tids[t], NULL);
    }
    for (int t = 0; t < n_threads; t++)
        if (jobs[t].status) rc = jobs[t].status;
out:
    free(a.q); free(a.d32); free(a.dbs);
    return rc;
}

/* The float32 values of `n_blocks` consecutive blocks of `type` (bit-identical to the reference
 * dequantisers), split over n_threads. Returns 0 or -1 (unsupported type) / -2. */
typedef struct { const qtype_info *ti; const uint8_t *raw; float *out; int64_t b0, b1; } djob;

static void *run_djob(void *arg) {
    djob *dj = (djob *)arg;
    const qtype_info *ti = dj->ti;
    const int per = CHUNK / ti->qk;
    int8_t q[CHUNK] __attribute__((aligned(32)));
    float sc[MAX_SUB], mn[MAX_SUB];
    memset(mn, 0, sizeof mn);
    for (int64_t b = dj->b0; b < dj->b1; b += per) {
        int nblk = (int)(dj->b1 - b < per ? dj->b1 - b : per), n = nblk * ti->qk;
        ti->decode(dj->raw + b * ti->bytes, nblk, q, sc, mn);
        float *o = dj->out + b * ti->qk;
        const int sub = ti->sub;
        for (int j = 0; j < n / sub; j++) {  /* float(q) * scale, then minus the min: the reference's operations */
#if QD_AVX2
            __m256 s = _mm256_set1_ps(sc[j]), m = _mm256_set1_ps(mn[j]);
            for (int i = j * sub; i < (j + 1) * sub; i += 8) {
                __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + i))));
                _mm256_storeu_ps(o + i, _mm256_sub_ps(_mm256_mul_ps(f, s), m));
            }
#else
            for (int i = j * sub; i < (j + 1) * sub; i++) o[i] = (float)q[i] * sc[j] - mn[j];
#endif
        }
    }
    return NULL;
}

int qdot_dequant(int type, const uint8_t *raw, int64_t n_blocks, float *out, int n_threads) {
    const qtype_info *ti = find_type(type);
    if (!ti || n_blocks < 0) return -1;
    const int per = CHUNK / ti->qk;
    int64_t chunks = (n_blocks + per - 1) / per;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > chunks / 64) n_threads = (int)(chunks / 64 > 0 ? chunks / 64 : 1);
    if (n_threads > 256) n_threads = 256;
    djob jobs[256];
    pthread_t tids[256];
    int started[256] = {0};
    for (int t = 0; t < n_threads; t++) {
        jobs[t].ti = ti; jobs[t].raw = raw; jobs[t].out = out;
        jobs[t].b0 = chunks * t / n_threads * per;
        int64_t e = chunks * (t + 1) / n_threads * per;
        jobs[t].b1 = e < n_blocks ? e : n_blocks;
    }
    for (int t = 1; t < n_threads; t++) started[t] = pthread_create(&tids[t], NULL, run_djob, &jobs[t]) == 0;
    for (int t = 1; t < n_threads; t++)
        if (!started[t]) run_djob(&jobs[t]);
    run_djob(&jobs[0]);
    for (int t = 1; t < n_threads; t++)
        if (started[t]) pthread_join(tids[t], NULL);
    return 0;
}

/* ------------------------------------------------------------- the module setuptools builds */

#ifndef QDOT_NO_PYTHON
static struct PyModuleDef qdot_module = {PyModuleDef_HEAD_INIT, "_qdot",
                                         "native quantised matmul kernels (called through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__qdot(void) { return PyModule_Create(&qdot_module); }
#endif
