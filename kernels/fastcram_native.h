// C ABI of libfastcram_native: LayerNorm and fused residual-add + LayerNorm over the last dimension.
//
// Semantics match fastcram/ops/layer_norm.py:
//   forward:  s = x + residual (only when residual != NULL; s is rounded to the activation dtype and the
//             norm is taken of that rounded s), y = (s - mean) * rstd * weight + bias,
//             mean and rstd = 1 / sqrt(biased variance + eps) saved per row in fp32.
//   backward: xhat = (x - mean) * rstd, g = dy * weight,
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ ds, the gradient arriving at s),
//             dweight = sum over rows of dy * xhat, dbias = sum over rows of dy.
//             For add + LayerNorm the gradients of x and residual are both this dx.
//
// Layout and types: activations (x, residual, y, s, dy, ds, dx) are row-major [rows, cols] in the dtype
// given by `dtype`; weight, bias, dweight, dbias, mean, rstd are fp32 (mixed precision keeps fp32
// parameters; callers cast other parameter dtypes themselves). 1 <= cols <= FC_MAX_COLS.
// Every call is asynchronous on `stream` (a cudaStream_t passed as void*; NULL = the legacy default
// stream) and never synchronises with the host. Pointers are device pointers on the current device.
// Return value: FC_OK or an fc_status; fc_last_error() then holds a sentence saying what went wrong.
#ifndef FASTCRAM_NATIVE_H
#define FASTCRAM_NATIVE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define FC_API __declspec(dllexport)
#else
#define FC_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define FC_ABI_VERSION 1
#define FC_MAX_COLS 8192

enum fc_dtype { FC_FLOAT32 = 0, FC_BFLOAT16 = 1 };

enum fc_status {
  FC_OK = 0,
  FC_ERR_ARGUMENT = 1,   // a shape, dtype or null pointer that the op does not accept
  FC_ERR_WORKSPACE = 2,  // the backward workspace is too small (ask fc_layer_norm_bwd_workspace_floats)
  FC_ERR_CUDA = 3,       // the CUDA runtime reported an error (no device, launch failure, ...)
};

// Version of this ABI; the Python loader refuses a library whose version differs from its own.
FC_API int fc_abi_version(void);
// Largest supported feature size (FC_MAX_COLS).
FC_API int fc_max_cols(void);
// The message of the last failed call on this thread ("" when none failed).
FC_API const char* fc_last_error(void);
// FC_OK when the CUDA runtime inside the library sees at least one device; FC_ERR_CUDA otherwise.
FC_API int fc_probe(void);

// Forward. residual and s may both be NULL (plain LayerNorm) or both set (add + LayerNorm);
// mean and rstd may be NULL when the caller does not need them (inference).
FC_API int fc_layer_norm_fwd(int dtype, int64_t rows, int cols, const void* x, const void* residual,
                             const float* weight, const float* bias, float eps, void* y, void* s,
                             float* mean, float* rstd, void* stream);

// Number of fp32 elements of workspace that fc_layer_norm_bwd wants for this shape on the current device.
FC_API int64_t fc_layer_norm_bwd_workspace_floats(int dtype, int64_t rows, int cols);

// Backward. x is the normalised input (s for add + LayerNorm); ds may be NULL. dweight and dbias are
// written (not accumulated). The workspace holds per-block partial sums of dweight and dbias, reduced
// by a second kernel (no atomics, so results are deterministic run to run).
FC_API int fc_layer_norm_bwd(int dtype, int64_t rows, int cols, const void* dy, const void* ds,
                             const void* x, const float* weight, const float* mean, const float* rstd,
                             void* dx, float* dweight, float* dbias, float* workspace,
                             int64_t workspace_floats, void* stream);

#ifdef __cplusplus
}
#endif

#endif  // FASTCRAM_NATIVE_H
