// LayerNorm backward (also the backward of add + LayerNorm, with the gradient arriving at s added to dx).
//
// Stage 1: a persistent grid strides over rows; per row it reads x, dy (and ds) once, recomputes
// xhat = (x - mean) * rstd from the saved fp32 statistics, writes dx, and accumulates dweight and dbias
// for its columns in registers across all the rows it visits. Each block then writes one partial row of
// dweight and one of dbias to the workspace. Stage 2 sums the partial rows column by column. No atomics:
// the result is the same bits run to run. Bytes: 3 (4 with ds) x rows x cols x sizeof(T), plus the
// workspace (2 x blocks x cols x 4, mostly in L2).
#include "ln_common.cuh"

namespace fcn {
namespace {

template <typename T>
struct BwdArgs {
  const T* dy;          // [rows, cols]
  const T* ds;          // [rows, cols] or null
  const T* x;           // [rows, cols]: the normalised input (s for add + LayerNorm)
  const float* w;       // [cols]
  const float* mean;    // [rows]
  const float* rstd;    // [rows]
  T* dx;                // [rows, cols]
  float* partial;       // [blocks, 2, cols]: per-block dweight, dbias
  int64_t rows;
  int cols;
};

// Sums the WM per-warp accumulators of a block into warp 0's (through shared memory) and writes them
// as the block's partial row. Called by every thread of the block.
template <int VEC, int WN, int LDGS>
__device__ __forceinline__ void write_partial(float (&acc)[LDGS][VEC], float* out, int nvec, const Lane<WN>& t) {
  constexpr int WM = rows_per_block(WN);
  constexpr int TPR = kWarp * WN;
  if constexpr (WM > 1) {
    __shared__ float red[WM][LDGS][VEC][TPR];  // lanes on the fastest index: no bank conflicts
    __syncthreads();  // the previous use of red (dweight before dbias) is finished
#pragma unroll
    for (int k = 0; k < LDGS; ++k)
#pragma unroll
      for (int e = 0; e < VEC; ++e) red[t.warp_m][k][e][t.tn] = acc[k][e];
    __syncthreads();
    if (t.warp_m != 0) return;
#pragma unroll
    for (int k = 0; k < LDGS; ++k)
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float s = 0.f;
#pragma unroll
        for (int m = 0; m < WM; ++m) s += red[m][k][e][t.tn];
        acc[k][e] = s;
      }
  }
#pragma unroll
  for (int k = 0; k < LDGS; ++k) {
    const int j = t.tn + k * TPR;
    if (j < nvec) store_params<VEC>(out, j * VEC, acc[k]);
  }
}

template <typename T, int VEC, int WN, int LDGS, bool ADD>
__global__ void __launch_bounds__(kWarp * WN * rows_per_block(WN)) ln_bwd_kernel(BwdArgs<T> a) {
  constexpr int WM = rows_per_block(WN);
  constexpr int TPR = kWarp * WN;
  __shared__ float2 smem[WM][WN];
  const Lane<WN> t;
  const int nvec = a.cols / VEC;
  const int64_t groups = (a.rows + WM - 1) / WM;  // row groups, one per block visit

  float dw[LDGS][VEC], db[LDGS][VEC];  // this thread's columns, summed over the rows it visits
#pragma unroll
  for (int k = 0; k < LDGS; ++k)
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw[k][e] = db[k][e] = 0.f;

  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {  // uniform across the block
    const int64_t row = grp * WM + t.warp_m;
    const bool row_ok = row < a.rows;
    const int64_t row_vec = row * nvec;
    const float mean = row_ok ? a.mean[row] : 0.f;
    const float rstd = row_ok ? a.rstd[row] : 0.f;

    float xh[LDGS][VEC], g[LDGS][VEC];  // xhat and dy * w for this thread's part of the row
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int k = 0; k < LDGS; ++k) {
      const int j = t.tn + k * TPR;
      if (row_ok && j < nvec) {
        float xv[VEC], dyv[VEC], wv[VEC];
        load_floats<T, VEC>(a.x, row_vec + j, xv);
        load_floats<T, VEC>(a.dy, row_vec + j, dyv);
        load_params<VEC>(a.w, j * VEC, wv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          xh[k][e] = (xv[e] - mean) * rstd;
          g[k][e] = dyv[e] * wv[e];
          dw[k][e] += dyv[e] * xh[k][e];
          db[k][e] += dyv[e];
          sg += g[k][e];
          sgx += g[k][e] * xh[k][e];
        }
      }
    }
    const float2 tot = row_sum2<WN, WM>(sg, sgx, smem, t.warp_m, t.warp_n, t.lane);
    const float mg = tot.x / a.cols, mgx = tot.y / a.cols;  // mean(g), mean(g * xhat)

#pragma unroll
    for (int k = 0; k < LDGS; ++k) {
      const int j = t.tn + k * TPR;
      if (row_ok && j < nvec) {
        float out[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) out[e] = rstd * (g[k][e] - mg - xh[k][e] * mgx);
        if constexpr (ADD) {
          float dsv[VEC];
          load_floats<T, VEC>(a.ds, row_vec + j, dsv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) out[e] += dsv[e];
        }
        store_floats<T, VEC>(a.dx, row_vec + j, out);
      }
    }
  }

  float* part = a.partial + static_cast<int64_t>(blockIdx.x) * 2 * a.cols;  // [2, cols] of this block
  write_partial<VEC, WN, LDGS>(dw, part, nvec, t);
  write_partial<VEC, WN, LDGS>(db, part + a.cols, nvec, t);
}

constexpr int kRedRows = 16;  // threads summing one column in stage 2

// Stage 2: dweight[c] = sum over blocks of partial[block, 0, c]; dbias likewise from partial[block, 1, c].
// blockIdx.y picks dweight (0) or dbias (1); a block covers 32 columns, its 16 thread rows stride over
// the partial rows, then sum their 16 values in a fixed order.
__global__ void __launch_bounds__(kWarp * kRedRows)
ln_bwd_reduce_kernel(const float* partial, int64_t parts, int cols, float* dweight, float* dbias) {
  __shared__ float red[kRedRows][kWarp + 1];
  const int col = blockIdx.x * kWarp + threadIdx.x;
  const int which = blockIdx.y;
  float acc = 0.f;
  if (col < cols)
    for (int64_t p = threadIdx.y; p < parts; p += kRedRows) acc += partial[(p * 2 + which) * cols + col];
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kRedRows; ++i) s += red[i][threadIdx.x];
  (which == 0 ? dweight : dbias)[col] = s;
}

// Blocks of stage 1 for a plan on the current device (occupancy of the variant without ds; the same
// count is used with ds so the workspace size does not depend on it).
template <typename T>
int stage1_blocks(const Plan& plan, int64_t rows, int64_t* blocks) {
  int dev = 0, sms = 0;
  if (int st = check_cuda(cudaGetDevice(&dev), "cudaGetDevice")) return st;
  if (int st = check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "SM count")) return st;
  return with_plan<T>(plan, [&](auto vec, auto wn, auto ldgs) {
    constexpr int V = decltype(vec)::value, WN = decltype(wn)::value, L = decltype(ldgs)::value;
    int per_sm = 0;
    const int st = check_cuda(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ln_bwd_kernel<T, V, WN, L, false>, plan.threads, 0),
        "occupancy query");
    *blocks = bwd_blocks(rows, plan.rows_per_block, sms, per_sm);
    return st;
  });
}

template <typename T>
int needed_workspace(int64_t rows, int cols, int64_t* floats) {
  // The plan used at run time depends on pointer alignment, so ask for the larger of the two.
  int64_t most = 0;
  for (bool aligned : {true, false}) {
    const Plan plan = choose_plan(cols, sizeof(T), aligned);
    int64_t blocks = 0;
    if (int st = stage1_blocks<T>(plan, rows, &blocks)) return st;
    most = blocks > most ? blocks : most;
  }
  *floats = bwd_workspace_floats(most, cols);
  return FC_OK;
}

template <typename T>
int run_bwd(const Plan& plan, const BwdArgs<T>& a, float* dweight, float* dbias, int64_t workspace_floats,
            cudaStream_t stream) {
  int64_t blocks = 0;
  if (int st = stage1_blocks<T>(plan, a.rows, &blocks)) return st;
  const int64_t fit = workspace_floats / (2 * static_cast<int64_t>(a.cols));
  blocks = blocks < fit ? blocks : fit;  // fewer blocks is still correct: the grid strides over rows
  if (blocks < 1)
    return fail(FC_ERR_WORKSPACE, "layer_norm backward: workspace of " + std::to_string(workspace_floats) +
                                      " floats is too small (need at least 2 * cols = " + std::to_string(2 * a.cols) +
                                      "; ask fc_layer_norm_bwd_workspace_floats)");
  const bool add = a.ds != nullptr;
  const int st = with_plan<T>(plan, [&](auto vec, auto wn, auto ldgs) {
    constexpr int V = decltype(vec)::value, WN = decltype(wn)::value, L = decltype(ldgs)::value;
    const dim3 grid(static_cast<unsigned>(blocks)), block(plan.threads);
    if (add)
      ln_bwd_kernel<T, V, WN, L, true><<<grid, block, 0, stream>>>(a);
    else
      ln_bwd_kernel<T, V, WN, L, false><<<grid, block, 0, stream>>>(a);
    return check_cuda(cudaGetLastError(), "layer_norm backward launch");
  });
  if (st) return st;
  const dim3 rgrid(static_cast<unsigned>(ceil_div(a.cols, kWarp)), 2), rblock(kWarp, kRedRows);
  ln_bwd_reduce_kernel<<<rgrid, rblock, 0, stream>>>(a.partial, blocks, a.cols, dweight, dbias);
  return check_cuda(cudaGetLastError(), "layer_norm backward reduce launch");
}

}  // namespace
}  // namespace fcn

extern "C" FC_API int64_t fc_layer_norm_bwd_workspace_floats(int dtype, int64_t rows, int cols) {
  using namespace fcn;
  if (check_shape(dtype, rows, cols)) return -1;
  int64_t floats = 0;
  const int st = dtype == FC_FLOAT32 ? needed_workspace<float>(rows, cols, &floats)
                                     : needed_workspace<__nv_bfloat16>(rows, cols, &floats);
  return st ? -1 : floats;
}

extern "C" FC_API int fc_layer_norm_bwd(int dtype, int64_t rows, int cols, const void* dy, const void* ds,
                                        const void* x, const float* weight, const float* mean, const float* rstd,
                                        void* dx, float* dweight, float* dbias, float* workspace,
                                        int64_t workspace_floats, void* stream) {
  using namespace fcn;
  if (int st = check_shape(dtype, rows, cols)) return st;
  if (!dweight || !dbias || !workspace || !weight)
    return fail(FC_ERR_ARGUMENT, "layer_norm backward: weight, dweight, dbias and workspace must be set");
  if (rows > 0 && (!dy || !x || !mean || !rstd || !dx))
    return fail(FC_ERR_ARGUMENT, "layer_norm backward: dy, x, mean, rstd and dx must be set");
  const bool aligned = aligned16(dy) && aligned16(ds) && aligned16(x) && aligned16(weight) && aligned16(dx) &&
                       aligned16(workspace);
  const Plan plan = choose_plan(cols, elem_bytes(dtype), aligned);
  const auto st = static_cast<cudaStream_t>(stream);
  if (dtype == FC_FLOAT32) {
    const BwdArgs<float> a{static_cast<const float*>(dy), static_cast<const float*>(ds), static_cast<const float*>(x),
                           weight, mean, rstd, static_cast<float*>(dx), workspace, rows, cols};
    return run_bwd(plan, a, dweight, dbias, workspace_floats, st);
  }
  const BwdArgs<__nv_bfloat16> a{static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(ds),
                                 static_cast<const __nv_bfloat16*>(x), weight, mean, rstd,
                                 static_cast<__nv_bfloat16*>(dx), workspace, rows, cols};
  return run_bwd(plan, a, dweight, dbias, workspace_floats, st);
}
