// Validates residual-add + LayerNorm forward + backward against the CPU reference, then times them.
// Exit 77 (skipped) without a CUDA device.
#include "validate_common.h"

int main(int argc, char** argv) { return fcv::run_main(argc, argv, /*add=*/true, "add_layer_norm"); }
