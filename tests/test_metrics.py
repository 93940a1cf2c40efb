import dataclasses

import pytest

from fastcram.config import preset
from fastcram.observe.metrics import flops_per_token, mfu, peak_tflops


def test_crammed_bert_flops_per_token_hand_count():
    cfg = preset("crammed-bert").model
    # per layer: QKV 768x2304, out 768x768, FFN in 768x3072, FFN out 1536x768
    per_layer = 768 * 2304 + 768 * 768 + 768 * 3072 + 1536 * 768  # 5,898,240
    dense = 6 * 16 * per_layer  # 566,231,040
    attention = 12 * 16 * 128 * 768  # 18,874,368
    decoder = 6 * 768 * 32768 * 0.25  # 37,748,736
    full = dataclasses.replace(cfg, sparse_last_layer=False)
    assert flops_per_token(full, 0.25) == dense + attention + decoder == 622_854_144
    assert flops_per_token(full, 0.25) == pytest.approx(0.6e9, rel=0.05)  # RECIPE: "about 0.6 GFLOP"
    # the sparse last layer: q, out-proj and the FFN (768x768, 768x768, 768x3072, 1536x768) and the last
    # layer's scores/values run for 32 of 128 rows; keys and values for all 128
    rows_only = 768 * 768 + 768 * 768 + 768 * 3072 + 1536 * 768  # 4,718,592
    saved = 6 * rows_only * 0.75 + 12 * 128 * 768 * 0.75  # 21,233,664 + 884,736
    assert cfg.sparse_last_layer and flops_per_token(cfg, 0.25) == 622_854_144 - saved == 600_735_744
    assert saved / 622_854_144 == pytest.approx(0.0355, abs=5e-4)  # the "about 3.5% of the FLOPs"


def test_classic_ffn_counts_its_wider_second_matmul():
    g = flops_per_token(preset("crammed-bert").model)
    c = flops_per_token(preset("bert-classic-ffn").model)
    assert c - g == 6 * (16 - 0.75) * (3072 - 1536) * 768  # the last layer's FFN runs for a quarter of the rows


def test_mfu_arithmetic_and_peaks():
    # 800k tokens/s at 0.6228 GFLOP/token on a 989.4 TFLOP/s part
    assert mfu(800_000, 622_854_144, 989.4) == pytest.approx(800_000 * 622_854_144 / 989.4e12)
    assert mfu(1.0, 1.0, None) is None  # CPU: not applicable, not invented
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA RTX A6000") == 154.8
    assert peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert peak_tflops("Some Future GPU") is None
    assert peak_tflops("Some Future GPU", override=500) == 500.0
    assert peak_tflops(None) is None
