// Validate-and-benchmark driver shared by validate_layer_norm and validate_add_layer_norm.
//
// Validation: fresh random inputs (the seed is printed; --seed repeats a run), every output buffer and
// the workspace filled with NaN bytes before the call, forward (y, s, mean, rstd) and backward
// (dx, dweight, dbias) compared with the double-precision CPU reference of ln_reference.h, fp32 and bf16,
// odd shapes, a misaligned case (the scalar plan) and a case with more rows than resident blocks.
// Benchmark: forward and backward time (CUDA events) and effective GB/s on one large shape.
// Exit codes: 0 pass, 1 a check failed, 77 no CUDA device (ctest reports the test as skipped).
#ifndef FASTCRAM_VALIDATE_COMMON_H
#define FASTCRAM_VALIDATE_COMMON_H

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fastcram_native.h"
#include "ln_reference.h"

namespace fcv {

constexpr int kSkip = 77;

struct Options {
  bool bench = true;
  bool quick = false;  // short benchmark (ctest)
  int64_t bench_rows = 65536;
  int bench_cols = 768;
  uint32_t seed = 0;
};

inline Options parse(int argc, char** argv) {
  Options o;
  o.seed = std::random_device{}();
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--quick") {
      o.quick = true;
    } else if (a == "--no-bench") {
      o.bench = false;
    } else if (a == "--rows" && has_value) {
      o.bench_rows = std::atoll(argv[++i]);
    } else if (a == "--cols" && has_value) {
      o.bench_cols = std::atoi(argv[++i]);
    } else if (a == "--seed" && has_value) {
      o.seed = static_cast<uint32_t>(std::strtoul(argv[++i], nullptr, 10));
    } else {
      std::fprintf(stderr, "usage: %s [--quick] [--no-bench] [--rows N] [--cols C] [--seed S]\n", argv[0]);
      std::exit(2);
    }
  }
  return o;
}

#define FCV_CUDA(expr)                                                                                \
  do {                                                                                                \
    const cudaError_t err_ = (expr);                                                                  \
    if (err_ != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

#define FCV_NATIVE(expr)                                                                                    \
  do {                                                                                                      \
    if (int st_ = (expr)) {                                                                                 \
      std::fprintf(stderr, "%s:%d: %s returned %d: %s\n", __FILE__, __LINE__, #expr, st_, fc_last_error()); \
      std::exit(1);                                                                                         \
    }                                                                                                       \
  } while (0)

// The GPU is present and usable; otherwise prints why (the caller exits kSkip).
inline bool have_gpu() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n < 1) {
    std::printf("SKIP: no CUDA device (%s)\n", err != cudaSuccess ? cudaGetErrorString(err) : "count is 0");
    return false;
  }
  cudaDeviceProp prop{};
  FCV_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  return true;
}

inline int elem_size(int dtype) { return dtype == FC_BFLOAT16 ? 2 : 4; }
inline const char* dtype_name(int dtype) { return dtype == FC_BFLOAT16 ? "bf16" : "fp32"; }

// Values representable in the dtype, so the reference sees exactly what the GPU sees.
inline double representable(double v, int dtype) {
  const float f = static_cast<float>(v);
  return dtype == FC_BFLOAT16 ? fcn::round_to_bf16(f) : f;
}

// Device buffer filled with 0xff bytes (NaN in fp32 and bf16) so unwritten elements fail the checks;
// `offset` bytes in front make the data pointer misaligned on purpose.
struct DeviceBuffer {
  char* base = nullptr;
  size_t offset = 0;
  size_t bytes = 0;
  DeviceBuffer(size_t n, size_t off = 0) : offset(off), bytes(n) {
    FCV_CUDA(cudaMalloc(&base, n + off + 16));
    FCV_CUDA(cudaMemset(base, 0xff, n + off + 16));
  }
  ~DeviceBuffer() { cudaFree(base); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* ptr() const { return base + offset; }
  float* fptr() const { return reinterpret_cast<float*>(ptr()); }
};

// Host doubles -> device dtype (fp32, or bf16 bits).
inline void upload(const std::vector<double>& v, int dtype, const DeviceBuffer& d) {
  if (dtype == FC_BFLOAT16) {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = fcn::float_to_bf16_bits(static_cast<float>(v[i]));
    FCV_CUDA(cudaMemcpy(d.ptr(), h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  } else {
    std::vector<float> h(v.begin(), v.end());
    FCV_CUDA(cudaMemcpy(d.ptr(), h.data(), h.size() * 4, cudaMemcpyHostToDevice));
  }
}

inline std::vector<double> download(const DeviceBuffer& d, size_t n, int dtype) {
  std::vector<double> out(n);
  if (dtype == FC_BFLOAT16) {
    std::vector<uint16_t> h(n);
    FCV_CUDA(cudaMemcpy(h.data(), d.ptr(), n * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = fcn::bf16_bits_to_float(h[i]);
  } else {
    std::vector<float> h(n);
    FCV_CUDA(cudaMemcpy(h.data(), d.ptr(), n * 4, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; ++i) out[i] = h[i];
  }
  return out;
}

// |got - ref| <= atol_scale * max|ref| + rtol * |ref| everywhere (NaN fails); prints the worst element.
inline bool close(const char* what, const std::vector<double>& got, const std::vector<double>& ref, double rtol,
                  double atol_scale) {
  double ref_max = 0;
  for (double r : ref) ref_max = std::max(ref_max, std::fabs(r));
  const double atol = atol_scale * std::max(ref_max, 1e-30);
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double diff = std::fabs(got[i] - ref[i]);
    const double ratio = diff == 0 ? 0.0 : diff / (atol + rtol * std::fabs(ref[i]));  // x / 0 = inf fails
    if (!(ratio <= worst)) {  // NaN lands here and stays the worst
      worst = std::isnan(ratio) ? INFINITY : ratio;
      at = i;
    }
  }
  const bool ok = got.size() == ref.size() && worst <= 1.0;
  if (!ok && !ref.empty())
    std::printf("    FAIL %s: element %zu got %.9g want %.9g (error %.3g of allowed)\n", what, at, got[at], ref[at],
                worst);
  return ok;
}

struct Case {
  int64_t rows;
  int cols;
  int dtype;
  size_t misalign;  // bytes added in front of every activation pointer
  float eps;
};

// One forward + backward on fresh inputs, against the double reference. True when every check passes.
inline bool validate(const Case& c, bool add, std::mt19937& rng) {
  const size_t n = static_cast<size_t>(c.rows) * c.cols;
  const size_t es = elem_size(c.dtype);
  std::normal_distribution<double> normal(0.0, 1.0);
  auto fill = [&](size_t count, double scale, double shift, int dtype) {
    std::vector<double> v(count);
    for (auto& e : v) e = representable(shift + scale * normal(rng), dtype);
    return v;
  };
  const std::vector<double> x = fill(n, 2.0, 3.0, c.dtype);  // a non-zero mean for the norm to remove
  const std::vector<double> r = add ? fill(n, 1.0, -1.0, c.dtype) : std::vector<double>();
  const std::vector<double> w = fill(c.cols, 0.5, 1.0, FC_FLOAT32);
  const std::vector<double> b = fill(c.cols, 0.5, 0.0, FC_FLOAT32);
  const std::vector<double> dy = fill(n, 1.0, 0.0, c.dtype);
  const std::vector<double> ds = add ? fill(n, 1.0, 0.0, c.dtype) : std::vector<double>();

  const int dt = c.dtype;
  const auto ref_f = fcn::ref_forward(x, r, w, b, c.eps, c.rows, c.cols, [dt](double v) {
    return representable(static_cast<float>(v), dt);  // the kernel adds in fp32, then stores in the dtype
  });
  const std::vector<double>& normed = add ? ref_f.s : x;
  const auto ref_b = fcn::ref_backward(dy, ds, normed, w, ref_f.mean, ref_f.rstd, c.rows, c.cols);

  DeviceBuffer dx_in(n * es, c.misalign), dr(n * es, c.misalign), dw_in(c.cols * 4), db_in(c.cols * 4);
  DeviceBuffer dyb(n * es, c.misalign), dsb(n * es, c.misalign);
  DeviceBuffer yb(n * es, c.misalign), sb(n * es, c.misalign), meanb(c.rows * 4), rstdb(c.rows * 4);
  DeviceBuffer dxb(n * es, c.misalign), dwb(c.cols * 4), dbb(c.cols * 4);
  upload(x, dt, dx_in);
  if (add) upload(r, dt, dr);
  upload(w, FC_FLOAT32, dw_in);
  upload(b, FC_FLOAT32, db_in);
  upload(dy, dt, dyb);
  if (add) upload(ds, dt, dsb);

  FCV_NATIVE(fc_layer_norm_fwd(dt, c.rows, c.cols, dx_in.ptr(), add ? dr.ptr() : nullptr, dw_in.fptr(),
                               db_in.fptr(), c.eps, yb.ptr(), add ? sb.ptr() : nullptr, meanb.fptr(),
                               rstdb.fptr(), nullptr));
  const int64_t ws_floats = fc_layer_norm_bwd_workspace_floats(dt, c.rows, c.cols);
  if (ws_floats < 0) {
    std::printf("    FAIL workspace query: %s\n", fc_last_error());
    return false;
  }
  DeviceBuffer wsb(ws_floats * 4);
  FCV_NATIVE(fc_layer_norm_bwd(dt, c.rows, c.cols, dyb.ptr(), add ? dsb.ptr() : nullptr,
                               add ? sb.ptr() : dx_in.ptr(), dw_in.fptr(), meanb.fptr(), rstdb.fptr(), dxb.ptr(),
                               dwb.fptr(), dbb.fptr(), wsb.fptr(), ws_floats, nullptr));
  FCV_CUDA(cudaDeviceSynchronize());

  // bf16 outputs carry one rounding (half an ulp, 2^-9 relative); fp32 ones only accumulation error.
  const double rt = dt == FC_BFLOAT16 ? 1.0 / 256 : 2e-5;
  bool ok = true;
  ok &= close("y", download(yb, n, dt), ref_f.y, rt, 1e-5);
  if (add) ok &= close("s", download(sb, n, dt), ref_f.s, 0.0, 0.0);  // the same rounding as the reference
  ok &= close("mean", download(meanb, c.rows, FC_FLOAT32), ref_f.mean, 1e-5, 1e-6);
  ok &= close("rstd", download(rstdb, c.rows, FC_FLOAT32), ref_f.rstd, 1e-5, 0.0);
  ok &= close("dx", download(dxb, n, dt), ref_b.dx, rt, 1e-5);
  ok &= close("dweight", download(dwb, c.cols, FC_FLOAT32), ref_b.dw, 2e-5, 2e-5);
  ok &= close("dbias", download(dbb, c.cols, FC_FLOAT32), ref_b.db, 2e-5, 2e-5);
  std::printf("  %-4s rows %-6lld cols %-5d misalign %zu eps %g: %s\n", dtype_name(dt), static_cast<long long>(c.rows),
              c.cols, c.misalign, c.eps, ok ? "ok" : "FAILED");
  return ok;
}

// Between them the shapes reach every kernel variant of both dtypes (see kVecWarps / kScalarWarps).
inline std::vector<Case> validation_cases() {
  std::vector<Case> cases;
  for (int dt : {FC_FLOAT32, FC_BFLOAT16}) {
    const int64_t many = dt == FC_FLOAT32 ? 5000 : 20000;  // more row groups than resident blocks
    cases.push_back({0, 768, dt, 0, 1e-5f});               // no rows: dweight and dbias must be zeros
    cases.push_back({7, 1, dt, 0, 1e-5f});
    cases.push_back({5, 3, dt, 0, 1e-12f});
    cases.push_back({33, 768, dt, 0, 1e-12f});
    cases.push_back({64, 771, dt, 0, 1e-5f});
    cases.push_back({9, 768, dt, 2, 1e-5f});  // misaligned pointers: the scalar plan
    cases.push_back({300, 1024, dt, 0, 1e-5f});
    cases.push_back({11, 1536, dt, 0, 1e-5f});
    cases.push_back({5, 2047, dt, 0, 1e-5f});
    cases.push_back({17, 4000, dt, 0, 1e-5f});
    cases.push_back({2, 8191, dt, 0, 1e-5f});
    cases.push_back({3, 8192, dt, 0, 1e-5f});
    cases.push_back({many, 64, dt, 0, 1e-5f});
  }
  return cases;
}

// Mean milliseconds of `iters` calls of f after a warm-up.
template <typename F>
float time_ms(F&& f, int iters) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t start, stop;
  FCV_CUDA(cudaEventCreate(&start));
  FCV_CUDA(cudaEventCreate(&stop));
  FCV_CUDA(cudaEventRecord(start));
  for (int i = 0; i < iters; ++i) f();
  FCV_CUDA(cudaEventRecord(stop));
  FCV_CUDA(cudaEventSynchronize(stop));
  float ms = 0;
  FCV_CUDA(cudaEventElapsedTime(&ms, start, stop));
  FCV_CUDA(cudaEventDestroy(start));
  FCV_CUDA(cudaEventDestroy(stop));
  return ms / iters;
}

// Forward and backward time on one shape; GB/s counts the bytes each pass must move at least.
inline void bench(const char* op, bool add, const Options& o) {
  const int64_t rows = o.quick ? std::min<int64_t>(o.bench_rows, 8192) : o.bench_rows;
  const int cols = o.bench_cols;
  const int iters = o.quick ? 5 : 50;
  for (int dt : {FC_FLOAT32, FC_BFLOAT16}) {
    const size_t n = static_cast<size_t>(rows) * cols, es = elem_size(dt);
    DeviceBuffer x(n * es), r(n * es), y(n * es), s(n * es), dy(n * es), ds(n * es), dx(n * es);
    DeviceBuffer w(cols * 4), b(cols * 4), dw(cols * 4), db(cols * 4), mean(rows * 4), rstd(rows * 4);
    for (const DeviceBuffer* d : {&x, &r, &dy, &ds, &w, &b})  // 0x3f bytes: about 0.75 in fp32 and bf16
      FCV_CUDA(cudaMemset(d->ptr(), 0x3f, d->bytes));
    const int64_t wsf = fc_layer_norm_bwd_workspace_floats(dt, rows, cols);
    if (wsf < 0) {
      std::printf("workspace query failed: %s\n", fc_last_error());
      std::exit(1);
    }
    DeviceBuffer ws(wsf * 4);
    auto fwd = [&] {
      FCV_NATIVE(fc_layer_norm_fwd(dt, rows, cols, x.ptr(), add ? r.ptr() : nullptr, w.fptr(), b.fptr(), 1e-12f,
                                   y.ptr(), add ? s.ptr() : nullptr, mean.fptr(), rstd.fptr(), nullptr));
    };
    auto bwd = [&] {
      FCV_NATIVE(fc_layer_norm_bwd(dt, rows, cols, dy.ptr(), add ? ds.ptr() : nullptr, add ? s.ptr() : x.ptr(),
                                   w.fptr(), mean.fptr(), rstd.fptr(), dx.ptr(), dw.fptr(), db.fptr(), ws.fptr(), wsf,
                                   nullptr));
    };
    const double act = static_cast<double>(n) * es;
    const double fwd_bytes = act * (add ? 4 : 2) + rows * 8.0;
    const double bwd_bytes = act * (add ? 4 : 3) + rows * 8.0;
    const float tf = time_ms(fwd, iters), tb = time_ms(bwd, iters);
    std::printf("bench %s %s %lldx%d: fwd %.4f ms (%.0f GB/s), bwd %.4f ms (%.0f GB/s), workspace %.2f MB\n", op,
                dtype_name(dt), static_cast<long long>(rows), cols, tf, fwd_bytes / tf / 1e6, tb,
                bwd_bytes / tb / 1e6, wsf * 4 / 1e6);
  }
}

inline int run_main(int argc, char** argv, bool add, const char* op) {
  const Options o = parse(argc, argv);
  if (!have_gpu()) return kSkip;
  std::printf("%s: validating (seed %u)\n", op, o.seed);
  std::mt19937 rng(o.seed);
  bool ok = true;
  for (const Case& c : validation_cases()) ok &= validate(c, add, rng);
  if (!ok) {
    std::printf("%s: FAILED (rerun with --seed %u)\n", op, o.seed);
    return 1;
  }
  if (o.bench) bench(op, add, o);
  std::printf("%s: all checks passed\n", op);
  return 0;
}

}  // namespace fcv

#endif  // FASTCRAM_VALIDATE_COMMON_H
