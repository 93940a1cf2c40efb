// CPU test (no CUDA needed): the double-precision LayerNorm reference that the CUDA kernels are validated
// against is checked here by hand-computed values and central finite differences; the host bf16 rounding
// by hand-computed bit patterns; the launch planner for every feature size it accepts.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "ln_plan.h"
#include "ln_reference.h"

namespace {

int g_failures = 0;

void check(bool ok, const char* what, double got = 0, double want = 0) {
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s: got %.12g want %.12g\n", what, got, want);
  }
}

void check_near(double got, double want, double tol, const char* what) {
  check(std::fabs(got - want) <= tol, what, got, want);
}

using Vec = std::vector<double>;

Vec random_vec(std::mt19937& rng, size_t n, double scale, double shift) {
  std::normal_distribution<double> normal(0.0, 1.0);
  Vec v(n);
  for (auto& e : v) e = shift + scale * normal(rng);
  return v;
}

// Hand computation: x = [1, 2, 3, 4] has mean 2.5, variance 1.25, rstd 1/sqrt(1.25).
void test_forward_by_hand() {
  const Vec x = {1, 2, 3, 4}, w = {1, 0.5, 2, -1}, b = {0, 1, -1, 0.5};
  const auto f = fcn::ref_forward(x, {}, w, b, 0.0, 1, 4);
  check_near(f.mean[0], 2.5, 1e-15, "mean of 1..4");
  check_near(f.rstd[0], 0.894427190999916, 1e-14, "rstd of 1..4");
  // xhat = [-3, -1, 1, 3] / (2 sqrt(1.25)) = [-1.3416407865, -0.4472135955, 0.4472135955, 1.3416407865]
  const double want[4] = {-1.3416407864998738, 0.7763932022500210, -0.1055728090000841, -0.8416407864998738};
  for (int c = 0; c < 4; ++c) check_near(f.y[c], want[c], 1e-14, "y of 1..4");

  // A constant row has variance 0: rstd is 1/sqrt(eps) and y is the bias.
  const auto k = fcn::ref_forward({3, 3, 3}, {}, {2, 2, 2}, {0.25, -1, 7}, 1e-12, 1, 3);
  check_near(k.rstd[0], 1e6, 1e-6, "rstd of a constant row");
  check_near(k.y[0], 0.25, 0, "y of a constant row");
  check_near(k.y[2], 7, 0, "y of a constant row");

  // add: s = x + residual, normalised; [0.5, 1.5, 2.5, 3.5] + 0.5 is 1..4 again.
  const auto a = fcn::ref_forward({0.5, 1.5, 2.5, 3.5}, {0.5, 0.5, 0.5, 0.5}, w, b, 0.0, 1, 4);
  for (int c = 0; c < 4; ++c) {
    check_near(a.s[c], c + 1.0, 0, "s = x + residual");
    check_near(a.y[c], want[c], 1e-14, "y of add");
  }
}

// Hand computation: x = [1, 2, 3, 4], w = 1, dy = [1, 0, 0, 0]: mean(g) = 1/4, mean(g * xhat) = xhat0 / 4
// = -0.3354101966, so dx = rstd * ([0.75, -0.25, -0.25, -0.25] - xhat * -0.3354101966)
// = rstd * [0.3, -0.4, -0.1, 0.2]; dweight = dy * xhat, dbias = dy.
void test_backward_by_hand() {
  const Vec x = {1, 2, 3, 4}, w = {1, 1, 1, 1}, dy = {1, 0, 0, 0};
  const auto f = fcn::ref_forward(x, {}, w, {0, 0, 0, 0}, 0.0, 1, 4);
  const auto g = fcn::ref_backward(dy, {}, x, w, f.mean, f.rstd, 1, 4);
  const double rstd = 0.894427190999916;
  const double want[4] = {0.3 * rstd, -0.4 * rstd, -0.1 * rstd, 0.2 * rstd};
  for (int c = 0; c < 4; ++c) check_near(g.dx[c], want[c], 1e-14, "dx by hand");
  check_near(g.dw[0], -1.3416407864998738, 1e-14, "dweight by hand");
  check_near(g.dw[1], 0, 0, "dweight by hand (dy = 0)");
  check_near(g.db[0], 1, 0, "dbias by hand");
  check_near(g.db[3], 0, 0, "dbias by hand (dy = 0)");

  const auto a = fcn::ref_backward(dy, {0.5, -1, 2, 0}, x, w, f.mean, f.rstd, 1, 4);
  check_near(a.dx[1], want[1] - 1, 1e-14, "dx plus ds");
}

// loss = sum(y * gy) (+ sum(s * gs) for add); central differences of it against the analytic gradients.
void test_backward_by_finite_differences(bool add) {
  std::mt19937 rng(1234u + add);
  const int64_t rows = 3;
  const int cols = 7;
  const size_t n = rows * cols;
  const double eps = 1e-5;
  Vec x = random_vec(rng, n, 2.0, 3.0), res = add ? random_vec(rng, n, 1.0, -1.0) : Vec();
  Vec w = random_vec(rng, cols, 0.5, 1.0), b = random_vec(rng, cols, 0.5, 0.0);
  const Vec gy = random_vec(rng, n, 1.0, 0.0), gs = add ? random_vec(rng, n, 1.0, 0.0) : Vec();

  auto loss = [&]() {
    const auto f = fcn::ref_forward(x, res, w, b, eps, rows, cols);
    double l = 0;
    for (size_t i = 0; i < n; ++i) l += f.y[i] * gy[i] + (add ? f.s[i] * gs[i] : 0.0);
    return l;
  };
  const auto f = fcn::ref_forward(x, res, w, b, eps, rows, cols);
  const auto g = fcn::ref_backward(gy, gs, add ? f.s : x, w, f.mean, f.rstd, rows, cols);

  auto numeric = [&](double& v) {
    const double h = 1e-6, keep = v;
    v = keep + h;
    const double up = loss();
    v = keep - h;
    const double down = loss();
    v = keep;
    return (up - down) / (2 * h);
  };
  const char* tag = add ? "add_layer_norm" : "layer_norm";
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    worst = std::max(worst, std::fabs(numeric(x[i]) - g.dx[i]));
    if (add) worst = std::max(worst, std::fabs(numeric(res[i]) - g.dx[i]));  // the same gradient
  }
  for (int c = 0; c < cols; ++c) {
    worst = std::max(worst, std::fabs(numeric(w[c]) - g.dw[c]));
    worst = std::max(worst, std::fabs(numeric(b[c]) - g.db[c]));
  }
  std::printf("%s: largest |finite difference - analytic| = %.3g\n", tag, worst);
  check(worst < 1e-6, "gradients vs finite differences", worst, 0);

  // Structure: the norm part of dx sums to zero over a row (a shift of x does not change y).
  double row_sum = 0;
  for (int c = 0; c < cols; ++c) row_sum += g.dx[c] - (add ? gs[c] : 0.0);
  check_near(row_sum, 0, 1e-12, "row sum of the norm part of dx");
}

void test_bf16_rounding() {
  check(fcn::float_to_bf16_bits(1.0f) == 0x3f80, "bf16(1)");
  check(fcn::float_to_bf16_bits(-2.5f) == 0xc020, "bf16(-2.5)");
  check(fcn::float_to_bf16_bits(1.0f + 1.0f / 256) == 0x3f80, "1 + 2^-8 ties to even (down)");
  check(fcn::float_to_bf16_bits(1.0f + 3.0f / 256) == 0x3f82, "1 + 3 * 2^-8 ties to even (up)");
  check(fcn::float_to_bf16_bits(1.0f + 1.5f / 256) == 0x3f81, "1 + 1.5 * 2^-8 rounds up");
  check(fcn::float_to_bf16_bits(INFINITY) == 0x7f80, "bf16(inf)");
  check(std::isnan(fcn::bf16_bits_to_float(fcn::float_to_bf16_bits(NAN))), "bf16(nan) is nan");
  check(fcn::bf16_bits_to_float(0x4049) == 3.140625f, "0x4049 is 3.140625");
  check(fcn::round_to_bf16(3.14159265f) == 3.140625f, "pi in bf16");
}

// Every feature size in [1, kMaxCols] gets a plan whose row capacity covers it, uses one of the kernel
// variants that exist, and wastes at most a factor of 4 (beyond the smallest plan).
void test_plans() {
  int bad = 0;
  for (int elem : {2, 4}) {
    for (bool aligned : {true, false}) {
      for (int cols = 1; cols <= fcn::kMaxCols; ++cols) {
        const fcn::Plan p = fcn::choose_plan(cols, elem, aligned);
        const int cap = fcn::capacity(p.vec, p.warps_per_row, p.ldgs);
        bool ok = p.ok && cap >= cols && cols % p.vec == 0 && p.threads <= 1024 && p.threads % 32 == 0;
        ok = ok && p.threads == 32 * p.warps_per_row * p.rows_per_block;
        ok = ok && (p.vec == 1 ? p.ldgs == fcn::kScalarLdgs : p.vec * elem == 16 && p.ldgs == fcn::kVecLdgs);
        ok = ok && (p.vec == 16 / elem) == (aligned && cols % (16 / elem) == 0);
        bool known = false;
        if (p.vec == 1) {
          for (int wn : fcn::kScalarWarps) known |= wn == p.warps_per_row;
        } else {
          for (int wn : fcn::kVecWarps) known |= wn == p.warps_per_row;
        }
        const int smallest = fcn::capacity(p.vec, 1, p.ldgs);
        ok = ok && known && (cap == smallest || cap < 4 * cols);
        if (!ok && bad++ < 5) std::printf("FAIL plan for cols %d, %d-byte elements, aligned %d\n", cols, elem, aligned);
      }
    }
  }
  check(bad == 0, "every plan holds its row");
  check(!fcn::choose_plan(0, 4, true).ok, "cols 0 is rejected");
  check(!fcn::choose_plan(fcn::kMaxCols + 1, 2, true).ok, "cols above the limit are rejected");
  const fcn::Plan hidden = fcn::choose_plan(768, 2, true);  // the model's size in bf16: one warp per row
  check(hidden.vec == 8 && hidden.warps_per_row == 1 && hidden.rows_per_block == 4, "bf16 768 plan");

  // Backward grid: at most the row groups, at most what is resident, never zero.
  check(fcn::bwd_blocks(0, 4, 132, 3) == 1, "no rows still one block");
  check(fcn::bwd_blocks(10, 4, 132, 3) == 3, "ten rows in blocks of four");
  check(fcn::bwd_blocks(1 << 20, 1, 132, 3) == 396, "persistent grid");
  check(fcn::bwd_workspace_floats(396, 768) == 396 * 2 * 768, "workspace floats");
}

}  // namespace

int main() {
  test_forward_by_hand();
  test_backward_by_hand();
  test_backward_by_finite_differences(false);
  test_backward_by_finite_differences(true);
  test_bf16_rounding();
  test_plans();
  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all CPU reference checks passed\n");
  return 0;
}
