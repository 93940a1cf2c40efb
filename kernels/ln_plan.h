// Launch planning for the LayerNorm kernels: plain C++ (no CUDA), so the CPU test checks it.
//
// A row is held in registers: each thread of a row owns `ldgs` vectors of `vec` elements, the vectors of
// a row being strided by the row's thread count. One warp per row for small rows (4 rows per 128-thread
// block), several warps per row (one row per block) for long ones. Vectors are 16 bytes when every
// activation pointer is 16-byte aligned and cols is a multiple of the vector width; otherwise a scalar
// plan (vec 1) is used so that any cols in [1, kMaxCols] works.
#ifndef FASTCRAM_LN_PLAN_H
#define FASTCRAM_LN_PLAN_H

#include <cstdint>

// The constexpr helpers below are also used inside kernels (template arguments, launch bounds).
#ifdef __CUDACC__
#define FC_HD __host__ __device__
#else
#define FC_HD
#endif

namespace fcn {

constexpr int kMaxCols = 8192;
constexpr int kWarp = 32;
constexpr int kVecLdgs = 4;     // vectors per thread in the vectorised plans
constexpr int kScalarLdgs = 8;  // elements per thread in the scalar plans

// Warps per row offered by the vectorised and the scalar plans; the kernels are instantiated for these.
constexpr int kVecWarps[] = {1, 2, 4, 8, 16};
constexpr int kScalarWarps[] = {1, 4, 16, 32};

// Rows per block: a 128-thread block when a row needs fewer than 4 warps.
FC_HD constexpr int rows_per_block(int warps_per_row) { return warps_per_row >= 4 ? 1 : 4 / warps_per_row; }

// Elements one row can hold under a plan.
FC_HD constexpr int capacity(int vec, int warps_per_row, int ldgs) { return kWarp * warps_per_row * vec * ldgs; }

struct Plan {
  bool ok = false;
  int vec = 0;            // elements per load (16 bytes, or 1)
  int warps_per_row = 0;  // warps sharing one row
  int ldgs = 0;           // loads per thread per row
  int rows_per_block = 0;
  int threads = 0;        // threads per block
};

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % 16) == 0; }

// The smallest plan that holds a row of `cols` elements of `elem_bytes` bytes each.
inline Plan choose_plan(int cols, int elem_bytes, bool pointers_aligned) {
  Plan p;
  if (cols < 1 || cols > kMaxCols || (elem_bytes != 2 && elem_bytes != 4)) return p;
  const int vmax = 16 / elem_bytes;
  const bool vectorised = pointers_aligned && cols % vmax == 0;
  const int vec = vectorised ? vmax : 1;
  const int ldgs = vectorised ? kVecLdgs : kScalarLdgs;
  const int* warps = vectorised ? kVecWarps : kScalarWarps;
  const int n = vectorised ? sizeof(kVecWarps) / sizeof(int) : sizeof(kScalarWarps) / sizeof(int);
  for (int i = 0; i < n; ++i) {
    const int wn = warps[i];
    if (capacity(vec, wn, ldgs) >= cols) {
      p.ok = true;
      p.vec = vec;
      p.warps_per_row = wn;
      p.ldgs = ldgs;
      p.rows_per_block = rows_per_block(wn);
      p.threads = kWarp * wn * p.rows_per_block;
      return p;
    }
  }
  return p;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of the backward's first stage: enough to fill the device (a persistent grid that strides over
// row groups), never more than there are row groups, at least one (so rows == 0 still writes zeros).
inline int64_t bwd_blocks(int64_t rows, int rows_per_block, int sm_count, int blocks_per_sm) {
  const int64_t groups = ceil_div(rows, rows_per_block);
  const int64_t resident = static_cast<int64_t>(sm_count) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  const int64_t b = groups < resident ? groups : resident;
  return b > 0 ? b : 1;
}

// Workspace floats of the backward: per block, one partial row of dweight and one of dbias.
inline int64_t bwd_workspace_floats(int64_t blocks, int cols) { return blocks * 2 * static_cast<int64_t>(cols); }

}  // namespace fcn

#endif  // FASTCRAM_LN_PLAN_H
