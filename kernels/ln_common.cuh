// Device helpers shared by the LayerNorm forward and backward kernels: vector loads, dtype conversion,
// warp and row reductions, and the error plumbing of the C ABI.
#ifndef FASTCRAM_LN_COMMON_CUH
#define FASTCRAM_LN_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <string>
#include <type_traits>

#include "fastcram_native.h"
#include "ln_plan.h"

namespace fcn {

// N elements loaded or stored as one aligned access (16 bytes for the vectorised plans).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* base, int64_t vec_index) {
  return reinterpret_cast<const Pack<T, N>*>(base)[vec_index];
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* base, int64_t vec_index, const Pack<T, N>& p) {
  reinterpret_cast<Pack<T, N>*>(base)[vec_index] = p;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Load N activations as fp32.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* base, int64_t vec_index, float (&out)[N]) {
  const Pack<T, N> p = load_pack<T, N>(base, vec_index);
#pragma unroll
  for (int e = 0; e < N; ++e) out[e] = to_float(p.v[e]);
}

// Store N fp32 values rounded to T.
template <typename T, int N>
__device__ __forceinline__ void store_floats(T* base, int64_t vec_index, const float (&in)[N]) {
  Pack<T, N> p;
#pragma unroll
  for (int e = 0; e < N; ++e) p.v[e] = from_float<T>(in[e]);
  store_pack<T, N>(base, vec_index, p);
}

// Load N fp32 parameters starting at element `col` (a multiple of N) in 16-byte pieces (N = 8 for bf16
// activations: two pieces, so the parameter pointer needs 16-byte, not 32-byte, alignment).
template <int N>
__device__ __forceinline__ void load_params(const float* base, int col, float (&out)[N]) {
  static_assert(N == 1 || N % 4 == 0, "parameters load as scalars or float4");
  if constexpr (N == 1) {
    out[0] = __ldg(base + col);  // read-only path: every row reads the same parameters
  } else {
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      const float4 p = __ldg(reinterpret_cast<const float4*>(base + col) + k);
      out[4 * k] = p.x;
      out[4 * k + 1] = p.y;
      out[4 * k + 2] = p.z;
      out[4 * k + 3] = p.w;
    }
  }
}

// Store N fp32 values at element `col` (a multiple of N) in 16-byte pieces, like load_params.
template <int N>
__device__ __forceinline__ void store_params(float* base, int col, const float (&in)[N]) {
  constexpr int P = N < 4 ? N : 4;
#pragma unroll
  for (int k = 0; k < N / P; ++k) {
    Pack<float, P> p;
#pragma unroll
    for (int e = 0; e < P; ++e) p.v[e] = in[k * P + e];
    reinterpret_cast<Pack<float, P>*>(base + col)[k] = p;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // the butterfly leaves the same bits in every lane
}

// Sum of (a, b) over the WN warps of a row; every thread of the row gets the same result. `smem` holds
// WM x WN float2; when WN > 1 every thread of the block must call this (it has barriers).
template <int WN, int WM>
__device__ __forceinline__ float2 row_sum2(float a, float b, float2 (*smem)[WN], int warp_m, int warp_n,
                                           int lane) {
  a = warp_sum(a);
  b = warp_sum(b);
  if constexpr (WN == 1) {
    return make_float2(a, b);
  } else {
    if (lane == 0) smem[warp_m][warp_n] = make_float2(a, b);
    __syncthreads();
    float2 t = make_float2(0.f, 0.f);
#pragma unroll
    for (int i = 0; i < WN; ++i) {  // same order in every thread, so the same bits
      t.x += smem[warp_m][i].x;
      t.y += smem[warp_m][i].y;
    }
    __syncthreads();  // smem is reused by the next reduction
    return t;
  }
}

// Where the calling thread sits: which row of the block, and its place among the row's threads.
template <int WN>
struct Lane {
  int lane, warp_m, warp_n, tn;
  __device__ __forceinline__ Lane() {
    lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    warp_m = warp / WN;
    warp_n = warp % WN;
    tn = warp_n * kWarp + lane;
  }
};

// ---- host side: errors of the C ABI ----

std::string& last_error_slot();  // thread-local, defined in native_api.cu

inline int fail(int status, const std::string& msg) {
  last_error_slot() = msg;
  return status;
}

inline int check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return FC_OK;
  return fail(FC_ERR_CUDA, std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

inline int check_shape(int dtype, int64_t rows, int cols) {
  if (dtype != FC_FLOAT32 && dtype != FC_BFLOAT16)
    return fail(FC_ERR_ARGUMENT, "dtype must be FC_FLOAT32 (0) or FC_BFLOAT16 (1), got " + std::to_string(dtype));
  if (rows < 0) return fail(FC_ERR_ARGUMENT, "rows must be >= 0, got " + std::to_string(rows));
  if (cols < 1 || cols > kMaxCols)
    return fail(FC_ERR_ARGUMENT, "cols (the normalised size) must be in [1, " + std::to_string(kMaxCols) +
                                     "], got " + std::to_string(cols));
  return FC_OK;
}

inline int elem_bytes(int dtype) { return dtype == FC_BFLOAT16 ? 2 : 4; }

// ---- host side: plan -> kernel variant ----

template <int V>
using IC = std::integral_constant<int, V>;

// Calls f(IC<vec>, IC<warps_per_row>, IC<ldgs>) with the plan's numbers as compile-time constants: the
// one place that lists which kernel variants exist (kVecWarps / kScalarWarps in ln_plan.h).
template <typename T, typename F>
int with_plan(const Plan& p, F&& f) {
  constexpr int V = 16 / sizeof(T);
  // A 16-warp row is only needed when 8 warps cannot hold kMaxCols (fp32, not bf16).
  constexpr bool need16 = capacity(V, 8, kVecLdgs) < kMaxCols;
  if (p.vec == V && p.ldgs == kVecLdgs) {
    switch (p.warps_per_row) {
      case 1: return f(IC<V>{}, IC<1>{}, IC<kVecLdgs>{});
      case 2: return f(IC<V>{}, IC<2>{}, IC<kVecLdgs>{});
      case 4: return f(IC<V>{}, IC<4>{}, IC<kVecLdgs>{});
      case 8: return f(IC<V>{}, IC<8>{}, IC<kVecLdgs>{});
      case 16:
        if constexpr (need16) return f(IC<V>{}, IC<16>{}, IC<kVecLdgs>{});
        break;
      default: break;
    }
  } else if (p.vec == 1 && p.ldgs == kScalarLdgs) {
    switch (p.warps_per_row) {
      case 1: return f(IC<1>{}, IC<1>{}, IC<kScalarLdgs>{});
      case 4: return f(IC<1>{}, IC<4>{}, IC<kScalarLdgs>{});
      case 16: return f(IC<1>{}, IC<16>{}, IC<kScalarLdgs>{});
      case 32: return f(IC<1>{}, IC<32>{}, IC<kScalarLdgs>{});
      default: break;
    }
  }
  return fail(FC_ERR_ARGUMENT, "internal error: no kernel variant for vec " + std::to_string(p.vec) +
                                   ", warps per row " + std::to_string(p.warps_per_row));
}

}  // namespace fcn

#endif  // FASTCRAM_LN_COMMON_CUH
