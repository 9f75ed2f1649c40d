// One sampling step of a GPT-2 in one call: every row's newest token through every block, its key and value
// written into the cache (decode_attention.cpp), the next token's logits out. Built by gpt2zh/native_build.py with
// the machine's own instruction set (-march=native) and called through ctypes, so a step costs one call instead of
// ~150 PyTorch operators, and the weights stream from memory in a layout made for it.
//
// Weights are bf16, packed here (pack_bf16, for native.py) as [tiles of 16 outputs][input pairs][16 outputs] of
// uint32, each holding the weights of two consecutive inputs for one output (the lower half the even input): a tile
// is one contiguous run of memory, and AVX512-BF16's dot product of pairs (vdpbf16ps) takes it as it is. Without
// that instruction the weights are widened to fp32 and multiplied in fp32 (AVX-512 and AVX2 in intrinsics, other
// CPUs in portable vector code). Or int8 with a scale per output (half the bytes a step reads; pack_int8), packed as
// [tiles][input quads][16 outputs][4 inputs]: each linear layer's input rows are quantized too (to 7 bits, a scale
// per row), and the products are summed in integers — AVX2's and AVX-512's multiply-adds of bytes do four times the
// work of an fp32 multiply-add in a vector, where ten rows make the step compute-bound. The residual stream, layer
// norms, softmax and the sums of bf16 products are fp32; the cache [rows, heads, capacity, head_dim] is bf16, or
// int8 with a scale for each position of each head (decode_attention.cpp).
#include "decode_step.h"

using namespace decode;

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

// The weights of outputs TILE * t .. (at most TILE) of a weight [in][out] whose element (i, o) is at
// weight[i * in_stride + o * out_stride], fp32 or bf16 (uint16_t), as fp32 [TILE][in]: each output's inputs together.
// Read along the memory: a transposed view (the tied output layer) by outputs, a contiguous weight by inputs.
template <class Source>
void read_tile(int in, int out, const Source* weight, int64_t in_stride, int64_t out_stride, int t,
               std::vector<float>& columns) {
    const int outputs = std::min(TILE, out - TILE * t);
    columns.resize(size_t(TILE) * in);
    auto element = [&](int i, int o) -> float& { return columns[size_t(o) * in + i]; };
    auto value = [&](int i, int o) {
        const Source w = weight[int64_t(TILE * t + o) * out_stride + i * in_stride];
        if constexpr (std::is_same_v<Source, uint16_t>) return bf16_to_float(w);
        else return w;
    };
    if (in_stride < out_stride) {
        for (int o = 0; o < outputs; ++o)
            for (int i = 0; i < in; ++i) element(i, o) = value(i, o);
    } else {
        for (int i = 0; i < in; ++i)
            for (int o = 0; o < outputs; ++o) element(i, o) = value(i, o);
    }
}

// As the int8 linear layers read a weight (read_tile's): each output's inputs rounded by quantize (its largest
// magnitude to 127), packed [tiles][quads][TILE][4] as unsigned bytes (level + WEIGHT_OFFSET; zero levels past the
// edges); scales [out]: what a level of each output is worth.
template <class Source>
void pack_int8(int in, int out, const Source* weight, int64_t in_stride, int64_t out_stride, uint8_t* packed,
               float* scales, int threads) {
    const int quads = (in + 3) / 4, tiles = (out + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; ++t) {
        thread_local std::vector<float> columns;
        read_tile(in, out, weight, in_stride, out_stride, t, columns);
        std::vector<int8_t> levels(size_t(TILE) * 4 * quads, 0);  // [TILE][4 * quads]
        for (int o = 0; o < std::min(TILE, out - TILE * t); ++o)
            scales[TILE * t + o] = quantize(columns.data() + size_t(o) * in, in, 127.0f,
                                            levels.data() + size_t(o) * 4 * quads);
        uint8_t* tile = packed + size_t(t) * quads * TILE * 4;
        for (int q = 0; q < quads; ++q)
            for (int o = 0; o < TILE; ++o)
                for (int k = 0; k < 4; ++k)
                    tile[(q * TILE + o) * 4 + k] = uint8_t(levels[size_t(o) * 4 * quads + 4 * q + k] + WEIGHT_OFFSET);
    }
}

// As the bf16 linear layers read a weight (read_tile's): [tiles][pairs][TILE] uint32, each the weights of inputs 2p
// (the lower half) and 2p + 1 of one output in bf16, rounded as PyTorch's .to(torch.bfloat16); zeros past the edges.
template <class Source>
void pack_bf16(int in, int out, const Source* weight, int64_t in_stride, int64_t out_stride, uint32_t* packed,
               int threads) {
    const int pairs = (in + 1) / 2, tiles = (out + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; ++t) {
        thread_local std::vector<float> columns;
        read_tile(in, out, weight, in_stride, out_stride, t, columns);
        const int outputs = std::min(TILE, out - TILE * t);
        uint32_t* tile = packed + size_t(t) * pairs * TILE;
        for (int p = 0; p < pairs; ++p)
            for (int o = 0; o < TILE; ++o) {
                const float* column = columns.data() + size_t(o) * in;
                const bool inside = o < outputs, odd_inside = inside && 2 * p + 1 < in;
                tile[p * TILE + o] = uint32_t(inside ? to_bf16(column[2 * p]) : 0) |
                                     uint32_t(odd_inside ? to_bf16(column[2 * p + 1]) : 0) << 16;
            }
    }
}

}  // namespace

extern "C" {

// How the step multiplies on this CPU: 3 AVX512-BF16's pair dot products, 2 AVX-512, 1 AVX2 with FMA (each in
// intrinsics), 0 the compiler's portable vectors
int gpt2_decode_arithmetic() {
#ifdef DOT_PAIRS_IN_BF16
    return 3;
#elif defined(__AVX512F__)
    return 2;
#elif defined(AVX2_FMA)
    return 1;
#else
    return 0;
#endif
}

// A weight [in][out] packed for the int8 or the bf16 linear layers (pack_int8, pack_bf16): its element (i, o) at
// weight[i * in_stride + o * out_stride], fp32 or (source_is_bf16) bf16. One read of the weight: rounding and laying
// it out in PyTorch took half a second of every start for the seed model.
void gpt2_pack_int8(int in, int out, const void* weight, int source_is_bf16, int64_t in_stride, int64_t out_stride,
                    uint8_t* packed, float* scales, int threads) {
    if (source_is_bf16)
        pack_int8(in, out, static_cast<const uint16_t*>(weight), in_stride, out_stride, packed, scales, threads);
    else
        pack_int8(in, out, static_cast<const float*>(weight), in_stride, out_stride, packed, scales, threads);
}

void gpt2_pack_bf16(int in, int out, const void* weight, int source_is_bf16, int64_t in_stride, int64_t out_stride,
                    uint32_t* packed, int threads) {
    if (source_is_bf16)
        pack_bf16(in, out, static_cast<const uint16_t*>(weight), in_stride, out_stride, packed, threads);
    else
        pack_bf16(in, out, static_cast<const float*>(weight), in_stride, out_stride, packed, threads);
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
        attend_layer(rows, heads, cached + 1, ws.qkv.data(), caches + 4 * l, capacity, C / heads, scales[l],
                     ws.attended.data(), ldc, threads);
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
