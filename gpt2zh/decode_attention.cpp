// Attention over the cache for the sampling step (decode_step.cpp): each row's newest query over its cached keys and
// values, in one pass with a running softmax, the keys and values bf16 or int8 with a scale for each position of each
// head (the queries then rounded to int8 too, their products with keys summed in integers).
#include "decode_step.h"

namespace decode {
namespace {

// lanes of two vectors picked by index (0-15 the first's, 16-31 the second's): GCC's and clang's builtin
#if defined(__clang__)
#define PICK(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define PICK(a, b, ...) __builtin_shuffle(a, b, words{__VA_ARGS__})
#endif

inline float lanes_sum(floats v) {  // halving in registers
    v += PICK(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += PICK(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    v += PICK(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    return v[0] + v[1];
}

// the lane sums of four vectors in the first four lanes, together: a quarter of the shuffles of four lanes_sum
inline floats lanes_sums(floats a, floats b, floats c, floats d) {
    const floats ab = PICK(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                      PICK(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const floats cd = PICK(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                      PICK(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    // ab, cd: 8 partial sums of each vector; then 4, 2, 1
    const floats quarters = PICK(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                            PICK(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const floats halves = PICK(quarters, quarters, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14) +
                          PICK(quarters, quarters, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
    return PICK(halves, halves, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6) +
           PICK(halves, halves, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7, 1, 3, 5, 7);
}

// A layer's cache: keys and values [rows * heads][capacity][dim], bf16 (uint16_t) or int8 with a scale for each
// position of each head ([rows * heads][capacity], its largest magnitude at 127: native.py's QuantizedLayer; half
// the bytes the attention reads, the held-out loss unchanged).
constexpr float CACHE_LEVELS = 127.0f;

template <class Element>
constexpr bool SCALED = std::is_same_v<Element, int8_t>;

inline float to_float(uint16_t bf16) { return bf16_to_float(bf16); }
inline float to_float(int8_t level) { return float(level); }

// Which of a chunk's 2 * LANES dims lane j of its vector `half` holds, as the loads below split them: bf16 into the
// even and the odd dims (a mask and a shift: a third fewer operations than widening them in order), int8 in order.
template <class Element, int LANES>
constexpr int lane_dim(int half, int j) { return SCALED<Element> ? LANES * half + j : 2 * j + half; }

template <class Element>
struct Head {  // one row's one head: its keys and values [position][dim], and their scales (int8)
    const Element *keys, *values;
    const float *key_scales, *value_scales;
    float key_scale(int t) const {
        if constexpr (SCALED<Element>) return key_scales[t];
        return 1.0f;
    }
    float value_scale(int t) const {
        if constexpr (SCALED<Element>) return value_scales[t];
        return 1.0f;
    }
};

template <class Element>
struct LayerCache {
    Element *keys, *values;
    float *key_scales, *value_scales;  // null for bf16
    int capacity, dim;

    Head<Element> head(int rh) const {
        const size_t at = size_t(rh) * capacity;
        if constexpr (SCALED<Element>) return {keys + at * dim, values + at * dim, key_scales + at, value_scales + at};
        return {keys + at * dim, values + at * dim, nullptr, nullptr};
    }
    void write(int rh, int t, const float* key, const float* value) {
        const size_t at = size_t(rh) * capacity + t;
        if constexpr (SCALED<Element>) {
            key_scales[at] = quantize(key, dim, CACHE_LEVELS, keys + at * dim);
            value_scales[at] = quantize(value, dim, CACHE_LEVELS, values + at * dim);
        } else {
            for (int d = 0; d < dim; ++d) {
                keys[at * dim + d] = to_bf16(key[d]);
                values[at * dim + d] = to_bf16(value[d]);
            }
        }
    }
};

// A block of n scores made weights of the running softmax: exp(score - top), `top` the maximum so far and `total`
// the sum so far, both updated. Returns the factor the sums of earlier blocks must be multiplied by (1 unless this
// block raised the maximum).
inline float softmax_block(float* weights, int n, float& top, float& total) {
    float block_top = -INFINITY, shrink = 1.0f;
    for (int t = 0; t < n; ++t) block_top = std::max(block_top, weights[t]);
    if (block_top > top) {  // the sums so far were weighted against a lower maximum
        shrink = exp_approx(top - block_top);
        total *= shrink;
        top = block_top;
    }
    for (int t = 0; t < n; ++t) weights[t] = exp_approx(weights[t] - top);
    total += sum_of(n, [&](int i) { return weights[i]; });
    return shrink;
}

#ifdef AVX2_FMA
// The same on AVX2, in its 16 registers of 8 floats. The generic version's 16-lane vectors take two registers each
// there: its query, two positions' sums and the loads no longer fit and spill to memory at every key, and its
// cross-lane shuffles become sequences of permutes (it read the cache at a third of the memory's speed).
inline __m256 sums_of_eight(const __m256* v) {  // lane i: the sum of v[i]'s 8 lanes
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 efgh = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    // abcd: the four sums of a, b, c, d over lanes 0-3 in its low half, over lanes 4-7 in its high half
    return _mm256_add_ps(_mm256_permute2f128_ps(abcd, efgh, 0x20), _mm256_permute2f128_ps(abcd, efgh, 0x31));
}

inline void load16(const uint16_t* p, __m256& even, __m256& odd) {  // 16 bf16 values
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xffff0000u))));
}

inline void load16(const int8_t* p, __m256& low, __m256& high) {  // 16 int8 values, each half widened as it loads
    low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
}

// A query's scores against blocks of bf16 keys: its 16-dim chunks in the halves load16 splits a key's into, times
// `scale`, multiplied in floats
template <int PAIRS>
struct KeyScores {
    static constexpr int CHUNKS = 2 * PAIRS;  // of 16 dims
    __m256 query[CHUNKS][2];

    KeyScores(const float* q, float scale) {
        for (int c = 0; c < CHUNKS; ++c) {
            alignas(32) float halves[2][8];
            for (int half = 0; half < 2; ++half)
                for (int j = 0; j < 8; ++j) halves[half][j] = q[16 * c + lane_dim<uint16_t, 8>(half, j)] * scale;
            query[c][0] = _mm256_load_ps(halves[0]);
            query[c][1] = _mm256_load_ps(halves[1]);
        }
    }
    // weights[0..n rounded up to 8) = the query . keys[0..n) (n <= 64)
    void operator()(const uint16_t* keys, int n, float* weights) const {
        for (int t = 0; t < n; t += 8) {
            __m256 dots[8];
            for (int i = 0; i < 8; ++i) {
                dots[i] = _mm256_setzero_ps();
                if (t + i >= n) continue;
                const uint16_t* key = keys + size_t(t + i) * 32 * PAIRS;
                __m256 other = _mm256_setzero_ps(), first, second;
                for (int c = 0; c < CHUNKS; ++c) {
                    load16(key + 16 * c, first, second);
                    dots[i] = _mm256_fmadd_ps(query[c][0], first, dots[i]);
                    other = _mm256_fmadd_ps(query[c][1], second, other);
                }
                dots[i] = _mm256_add_ps(dots[i], other);
            }
            _mm256_store_ps(weights + t, sums_of_eight(dots));
        }
    }
};

inline __m256i sums_of_eight(const __m256i* v) {  // sums_of_eight in integers
    const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i efgh = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(abcd, efgh, 0x20), _mm256_permute2x128_si256(abcd, efgh, 0x31));
}

// Against int8 keys the query is in levels too (attention's rounded_query): the products of bytes are summed in
// integers, 32 at a time by vpmaddubsw (unsigned by signed bytes: the query's magnitudes by the keys with its signs;
// each pair's sum below 2 * 127 * 127 < 32768), a third of the operations of widening each key to floats.
template <int PAIRS>
struct LevelScores {
    __m256i magnitudes[PAIRS], signs[PAIRS];  // 32 dims each
    float scale;

    LevelScores(const float* q, float scale) : scale(scale) {
        for (int c = 0; c < PAIRS; ++c) {
            alignas(32) int8_t levels[32];
            for (int j = 0; j < 32; ++j) levels[j] = int8_t(q[32 * c + j]);
            signs[c] = _mm256_load_si256(reinterpret_cast<const __m256i*>(levels));
            magnitudes[c] = _mm256_abs_epi8(signs[c]);
        }
    }
    void operator()(const int8_t* keys, int n, float* weights) const {
        const __m256i ones = _mm256_set1_epi16(1);
        for (int t = 0; t < n; t += 8) {
            __m256i dots[8];
            for (int i = 0; i < 8; ++i) {
                dots[i] = _mm256_setzero_si256();
                if (t + i >= n) continue;
                const int8_t* key = keys + size_t(t + i) * 32 * PAIRS;
                for (int c = 0; c < PAIRS; ++c) {
                    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + 32 * c));
                    const __m256i pairs = _mm256_maddubs_epi16(magnitudes[c], _mm256_sign_epi8(k, signs[c]));
                    dots[i] = _mm256_add_epi32(dots[i], _mm256_madd_epi16(pairs, ones));
                }
            }
            _mm256_store_ps(weights + t, _mm256_mul_ps(_mm256_cvtepi32_ps(sums_of_eight(dots)), _mm256_set1_ps(scale)));
        }
    }
};

template <int PAIRS, class Element>
void attend_in_vectors(const float* q, Head<Element> head, int length, float scale, float* out) {
    constexpr int dim = 32 * PAIRS, CHUNKS = 2 * PAIRS, BLOCK = 64;  // chunks of 16 dims
    const std::conditional_t<SCALED<Element>, LevelScores<PAIRS>, KeyScores<PAIRS>> scores(q, scale);
    __m256 sums[CHUNKS][2];  // 8 accumulators for heads of 64: independent FMAs every key
    for (auto& chunk : sums) chunk[0] = chunk[1] = _mm256_setzero_ps();
    alignas(32) float weights[BLOCK];  // room for a whole last 8
    float top = -INFINITY, total = 0.0f;
    for (int start = 0; start < length; start += BLOCK) {
        const int n = std::min(BLOCK, length - start);
        scores(head.keys + size_t(start) * dim, n, weights);
        for (int t = 0; t < n; ++t) weights[t] *= head.key_scale(start + t);
        const float shrink = softmax_block(weights, n, top, total);
        if (shrink != 1.0f)
            for (auto& chunk : sums)
                for (auto& half : chunk) half = _mm256_mul_ps(half, _mm256_set1_ps(shrink));
        for (int t = 0; t < n; ++t) {
            const __m256 weight = _mm256_set1_ps(weights[t] * head.value_scale(start + t));
            const Element* value = head.values + size_t(start + t) * dim;
            __m256 first, second;
            for (int c = 0; c < CHUNKS; ++c) {
                load16(value + 16 * c, first, second);
                sums[c][0] = _mm256_fmadd_ps(weight, first, sums[c][0]);
                sums[c][1] = _mm256_fmadd_ps(weight, second, sums[c][1]);
            }
        }
    }
    for (int c = 0; c < CHUNKS; ++c) {
        alignas(32) float halves[2][8];
        _mm256_store_ps(halves[0], sums[c][0]);
        _mm256_store_ps(halves[1], sums[c][1]);
        for (int half = 0; half < 2; ++half)
            for (int j = 0; j < 8; ++j) out[16 * c + lane_dim<Element, 8>(half, j)] = halves[half][j] / total;
    }
}
#else
inline void load32(const uint16_t* p, floats& even, floats& odd) {  // 32 bf16 values
    words w;
    std::memcpy(&w, p, sizeof(w));
    even = (floats)(w << 16);
    odd = (floats)(w & 0xffff0000u);
}

inline void load32(const int8_t* p, floats& low, floats& high) {  // 32 int8 values
#ifdef __AVX512F__  // GCC 12 widens a vector of bytes to floats (__builtin_convertvector) one byte at a time
    low = (floats)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    high = (floats)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
#else
    typedef int8_t bytes16 __attribute__((vector_size(16)));
    bytes16 first, second;
    std::memcpy(&first, p, sizeof(first));
    std::memcpy(&second, p + 16, sizeof(second));
    low = __builtin_convertvector(first, floats);
    high = __builtin_convertvector(second, floats);
#endif
}

// One query over `length` keys and values (rows of 32 * PAIRS), in whole vectors kept in registers, 32 dims at a
// time split in two as load32 splits them, the query the same way. One pass, a block of keys then the same block of
// values, with the softmax's running maximum (the sums so far rescaled when it grows): the keys and values stream
// side by side, where two passes read each alone.
template <int PAIRS, class Element>
void attend_in_vectors(const float* q, Head<Element> head, int length, float scale, float* out) {
    constexpr int dim = 32 * PAIRS, BLOCK = 64;
    floats query[PAIRS][2];  // [32 dims][the halves load32 splits them into]
    for (int c = 0; c < PAIRS; ++c)
        for (int half = 0; half < 2; ++half)
            for (int j = 0; j < 16; ++j) query[c][half][j] = q[32 * c + lane_dim<Element, 16>(half, j)] * scale;
    auto dot = [&](int t) {  // query . key t, still in 16 lanes
        floats first_sum = {}, second_sum = {}, first, second;
        for (int c = 0; c < PAIRS; ++c) {
            load32(head.keys + size_t(t) * dim + 32 * c, first, second);
            first_sum += query[c][0] * first;
            second_sum += query[c][1] * second;
        }
        return first_sum + second_sum;
    };
    floats sums[2][PAIRS][2] = {};  // two positions at a time: the adds of one do not wait on the other's
    auto add_value = [&](int t, int u, float weight) {
        floats first, second;
        for (int c = 0; c < PAIRS; ++c) {
            load32(head.values + size_t(t) * dim + 32 * c, first, second);
            sums[u][c][0] += weight * first;
            sums[u][c][1] += weight * second;
        }
    };
    float top = -INFINITY, total = 0.0f, weights[BLOCK];
    for (int start = 0; start < length; start += BLOCK) {
        const int n = std::min(BLOCK, length - start);
        int t = 0;
        for (; t + 4 <= n; t += 4) {
            const floats block = lanes_sums(dot(start + t), dot(start + t + 1), dot(start + t + 2), dot(start + t + 3));
            std::memcpy(weights + t, &block, 4 * sizeof(float));
        }
        for (; t < n; ++t) weights[t] = lanes_sum(dot(start + t));
        for (t = 0; t < n; ++t) weights[t] *= head.key_scale(start + t);
        const float shrink = softmax_block(weights, n, top, total);
        if (shrink != 1.0f)
            for (auto& position : sums)
                for (auto& chunk : position)
                    for (auto& half : chunk) half *= shrink;
        for (t = 0; t + 2 <= n; t += 2) {
            add_value(start + t, 0, weights[t] * head.value_scale(start + t));
            add_value(start + t + 1, 1, weights[t + 1] * head.value_scale(start + t + 1));
        }
        if (t < n) add_value(start + t, 0, weights[t] * head.value_scale(start + t));
    }
    for (int c = 0; c < PAIRS; ++c)
        for (int half = 0; half < 2; ++half)
            for (int j = 0; j < 16; ++j)
                out[32 * c + lane_dim<Element, 16>(half, j)] = (sums[0][c][half][j] + sums[1][c][half][j]) / total;
}

#endif

template <class Element>
void attend_in_scalars(const float* q, Head<Element> head, int dim, int length, float scale, float* out) {
    thread_local std::vector<float> scores;
    scores.resize(length);
    float top = -INFINITY;
    for (int t = 0; t < length; ++t) {
        const Element* key = head.keys + size_t(t) * dim;
        scores[t] = scale * head.key_scale(t) * sum_of(dim, [&](int d) { return q[d] * to_float(key[d]); });
        top = std::max(top, scores[t]);
    }
    for (int t = 0; t < length; ++t) scores[t] = exp_approx(scores[t] - top);
    const float total = sum_of(length, [&](int t) { return scores[t]; });
    for (int d = 0; d < dim; ++d) out[d] = 0.0f;
    for (int t = 0; t < length; ++t) {
        const float weight = scores[t] * head.value_scale(t);
        for (int d = 0; d < dim; ++d) out[d] += weight * to_float(head.values[size_t(t) * dim + d]);
    }
    for (int d = 0; d < dim; ++d) out[d] /= total;
}

// Against an int8 cache a query is rounded to levels as the keys are, its scale folded into `scale`, whichever path
// attends: its products with a key are whole numbers, which AVX2 sums in integers (LevelScores).
template <class Element>
const float* rounded_query(const float* q, int dim, float& scale, std::vector<float>& levels) {
    if constexpr (!SCALED<Element>) return q;
    thread_local std::vector<int8_t> bytes;
    bytes.resize(dim);
    scale *= quantize(q, dim, CACHE_LEVELS, bytes.data());
    levels.assign(bytes.begin(), bytes.end());
    return levels.data();
}

// Each row's newest query over its `length` cached keys (the newest written here first): attended [rows][lda]
template <class Element>
void attention(int rows, int heads, int length, const float* qkv, LayerCache<Element> cache, float scale,
               float* attended, int lda, int threads) {
    const int dim = cache.dim, C = heads * dim;
    for (int rh = 0; rh < rows * heads; ++rh) {
        const float* key = qkv + size_t(rh / heads) * 3 * C + C + (rh % heads) * dim;
        cache.write(rh, length - 1, key, key + C);
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int rh = 0; rh < rows * heads; ++rh) {
        const int r = rh / heads, h = rh % heads;
        thread_local std::vector<float> levels;
        float query_scale = scale;
        const float* q = rounded_query<Element>(qkv + size_t(r) * 3 * C + h * dim, dim, query_scale, levels);
        const Head<Element> head = cache.head(rh);
        float* out = attended + size_t(r) * lda + h * dim;
        switch (dim) {  // the head sizes of GPT-2 configs; any other in scalars
            case 32: attend_in_vectors<1>(q, head, length, query_scale, out); break;
            case 64: attend_in_vectors<2>(q, head, length, query_scale, out); break;
            case 128: attend_in_vectors<4>(q, head, length, query_scale, out); break;
            default: attend_in_scalars(q, head, dim, length, query_scale, out);
        }
    }
}

template <class Element>
LayerCache<Element> layer_cache(void* const* pointers, int capacity, int dim) {  // keys, values, their scales
    return {static_cast<Element*>(pointers[0]), static_cast<Element*>(pointers[1]), static_cast<float*>(pointers[2]),
            static_cast<float*>(pointers[3]), capacity, dim};
}

}  // namespace

void attend_layer(int rows, int heads, int length, const float* qkv, void* const* cache, int capacity, int dim,
                  float scale, float* attended, int lda, int threads) {
    if (cache[2])
        attention(rows, heads, length, qkv, layer_cache<int8_t>(cache, capacity, dim), scale, attended, lda, threads);
    else
        attention(rows, heads, length, qkv, layer_cache<uint16_t>(cache, capacity, dim), scale, attended, lda, threads);
}

}  // namespace decode
