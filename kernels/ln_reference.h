// CPU reference of LayerNorm / add + LayerNorm in double precision, and host bf16 conversions.
// The specification the CUDA kernels are validated against (and the CPU test checks by hand values and
// finite differences). Plain C++, row-major [rows, cols] arrays.
#ifndef FASTCRAM_LN_REFERENCE_H
#define FASTCRAM_LN_REFERENCE_H

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fcn {

// bf16 is the top half of an fp32; rounding is to nearest, ties to even (as __float2bfloat16_rn).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) return static_cast<uint16_t>((u >> 16) | 0x40);
  const uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float round_to_bf16(float f) { return bf16_bits_to_float(float_to_bf16_bits(f)); }

struct RefForward {
  std::vector<double> s;     // x + residual (empty without a residual)
  std::vector<double> y;     // [rows, cols]
  std::vector<double> mean;  // [rows]
  std::vector<double> rstd;  // [rows]
};

// Forward of LN(x) or, when residual is non-empty, of s = x + residual then LN(s). `round_s` rounds s to
// the storage type before the norm is taken (the kernels store s in the activation dtype and normalise
// that stored value); it is identity for fp32 data given in double.
template <typename RoundS>
RefForward ref_forward(const std::vector<double>& x, const std::vector<double>& residual,
                       const std::vector<double>& w, const std::vector<double>& b, double eps, int64_t rows,
                       int cols, RoundS round_s) {
  RefForward out;
  const bool add = !residual.empty();
  std::vector<double> in(x);  // [rows, cols], the tensor that is normalised
  if (add) {
    for (size_t i = 0; i < in.size(); ++i) in[i] = round_s(x[i] + residual[i]);
    out.s = in;
  }
  out.y.resize(in.size());
  out.mean.resize(rows);
  out.rstd.resize(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const double* v = &in[r * cols];
    double mean = 0;
    for (int c = 0; c < cols; ++c) mean += v[c];
    mean /= cols;
    double var = 0;
    for (int c = 0; c < cols; ++c) var += (v[c] - mean) * (v[c] - mean);
    var /= cols;
    const double rstd = 1.0 / std::sqrt(var + eps);
    for (int c = 0; c < cols; ++c) out.y[r * cols + c] = (v[c] - mean) * rstd * w[c] + b[c];
    out.mean[r] = mean;
    out.rstd[r] = rstd;
  }
  return out;
}

inline RefForward ref_forward(const std::vector<double>& x, const std::vector<double>& residual,
                              const std::vector<double>& w, const std::vector<double>& b, double eps,
                              int64_t rows, int cols) {
  return ref_forward(x, residual, w, b, eps, rows, cols, [](double v) { return v; });
}

struct RefBackward {
  std::vector<double> dx;  // [rows, cols]; also the residual's gradient for add + LayerNorm
  std::vector<double> dw;  // [cols]
  std::vector<double> db;  // [cols]
};

// Backward from the saved statistics: x is the normalised input (s for add + LayerNorm), ds may be empty.
inline RefBackward ref_backward(const std::vector<double>& dy, const std::vector<double>& ds,
                                const std::vector<double>& x, const std::vector<double>& w,
                                const std::vector<double>& mean, const std::vector<double>& rstd, int64_t rows,
                                int cols) {
  RefBackward out;
  out.dx.resize(x.size());
  out.dw.assign(cols, 0.0);
  out.db.assign(cols, 0.0);
  std::vector<double> xhat(cols), g(cols);
  for (int64_t r = 0; r < rows; ++r) {
    double mg = 0, mgx = 0;
    for (int c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      xhat[c] = (x[i] - mean[r]) * rstd[r];
      g[c] = dy[i] * w[c];
      mg += g[c];
      mgx += g[c] * xhat[c];
      out.dw[c] += dy[i] * xhat[c];
      out.db[c] += dy[i];
    }
    mg /= cols;
    mgx /= cols;
    for (int c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      out.dx[i] = rstd[r] * (g[c] - mg - xhat[c] * mgx) + (ds.empty() ? 0.0 : ds[i]);
    }
  }
  return out;
}

}  // namespace fcn

#endif  // FASTCRAM_LN_REFERENCE_H
