// What the two halves of the C++ sampling step share: decode_step.cpp (the linear layers, the packing of their
// weights, the step itself) and decode_attention.cpp (each row's query over its cached keys and values): two
// translation units, compiled side by side on two cores (native_build.py), so that a first run on a machine waits
// less for the compiler.
#pragma once

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

namespace decode {

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

// x[0..n) rounded to -levels..levels, its largest magnitude to `levels` (to even, as torch.round; native.py's
// quantized): returns what a level is worth
inline float quantize(const float* x, int n, float levels, int8_t* out) {
    const float top = largest_of(n, [&](int i) { return std::fabs(x[i]); });
    const float times = top > 0.0f ? (1.0f / top) * levels : 0.0f;  // as native.py's quantized
    for (int i = 0; i < n; ++i) out[i] = int8_t(std::clamp(std::rint(x[i] * times), -levels, levels));
    return top / levels;
}

// Each row's newest query over its `length` cached keys in one layer (the newest key and value, in qkv, written there
// first): attended [rows][lda]. cache: keys, values and their scales ([rows][heads][capacity][dim] and
// [rows][heads][capacity]): int8 levels with a scale each, or bf16 and the scales null.
void attend_layer(int rows, int heads, int length, const float* qkv, void* const* cache, int capacity, int dim,
                  float scale, float* attended, int lda, int threads);

}  // namespace decode
