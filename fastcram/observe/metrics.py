"""Training FLOPs per token and MFU against the GPU's dense bf16 peak."""
from __future__ import annotations

from ..config import ModelConfig

# Dense (no sparsity) bf16 tensor-core peak with fp32 accumulation, TFLOP/s, from the vendors' datasheets
# and architecture whitepapers. Matched against torch.cuda.get_device_name() by the first key it contains.
PEAK_BF16_TFLOPS = [
    ("H200", 989.4),  # H200 SXM datasheet (same tensor cores and clocks as H100 SXM)
    ("H100 PCIe", 756.0),  # H100 PCIe datasheet
    ("H100", 989.4),  # H100 SXM datasheet: 1979 with sparsity
    ("GH200", 989.4),  # Grace Hopper datasheet
    ("A100", 312.0),  # A100 datasheet: 624 with sparsity
    ("L40S", 362.1),  # L40S datasheet: 733 with sparsity
    ("RTX A6000", 154.8),  # NVIDIA Ampere GA102 whitepaper: 309.7 with sparsity
    ("A6000", 154.8),
    ("L4", 121.0),  # L4 datasheet: 242 with sparsity
    ("4090", 165.2),  # Ada AD102 whitepaper, fp32 accumulate (330.3 with fp16 accumulate)
    ("A10", 125.0),  # A10 datasheet: 250 with sparsity
]


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul for every token (the decoder is counted separately)."""
    d = cfg.hidden
    per_layer = 3 * d * d + d * d + d * cfg.intermediate + cfg.ffn_out_in * d
    return cfg.layers * per_layer


def flops_per_token(cfg: ModelConfig, mask_prob: float = 0.25) -> float:
    """Training FLOPs per token of the work the model does: 6 N_matmul + attention scores/values 12 L s d +
    the sparse decoder. With cfg.sparse_last_layer the last block's query projection, attention output,
    output projection and FFN run for the predicted fraction of the tokens only (keys and values for all)."""
    d, s = cfg.hidden, cfg.seq_len
    dense = 6 * matmul_params(cfg)
    attention = 12 * cfg.layers * s * d
    decoder = 6 * d * cfg.vocab_size * mask_prob  # only the predicted fraction
    if cfg.sparse_last_layer:
        rows_only = d * d + d * d + d * cfg.intermediate + cfg.ffn_out_in * d  # q, out-proj, both FFN matmuls
        dense -= 6 * rows_only * (1 - mask_prob)
        attention -= 12 * s * d * (1 - mask_prob)  # the last layer's scores and values, per query row
    return float(dense + attention + decoder)


def peak_tflops(device_name: str | None, override: float | None = None) -> float | None:
    """Dense bf16 peak for a device name, the user's override, or None (MFU not applicable)."""
    if override:
        return float(override)
    if not device_name:
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None where no peak is known (e.g. on a CPU)."""
    if not peak:
        return None
    return tokens_per_s * flops_per_tok / (peak * 1e12)
