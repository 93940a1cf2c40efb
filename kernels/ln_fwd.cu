// LayerNorm forward and fused residual-add + LayerNorm forward.
//
// One warp (short rows) or one block (long rows) per row; the row lives in registers between the loads
// and the stores, so x (and residual) are read once and y (and s) written once: 2 (4 with the add) x
// rows x cols x sizeof(T) bytes plus 8 bytes of statistics per row. Statistics are fp32, two-pass over
// the registers (mean, then the mean of squared deviations), so no cancellation as in E[x^2] - E[x]^2.
#include "ln_common.cuh"

namespace fcn {
namespace {

template <typename T>
struct FwdArgs {
  const T* x;         // [rows, cols]
  const T* residual;  // [rows, cols] or null
  const float* w;     // [cols]
  const float* b;     // [cols]
  T* y;               // [rows, cols]
  T* s;               // [rows, cols] or null: x + residual
  float* mean;        // [rows] or null
  float* rstd;        // [rows] or null
  int64_t rows;
  int cols;
  float eps;
};

template <typename T, int VEC, int WN, int LDGS, bool ADD>
__global__ void __launch_bounds__(kWarp * WN * rows_per_block(WN)) ln_fwd_kernel(FwdArgs<T> a) {
  constexpr int WM = rows_per_block(WN);
  constexpr int TPR = kWarp * WN;  // threads per row
  __shared__ float2 smem[WM][WN];
  const Lane<WN> t;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * WM + t.warp_m;
  const bool row_ok = row < a.rows;  // no early return: the row's warps meet at barriers when WN > 1
  const int nvec = a.cols / VEC;
  const int64_t row_vec = row * nvec;  // index of the row's first vector

  float v[LDGS][VEC];  // the row's values owned by this thread, fp32
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < LDGS; ++k) {
    const int j = t.tn + k * TPR;
    if (row_ok && j < nvec) {
      load_floats<T, VEC>(a.x, row_vec + j, v[k]);
      if constexpr (ADD) {
        float r[VEC];
        load_floats<T, VEC>(a.residual, row_vec + j, r);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[k][e] = to_float(from_float<T>(v[k][e] + r[e]));  // the stored s
        store_floats<T, VEC>(a.s, row_vec + j, v[k]);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += v[k][e];
    }
  }
  const float mean = row_sum2<WN, WM>(sum, 0.f, smem, t.warp_m, t.warp_n, t.lane).x / a.cols;

  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < LDGS; ++k) {
    const int j = t.tn + k * TPR;
    if (row_ok && j < nvec) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float d = v[k][e] - mean;
        sq += d * d;
      }
    }
  }
  const float var = row_sum2<WN, WM>(sq, 0.f, smem, t.warp_m, t.warp_n, t.lane).x / a.cols;
  const float rstd = rsqrtf(var + a.eps);

#pragma unroll
  for (int k = 0; k < LDGS; ++k) {
    const int j = t.tn + k * TPR;
    if (row_ok && j < nvec) {
      float w[VEC], b[VEC], out[VEC];
      load_params<VEC>(a.w, j * VEC, w);
      load_params<VEC>(a.b, j * VEC, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] = (v[k][e] - mean) * rstd * w[e] + b[e];
      store_floats<T, VEC>(a.y, row_vec + j, out);
    }
  }
  if (row_ok && t.tn == 0) {
    if (a.mean) a.mean[row] = mean;
    if (a.rstd) a.rstd[row] = rstd;
  }
}

template <typename T>
int run_fwd(const Plan& plan, const FwdArgs<T>& a, cudaStream_t stream) {
  const int64_t blocks = ceil_div(a.rows, plan.rows_per_block);
  if (blocks > 0x7fffffff) return fail(FC_ERR_ARGUMENT, "too many rows for one launch: " + std::to_string(a.rows));
  const bool add = a.residual != nullptr;
  return with_plan<T>(plan, [&](auto vec, auto wn, auto ldgs) {
    constexpr int V = decltype(vec)::value, WN = decltype(wn)::value, L = decltype(ldgs)::value;
    const dim3 grid(static_cast<unsigned>(blocks)), block(plan.threads);
    if (add)
      ln_fwd_kernel<T, V, WN, L, true><<<grid, block, 0, stream>>>(a);
    else
      ln_fwd_kernel<T, V, WN, L, false><<<grid, block, 0, stream>>>(a);
    return check_cuda(cudaGetLastError(), "layer_norm forward launch");
  });
}

}  // namespace
}  // namespace fcn

extern "C" FC_API int fc_layer_norm_fwd(int dtype, int64_t rows, int cols, const void* x, const void* residual,
                                        const float* weight, const float* bias, float eps, void* y, void* s,
                                        float* mean, float* rstd, void* stream) {
  using namespace fcn;
  if (int st = check_shape(dtype, rows, cols)) return st;
  if (!(eps >= 0.f)) return fail(FC_ERR_ARGUMENT, "layer_norm forward: eps must be >= 0");
  if (rows == 0) return FC_OK;  // nothing to do (empty tensors may have null data pointers)
  if (!x || !weight || !bias || !y) return fail(FC_ERR_ARGUMENT, "layer_norm forward: x, weight, bias and y must be set");
  if ((residual == nullptr) != (s == nullptr))
    return fail(FC_ERR_ARGUMENT, "add_layer_norm forward: residual and s must be both set or both NULL");
  const bool aligned = aligned16(x) && aligned16(residual) && aligned16(weight) && aligned16(bias) &&
                       aligned16(y) && aligned16(s);
  const Plan plan = choose_plan(cols, elem_bytes(dtype), aligned);
  const auto st = static_cast<cudaStream_t>(stream);
  if (dtype == FC_FLOAT32) {
    const FwdArgs<float> a{static_cast<const float*>(x), static_cast<const float*>(residual), weight, bias,
                           static_cast<float*>(y), static_cast<float*>(s), mean, rstd, rows, cols, eps};
    return run_fwd(plan, a, st);
  }
  const FwdArgs<__nv_bfloat16> a{static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(residual),
                                 weight, bias, static_cast<__nv_bfloat16*>(y), static_cast<__nv_bfloat16*>(s),
                                 mean, rstd, rows, cols, eps};
  return run_fwd(plan, a, st);
}
