// The small functions of the C ABI: version, limits, last error, device probe.
#include "ln_common.cuh"

namespace fcn {

std::string& last_error_slot() {
  thread_local std::string msg;
  return msg;
}

}  // namespace fcn

extern "C" FC_API int fc_abi_version(void) { return FC_ABI_VERSION; }

extern "C" FC_API int fc_max_cols(void) { return FC_MAX_COLS; }

extern "C" FC_API const char* fc_last_error(void) { return fcn::last_error_slot().c_str(); }

extern "C" FC_API int fc_probe(void) {
  int n = 0;
  if (int st = fcn::check_cuda(cudaGetDeviceCount(&n), "no usable CUDA device (cudaGetDeviceCount)")) return st;
  if (n < 1) return fcn::fail(FC_ERR_CUDA, "no CUDA device found");
  return FC_OK;
}
