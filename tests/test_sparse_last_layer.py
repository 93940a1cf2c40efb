"""The sparse last layer is exact: the last block at the predicted rows only (keys and values over all
positions) gives the full computation's loss, hidden rows and every gradient, on both ops backends."""
import dataclasses

import pytest
import torch

from fastcram.config import DataConfig, ModelConfig
from fastcram.data.loader import mask_batch
from fastcram.data.tokenizer import SpecialIds
from fastcram.model import CrammedBert
from fastcram.ops import get_ops

from .test_model_backends import _triton_ops_available

SPECIAL = SpecialIds(0, 1, 2, 3, 4, 5, 6)
SEQ = 40  # not a power of two; 10 predicted rows per sequence


def _cfg(ffn: str, sparse: bool) -> ModelConfig:
    return ModelConfig(vocab_size=301, hidden=48, layers=2, heads=3, ffn=ffn, intermediate=80 if ffn == "geglu"
                       else 72, seq_len=SEQ, sparse_last_layer=sparse)


def _batch(B: int):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))  # fresh inputs each run
    ids = torch.randint(7, 301, (B, SEQ), generator=g)
    return mask_batch(ids, DataConfig(seq_len=SEQ), SPECIAL, 301, g)


def _pair(ffn: str, backend: str):
    if backend == "triton":
        ops = _triton_ops_available()
        if not ops:
            pytest.skip("no triton op available")
        bundle = get_ops("torch", per_op={op: "triton" for op in ops})
    else:
        bundle = get_ops("torch")
    full = CrammedBert(_cfg(ffn, sparse=False), bundle)
    with torch.no_grad():  # non-trivial norms, so a wrong row in a norm's gradient shows
        for p in full.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sparse = CrammedBert(_cfg(ffn, sparse=True), bundle)
    sparse.load_state_dict(full.state_dict())
    return full, sparse


@pytest.mark.parametrize("ffn,backend", [("geglu", "torch"), ("gelu", "torch"), ("geglu", "triton")])
def test_same_loss_rows_and_gradients_as_the_full_layer(backend, ffn):
    full, sparse = _pair(ffn, backend)
    b = _batch(B=3)
    assert b.positions.shape == (3 * 10,)
    torch.testing.assert_close(sparse.predicted_rows(b.input_ids, b.positions),
                               full.predicted_rows(b.input_ids, b.positions), atol=1e-5, rtol=1e-5)
    l_full = full(b.input_ids, b.positions, b.labels)
    l_sparse = sparse(b.input_ids, b.positions, b.labels)
    torch.testing.assert_close(l_sparse, l_full, atol=1e-5, rtol=1e-5)
    l_full.backward()
    l_sparse.backward()
    for (name, p), q in zip(full.named_parameters(), sparse.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert p.grad.abs().sum() > 0, name  # every parameter takes part, the last block's too
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_the_sparse_path_is_taken_and_sees_only_the_predicted_rows():
    """The last block's FFN runs on K rows in the sparse model and on all B * L rows in the full one."""
    full, sparse = _pair("geglu", "torch")
    seen = {}
    for name, model in (("full", full), ("sparse", sparse)):
        model.blocks[-1].ffn.register_forward_hook(lambda mod, args, out, name=name: seen.update({name: args[0].shape}))
    b = _batch(B=2)
    full(b.input_ids, b.positions, b.labels)
    sparse(b.input_ids, b.positions, b.labels)
    assert seen == {"full": (2, SEQ, 48), "sparse": (2, 10, 48)}


def test_positions_out_of_sequence_order_are_refused_by_the_sparse_path():
    full, sparse = _pair("geglu", "torch")
    b = _batch(B=2)
    swapped = torch.cat([b.positions[10:], b.positions[:10]])  # sequence 1's rows first
    labels = torch.cat([b.labels[10:], b.labels[:10]])
    with pytest.raises(RuntimeError, match="m per sequence, in sequence order"):
        sparse(b.input_ids, swapped, labels)
    # the full layer takes any positions, and the loss is order-free
    torch.testing.assert_close(full(b.input_ids, swapped, labels), full(b.input_ids, b.positions, b.labels),
                               atol=1e-6, rtol=1e-6)


def test_a_row_count_that_is_not_a_multiple_of_the_batch_uses_the_full_layer():
    full, sparse = _pair("geglu", "torch")
    b = _batch(B=2)
    pos, labels = b.positions[:7], b.labels[:7]  # 7 rows for 2 sequences
    torch.testing.assert_close(sparse(b.input_ids, pos, labels), full(b.input_ids, pos, labels),
                               atol=1e-6, rtol=1e-6)


def test_residual_stream_in_bf16_under_autocast():
    """--residual-dtype bf16: every residual add + norm gets a bf16 stream (fp32 by default)."""
    cfg = dataclasses.replace(_cfg("geglu", sparse=True))
    seen: dict = {}
    base = get_ops("torch")

    def spy(x, residual, w, b, eps):
        seen.setdefault("residual", set()).add(residual.dtype)
        return base.add_layer_norm(x, residual, w, b, eps)

    ops = dataclasses.replace(base, add_layer_norm=spy)
    b = _batch(B=2)
    for dtype, want in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        seen.clear()
        model = CrammedBert(cfg, ops, residual_dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(b.input_ids, b.positions, b.labels)
        loss.backward()
        assert seen["residual"] == {want} and torch.isfinite(loss)
