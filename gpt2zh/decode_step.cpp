// One sampling step of a GPT-2 in one call: every row's newest token through every block, its key and value
// written into a bf16 cache, the next token's logits out. Built by gpt2zh/native.py with the machine's own
// instruction set (-march=native) and called through ctypes, so a step costs one call instead of ~150 PyTorch
// operators, and the weights stream from memory in a layout made for it.
//
// Weights are bf16, packed by native.py as [tiles of 16 outputs][input pairs][16 outputs] of uint32, each holding
// the weights of two consecutive inputs for one output (the lower half the even input): a tile is one contiguous
// run of memory, and AVX512-BF16's dot product of pairs (vdpbf16ps) takes it as it is. Without that instruction
// the weights are widened to fp32 and multiplied in fp32 (AVX-512 and AVX2 in intrinsics, other CPUs in portable
// vector code). Or int8 with a scale per output (half the bytes a step reads), packed as [tiles][input quads][16
// outputs][4 inputs]: each linear layer's input rows are quantized too (to 7 bits, a scale per row), and the
// products are summed in integers — AVX2's and AVX-512's multiply-adds of bytes do four times the work of an fp32
// multiply-add in a vector, where ten rows make the step compute-bound. The residual stream, layer norms, softmax
// and the sums of bf16 products are fp32; the cache [rows, heads, capacity, head_dim] is bf16, or int8 with a scale
// for each position of each head (the queries then rounded to int8 too, their products with keys summed in integers).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define DOT_PAIRS_IN_BF16 1
#elif defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define AVX2_FMA 1
#endif

namespace {

constexpr int TILE = 16;      // outputs per packed tile
#ifdef __AVX512F__
constexpr int ROW_BLOCK = 12;      // rows sharing one read of a tile (the next block reads it again from cache)
constexpr int TILES_PER_STEP = 2;  // 24 sums and 2 tiles' weights in 32 vector registers
#elif defined(AVX2_FMA)
constexpr int ROW_BLOCK = 12;  // a half tile at a time: 12 rows' sums, its even and odd weights and a broadcast
constexpr int TILES_PER_STEP = 1;
#else
constexpr int ROW_BLOCK = 4;  // 16 vector registers (NEON): 4 rows' sums and the weights fit in them
constexpr int TILES_PER_STEP = 1;
#endif

typedef float floats __attribute__((vector_size(64)));     // 16 floats, mapped on the CPU's vectors
typedef uint32_t words __attribute__((vector_size(64)));

inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as PyTorch's .to(torch.bfloat16)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

// exp(x) to ~2 ulp in branch-free arithmetic the compiler vectorizes (glibc's expf is a scalar call here)
inline float exp_approx(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    const float n = std::rint(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

// sum of term(0) .. term(n - 1) in 16 lanes: a float reduction the compiler may vectorize without reassociating
template <class Term>
inline float sum_of(int n, Term term) {
    float lanes[16] = {};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; ++j) lanes[j] += term(i + j);
    float total = 0.0f;
    for (; i < n; ++i) total += term(i);
    for (int j = 0; j < 16; ++j) total += lanes[j];
    return total;
}

// the largest of term(0) .. term(n - 1) (n >= 0, terms >= 0), in 16 lanes the compiler may vectorize
template <class Term>
inline float largest_of(int n, Term term) {
    float lanes[16] = {};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; ++j) lanes[j] = std::max(lanes[j], term(i + j));
    float top = 0.0f;
    for (; i < n; ++i) top = std::max(top, term(i));
    for (int j = 0; j < 16; ++j) top = std::max(top, lanes[j]);
    return top;
}

enum Activation { GELU_TANH = 0, RELU = 1 };

// GPT-2's gelu_new (its tanh written with exp) or relu, over n values in place
void activate(float* v, int n, int activation) {
    if (activation == RELU) {
        for (int i = 0; i < n; ++i) v[i] = std::max(v[i], 0.0f);
        return;
    }
    for (int i = 0; i < n; ++i) {
        const float u = 0.7978845608028654f * (v[i] + 0.044715f * v[i] * v[i] * v[i]);
        v[i] = 0.5f * v[i] * (2.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f));  // 1 + tanh(u)
    }
}

struct Linear {
    const void* packed;  // bf16: [tiles][pairs][TILE] uint32; int8 (when scale): [tiles][quads][TILE][4] uint8
    const float* scale;  // [out]: each output's int8 scale, or null for bf16 weights
    const float* bias;   // [out] or null
    int in, out;
    int pairs() const { return (in + 1) / 2; }
    int quads() const { return (in + 3) / 4; }
    int tiles() const { return (out + TILE - 1) / TILE; }
};

// int8 weights are packed plus 128 (1..255, unsigned bytes) and the inputs they multiply quantized to -63..63 (each
// row with its own scale): two products of such bytes and their sum fit in 16 bits (2 * 255 * 63 < 32768), as AVX2's
// multiply-add of bytes (vpmaddubsw: unsigned by signed, pairs summed) wants, and the 128s come off after the sum
// (128 times the sum of the row's quantized inputs).
constexpr int WEIGHT_OFFSET = 128, INPUT_LEVELS = 63;

typedef int32_t ints __attribute__((vector_size(64)));  // 16 int32 sums

// The inputs as tile_product reads them: for each block of ROW_BLOCK rows (the last one: those left) and each group
// of inputs (a pair for bf16 weights, a quad for int8 ones), the block's rows side by side (so that one pointer
// reaches them all, and one row is a dense run). put(r, g, words) writes row r's group g.
template <int PER_GROUP, class Word, class Put>
void interleave(int rows, int groups, std::vector<Word>& out, Put put) {
    out.resize(size_t(rows) * groups * PER_GROUP);
    for (int r = 0; r < rows; ++r) {
        const int first = r - r % ROW_BLOCK, width = std::min(ROW_BLOCK, rows - first);  // the row's block
        Word* block = out.data() + size_t(first) * groups * PER_GROUP;
        for (int g = 0; g < groups; ++g) put(r, g, block + (size_t(g) * width + r - first) * PER_GROUP);
    }
}

// A pair of inputs for bf16 weights: with AVX512-BF16 one uint32 (the pair in bf16), else two floats
#ifdef DOT_PAIRS_IN_BF16
using InputWord = uint32_t;
#else
using InputWord = float;
#endif
constexpr int WORDS_A_PAIR = std::is_same_v<InputWord, float> ? 2 : 1;

void interleave_pairs(int rows, int pairs, const float* x, int ldx, std::vector<InputWord>& out) {
    interleave<WORDS_A_PAIR>(rows, pairs, out, [&](int r, int p, InputWord* word) {
        const float a = x[size_t(r) * ldx + 2 * p], b = x[size_t(r) * ldx + 2 * p + 1];
        if constexpr (WORDS_A_PAIR == 1) {
            word[0] = uint32_t(to_bf16(a)) | uint32_t(to_bf16(b)) << 16;
        } else {
            word[0] = a;
            word[1] = b;
        }
    });
}

// Rows quantized for int8 weights: each row's inputs times INPUT_LEVELS / (their largest magnitude), rounded to
// bytes, four a word (quad); scale: what a quantized input is worth; offset: what the weights' +128 adds to a sum.
struct QuantizedRows {
    std::vector<int8_t> bytes;
    std::vector<int32_t> quads;
    std::vector<float> scale;
    std::vector<int32_t> offset;
};

// x[0..n) rounded to -levels..levels, its largest magnitude to `levels` (to even, as torch.round; native.py's
// quantized): returns what a level is worth
inline float quantize(const float* x, int n, float levels, int8_t* out) {
    const float top = largest_of(n, [&](int i) { return std::fabs(x[i]); });
    const float times = top > 0.0f ? (1.0f / top) * levels : 0.0f;  // as native.py's quantized
    for (int i = 0; i < n; ++i) out[i] = int8_t(std::clamp(std::rint(x[i] * times), -levels, levels));
    return top / levels;
}

void quantize_rows(int rows, int in, int quads, const float* x, int ldx, QuantizedRows& q) {
    q.bytes.assign(size_t(rows) * 4 * quads, 0);  // past `in`: zeros
    q.scale.resize(rows);
    q.offset.resize(rows);
    for (int r = 0; r < rows; ++r) {
        int8_t* bytes = q.bytes.data() + size_t(r) * 4 * quads;
        q.scale[r] = quantize(x + size_t(r) * ldx, in, INPUT_LEVELS, bytes);
        int sum = 0;
        for (int i = 0; i < in; ++i) sum += bytes[i];
        q.offset[r] = WEIGHT_OFFSET * sum;
    }
    interleave<1>(rows, quads, q.quads, [&](int r, int g, int32_t* word) {
        std::memcpy(word, q.bytes.data() + (size_t(r) * quads + g) * 4, 4);
    });
}

// add_group(g, c) for every input group g (a pair, a quad), into CHAINS independent sums c (few rows do not wait on
// each add)
template <int CHAINS, class AddGroup>
inline void over_groups(int groups, AddGroup add_group) {
    int g = 0;
    for (; g + CHAINS <= groups; g += CHAINS)
        for (int c = 0; c < CHAINS; ++c) add_group(g + c, c);
    for (; g < groups; ++g) add_group(g, 0);
}

template <int R, int T>
constexpr int chains() { return R * T >= 3 ? 1 : 4 / (R * T); }

// acc[u][r] = the chains of row r's tile u added up
template <int R, int T, int CHAINS, class Sum, class Acc>
void store_sums(Sum (&sums)[CHAINS][T][R], Acc acc[][ROW_BLOCK][TILE]) {
    for (int u = 0; u < T; ++u)
        for (int r = 0; r < R; ++r) {
            Sum total = sums[0][u][r];  // a copy: the sums' own address taken keeps them in memory
            for (int c = 1; c < CHAINS; ++c) total += sums[c][u][r];
            std::memcpy(acc[u][r], &total, sizeof(acc[u][r]));
        }
}

#ifdef AVX2_FMA
typedef int32_t ints8 __attribute__((vector_size(32)));

// acc[0][r] = row r's 16 sums of one tile, in two registers of 8 (halves). Up to 6 rows both halves in one pass over
// the input groups (12 sums, the weights and a broadcast fit in the 16 registers), more rows a half at a time (up to
// 12 sums): each weight is loaded (and widened) once for all the rows, and a tile is read from memory once.
// half_weights(g, half): input group g's weights of the half's 8 outputs; add(sum, weights, g, r): the sum plus row
// r's products with them.
template <int R, class Sum, class Acc, class HalfWeights, class Add>
void tile_product_in_halves(int groups, Acc acc[][ROW_BLOCK][TILE], HalfWeights half_weights, Add add) {
    constexpr int CHAINS = chains<R, 1>(), HALVES = R <= 6 ? 2 : 1;  // halves a pass
    for (int pass = 0; pass < 2 / HALVES; ++pass) {
        Sum sums[CHAINS][R][HALVES] = {};
        over_groups<CHAINS>(groups, [&](int g, int c) {
            for (int h = 0; h < HALVES; ++h) {
                const auto weights = half_weights(g, pass * HALVES + h);
#pragma GCC unroll 12  // the sums stay in registers only if every row's code is laid out
                for (int r = 0; r < R; ++r) sums[c][r][h] = add(sums[c][r][h], weights, g, r);
            }
        });
        for (int r = 0; r < R; ++r)
            for (int h = 0; h < HALVES; ++h) {
                Sum total = sums[0][r][h];  // a copy, as in store_sums
                for (int c = 1; c < CHAINS; ++c) total += sums[c][r][h];
                std::memcpy(acc[0][r] + 8 * (pass * HALVES + h), &total, sizeof(total));
            }
    }
}
#endif

// acc[u][r] = sum over inputs of x[r] * weight, for the R rows of a block and the 16 outputs of each of the T
// tiles that follow `tile` (each input broadcast once for T tiles); bf16 weights
template <int R, int T>
void tile_product(const uint32_t* tile, int pairs, const InputWord* x, float acc[][ROW_BLOCK][TILE]) {
    [[maybe_unused]] const size_t next = size_t(pairs) * TILE;  // from one tile to the next (T > 1)
    constexpr int CHAINS = chains<R, T>();
#ifdef DOT_PAIRS_IN_BF16
    __m512 sums[CHAINS][T][R] = {};
    over_groups<CHAINS>(pairs, [&](int p, int c) {
        __m512bh w[T];
        for (int u = 0; u < T; ++u) w[u] = (__m512bh)_mm512_loadu_si512(tile + u * next + p * TILE);
        for (int r = 0; r < R; ++r) {
            const __m512bh in = (__m512bh)_mm512_set1_epi32(int(x[p * R + r]));
            for (int u = 0; u < T; ++u) sums[c][u][r] = _mm512_dpbf16_ps(sums[c][u][r], w[u], in);
        }
    });
    store_sums(sums, acc);
#elif defined(AVX2_FMA)
    static_assert(T == 1, "AVX2: one tile a step");
    struct Pairs { __m256 even, odd; };
    const __m256i high = _mm256_set1_epi32(int(0xffff0000u));
    tile_product_in_halves<R, __m256>(pairs, acc, [&](int p, int half) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + p * TILE + 8 * half));
        return Pairs{_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)),  // the lower halves: a shift
                     _mm256_castsi256_ps(_mm256_and_si256(w, high))};  // the upper ones: a mask
    }, [&](__m256 sum, const Pairs& w, int p, int r) {
        const float* in = x + (p * R + r) * 2;
        return _mm256_fmadd_ps(_mm256_broadcast_ss(in + 1), w.odd, _mm256_fmadd_ps(_mm256_broadcast_ss(in), w.even, sum));
    });
#elif defined(__AVX512F__)  // without AVX512-BF16 (Skylake to Ice Lake servers)
    const __m512i high = _mm512_set1_epi32(int(0xffff0000u));
    __m512 sums[CHAINS][T][R] = {};
    over_groups<CHAINS>(pairs, [&](int p, int c) {
        __m512 even[T], odd[T];
        for (int u = 0; u < T; ++u) {
            const __m512i w = _mm512_loadu_si512(tile + u * next + p * TILE);
            even[u] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            odd[u] = _mm512_castsi512_ps(_mm512_and_si512(w, high));
        }
#pragma GCC unroll 12  // the sums stay in registers only if every row's code is laid out
        for (int r = 0; r < R; ++r) {
            const __m512 a = _mm512_set1_ps(x[(p * R + r) * 2]), b = _mm512_set1_ps(x[(p * R + r) * 2 + 1]);
            for (int u = 0; u < T; ++u)
                sums[c][u][r] = _mm512_fmadd_ps(b, odd[u], _mm512_fmadd_ps(a, even[u], sums[c][u][r]));
        }
    });
    store_sums(sums, acc);
#else
    floats sums[CHAINS][T][R] = {};
    over_groups<CHAINS>(pairs, [&](int p, int c) {
        for (int u = 0; u < T; ++u) {
            words w;
            std::memcpy(&w, tile + u * next + p * TILE, sizeof(w));
            const floats even = (floats)(w << 16), odd = (floats)(w & 0xffff0000u);
            for (int r = 0; r < R; ++r)
                sums[c][u][r] += x[(p * R + r) * 2] * even + x[(p * R + r) * 2 + 1] * odd;
        }
    });
    store_sums(sums, acc);
#endif
}

// tile_product for int8 weights (+128) and quantized inputs (x: [quads][R], four bytes a word): integer sums, the
// offset and the scales still to apply
template <int R, int T>
void tile_product(const uint8_t* tile, int quads, const int32_t* x, int32_t acc[][ROW_BLOCK][TILE]) {
    [[maybe_unused]] const size_t next = size_t(quads) * 4 * TILE;
    constexpr int CHAINS = chains<R, T>();
#if defined(__AVX512F__) && defined(__AVX512BW__)
    ints sums[CHAINS][T][R] = {};
    over_groups<CHAINS>(quads, [&](int q, int c) {
        __m512i w[T];
        for (int u = 0; u < T; ++u) w[u] = _mm512_loadu_si512(tile + u * next + q * 4 * TILE);
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) {
            const __m512i in = _mm512_set1_epi32(x[q * R + r]);
            for (int u = 0; u < T; ++u) {
#ifdef __AVX512VNNI__  // four products and their sum in one instruction
                sums[c][u][r] = (ints)_mm512_dpbusd_epi32((__m512i)sums[c][u][r], w[u], in);
#else
                sums[c][u][r] += (ints)_mm512_madd_epi16(_mm512_maddubs_epi16(w[u], in), _mm512_set1_epi16(1));
#endif
            }
        }
    });
    store_sums(sums, acc);
#elif defined(AVX2_FMA)
    static_assert(T == 1, "AVX2: one tile a step");
    [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
    tile_product_in_halves<R, ints8>(quads, acc, [&](int q, int half) {
        return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + (q * TILE + 8 * half) * 4));
    }, [&](ints8 sum, __m256i w, int q, int r) {
        const __m256i in = _mm256_set1_epi32(x[q * R + r]);
#ifdef __AVXVNNI__  // Alder Lake and later Intel cores, Zen 5: the four products and their sum in one instruction
        return (ints8)_mm256_dpbusd_avx_epi32((__m256i)sum, w, in);
#else  // pairs of products in 16 bits, then the pairs of pairs in 32
        return sum + (ints8)_mm256_madd_epi16(_mm256_maddubs_epi16(w, in), ones);
#endif
    });
#else
    ints sums[CHAINS][T][R] = {};
    over_groups<CHAINS>(quads, [&](int q, int c) {
        for (int u = 0; u < T; ++u) {
            const uint8_t* w = tile + u * next + q * 4 * TILE;
            ints column[4];  // the quad's input j, for each output
            for (int j = 0; j < 4; ++j)
                for (int o = 0; o < TILE; ++o) column[j][o] = w[4 * o + j];
            for (int r = 0; r < R; ++r) {
                int8_t in[4];
                std::memcpy(in, &x[q * R + r], 4);
                sums[c][u][r] += column[0] * in[0] + column[1] * in[1] + column[2] * in[2] + column[3] * in[3];
            }
        }
    });
    store_sums(sums, acc);
#endif
}

template <int R, int T, class Weight, class Word, class Acc>
void tile_product_rows(int rows, const Weight* tile, int groups, const Word* x, Acc acc[][ROW_BLOCK][TILE]) {
    if constexpr (R > 1) {
        if (rows < R) return tile_product_rows<R - 1, T>(rows, tile, groups, x, acc);
    }
    tile_product<R, T>(tile, groups, x, acc);
}

struct Workspace {
    std::vector<float> normed, qkv, attended, inner;
    std::vector<InputWord> pairs;  // the inputs of bf16 weights
    QuantizedRows quantized;       // of int8 ones
};

// y[r] = activation(x[r] @ W + bias) (+ y[r] when accumulate: the residual). x: [rows][ldx] fp32 with ldx even and
// x[r][in] = 0 when `in` is odd. Weight: uint32_t (bf16 pairs) or uint8_t (int8).
template <class Weight>
void linear(const Linear& layer, int rows, const float* x, int ldx, Workspace& ws, float* y, int ldy, int activation,
            bool accumulate, int threads) {
    constexpr bool INT8 = std::is_same_v<Weight, uint8_t>;
    using Sum = std::conditional_t<INT8, int32_t, float>;
    const int groups = INT8 ? layer.quads() : layer.pairs(), tiles = layer.tiles();
    const size_t words_a_row = INT8 ? groups : size_t(groups) * WORDS_A_PAIR;
    const auto* input = [&] {
        if constexpr (INT8) {
            quantize_rows(rows, layer.in, groups, x, ldx, ws.quantized);
            return ws.quantized.quads.data();
        } else {
            interleave_pairs(rows, groups, x, ldx, ws.pairs);
            return ws.pairs.data();
        }
    }();
    const QuantizedRows& quantized = ws.quantized;
    const size_t tile_size = size_t(groups) * TILE * (INT8 ? 4 : 1);  // in Weights
    const int steps = (tiles + TILES_PER_STEP - 1) / TILES_PER_STEP;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int step = 0; step < steps; ++step) {
        Sum acc[TILES_PER_STEP][ROW_BLOCK][TILE];
        const int t0 = step * TILES_PER_STEP, count = std::min(TILES_PER_STEP, tiles - t0);
        const Weight* tile = static_cast<const Weight*>(layer.packed) + t0 * tile_size;
        for (int r0 = 0; r0 < rows; r0 += ROW_BLOCK) {
            const int block = std::min(ROW_BLOCK, rows - r0);
            const auto* in = input + r0 * words_a_row;
            if (count == TILES_PER_STEP)
                tile_product_rows<ROW_BLOCK, TILES_PER_STEP>(block, tile, groups, in, acc);
            else
                tile_product_rows<ROW_BLOCK, 1>(block, tile, groups, in, acc);
            for (int u = 0; u < count; ++u) {
                const int first = (t0 + u) * TILE, width = std::min(TILE, layer.out - first);
                for (int r = 0; r < block; ++r) {
                    float result[TILE];
                    for (int j = 0; j < width; ++j) {
                        if constexpr (INT8)
                            result[j] = float(acc[u][r][j] - quantized.offset[r0 + r]) *
                                        (quantized.scale[r0 + r] * layer.scale[first + j]);
                        else
                            result[j] = acc[u][r][j];
                        if (layer.bias) result[j] += layer.bias[first + j];
                    }
                    if (activation >= 0) activate(result, width, activation);
                    float* out = y + size_t(r0 + r) * ldy + first;
                    if (accumulate)
                        for (int j = 0; j < width; ++j) out[j] += result[j];
                    else
                        std::memcpy(out, result, sizeof(float) * width);
                }
            }
        }
    }
}

void linear(const Linear& layer, int rows, const float* x, int ldx, Workspace& ws, float* y, int ldy, int activation,
            bool accumulate, int threads) {
    if (layer.scale)
        linear<uint8_t>(layer, rows, x, ldx, ws, y, ldy, activation, accumulate, threads);
    else
        linear<uint32_t>(layer, rows, x, ldx, ws, y, ldy, activation, accumulate, threads);
}

// out[r] = layer_norm(x[r]) over n features; out's rows are ldo apart (ldo >= n, the padding zeroed)
void layer_norm(int rows, int n, const float* x, const float* weight, const float* bias, float eps, float* out,
                int ldo) {
    for (int r = 0; r < rows; ++r) {
        const float* row = x + size_t(r) * n;
        const float mean = sum_of(n, [&](int i) { return row[i]; }) / n;
        const float var = sum_of(n, [&](int i) { return (row[i] - mean) * (row[i] - mean); });
        const float inv = 1.0f / std::sqrt(var / n + eps);
        float* o = out + size_t(r) * ldo;
        for (int i = 0; i < n; ++i) o[i] = (row[i] - mean) * inv * weight[i] + bias[i];
        for (int i = n; i < ldo; ++i) o[i] = 0.0f;
    }
}


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

typedef int8_t bytes16 __attribute__((vector_size(16)));

inline void load32(const int8_t* p, floats& low, floats& high) {  // 32 int8 values
    bytes16 first, second;
    std::memcpy(&first, p, sizeof(first));
    std::memcpy(&second, p + 16, sizeof(second));
    low = __builtin_convertvector(first, floats);
    high = __builtin_convertvector(second, floats);
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

extern "C" {

int gpt2_decode_pair_dot_in_bf16() {
#ifdef DOT_PAIRS_IN_BF16
    return 1;
#else
    return 0;
#endif
}

// weight [in][out] (element (i, o) at weight[i * in_stride + o * out_stride]) as the int8 linear layers read it:
// each output's inputs rounded by quantize (its largest magnitude to 127), packed [tiles][quads][TILE][4] as unsigned
// bytes (level + WEIGHT_OFFSET; zero levels past the edges); scales [out]: what a level of each output is worth. One
// read of the weight: rounding it in PyTorch took half a second of every start for the seed model.
void gpt2_pack_int8(int in, int out, const float* weight, int64_t in_stride, int64_t out_stride, uint8_t* packed,
                    float* scales, int threads) {
    const int quads = (in + 3) / 4, tiles = (out + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; ++t) {
        const int outputs = std::min(TILE, out - TILE * t);
        std::vector<float> columns(size_t(TILE) * in);             // [TILE][in]: the tile's outputs, each contiguous
        std::vector<int8_t> levels(size_t(TILE) * 4 * quads, 0);  // [TILE][4 * quads]
        auto element = [&](int i, int o) -> float& { return columns[size_t(o) * in + i]; };
        const float* tile_weight = weight + int64_t(TILE * t) * out_stride;
        if (in_stride < out_stride) {  // read along the memory: a transposed view (the tied output layer) by outputs
            for (int o = 0; o < outputs; ++o)
                for (int i = 0; i < in; ++i) element(i, o) = tile_weight[i * in_stride + o * out_stride];
        } else {
            for (int i = 0; i < in; ++i)
                for (int o = 0; o < outputs; ++o) element(i, o) = tile_weight[i * in_stride + o * out_stride];
        }
        for (int o = 0; o < outputs; ++o)
            scales[TILE * t + o] = quantize(columns.data() + size_t(o) * in, in, 127.0f,
                                            levels.data() + size_t(o) * 4 * quads);
        uint8_t* tile = packed + size_t(t) * quads * TILE * 4;
        for (int q = 0; q < quads; ++q)
            for (int o = 0; o < TILE; ++o)
                for (int k = 0; k < 4; ++k)
                    tile[(q * TILE + o) * 4 + k] = uint8_t(levels[size_t(o) * 4 * quads + 4 * q + k] + WEIGHT_OFFSET);
    }
}

// hidden [rows][C]: each row's token and position embedding, on return the last block's output (fp32).
// params, per layer: ln_1 weight, bias, c_attn packed, scales, bias, attn c_proj packed, scales, bias, ln_2 weight,
// bias, c_fc packed, scales, bias, mlp c_proj packed, scales, bias; then ln_f weight, bias, the output layer packed,
// its scales, its bias. Scales null: bf16 weights; bias null: none.
// caches, per layer: keys, values [rows][heads][capacity][C / heads] and their scales [rows][heads][capacity]: int8
// levels with a scale each, or bf16 and the scales null; `cached` positions filled.
// logits: [rows][vocab].
void gpt2_decode_step(int rows, int layers, int C, int heads, int inner, int vocab, int cached, int capacity,
                      int threads, int activation, float eps, const float* scales, const void* const* params,
                      void* const* caches, float* hidden, float* logits) {
    thread_local Workspace ws;
    const int ldc = C + C % 2, ldi = inner + inner % 2;
    ws.normed.resize(size_t(rows) * std::max(ldc, ldi));
    ws.qkv.resize(size_t(rows) * 3 * C);
    ws.attended.resize(size_t(rows) * ldc);
    ws.inner.resize(size_t(rows) * ldi);
    for (int r = 0; r < rows; ++r) {  // the padding of an odd width multiplies the zero weights packed past it
        if (ldc != C) ws.attended[size_t(r) * ldc + C] = 0.0f;
        if (ldi != inner) ws.inner[size_t(r) * ldi + inner] = 0.0f;
    }
    auto f = [&](int i) { return static_cast<const float*>(params[i]); };
    auto w = [&](int i, int in, int out) { return Linear{params[i], f(i + 1), f(i + 2), in, out}; };
    for (int l = 0; l < layers; ++l) {
        const int p = 16 * l;
        layer_norm(rows, C, hidden, f(p), f(p + 1), eps, ws.normed.data(), ldc);
        linear(w(p + 2, C, 3 * C), rows, ws.normed.data(), ldc, ws, ws.qkv.data(), 3 * C, -1, false, threads);
        void* const* cache = caches + 4 * l;
        if (cache[2])
            attention(rows, heads, cached + 1, ws.qkv.data(), layer_cache<int8_t>(cache, capacity, C / heads),
                      scales[l], ws.attended.data(), ldc, threads);
        else
            attention(rows, heads, cached + 1, ws.qkv.data(), layer_cache<uint16_t>(cache, capacity, C / heads),
                      scales[l], ws.attended.data(), ldc, threads);
        linear(w(p + 5, C, C), rows, ws.attended.data(), ldc, ws, hidden, C, -1, true, threads);
        layer_norm(rows, C, hidden, f(p + 8), f(p + 9), eps, ws.normed.data(), ldc);
        linear(w(p + 10, C, inner), rows, ws.normed.data(), ldc, ws, ws.inner.data(), ldi, activation, false, threads);
        linear(w(p + 13, inner, C), rows, ws.inner.data(), ldi, ws, hidden, C, -1, true, threads);
    }
    const int p = 16 * layers;
    layer_norm(rows, C, hidden, f(p), f(p + 1), eps, ws.normed.data(), ldc);
    linear(w(p + 2, C, vocab), rows, ws.normed.data(), ldc, ws, logits, vocab, -1, false, threads);
}

}  // extern "C"
