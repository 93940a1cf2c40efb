"""Model level: the torch and triton ops backends give the same loss, gradients and training steps."""
import pytest
import torch

from fastcram.config import DataConfig, ModelConfig
from fastcram.data.loader import mask_batch
from fastcram.model import CrammedBert
from fastcram.ops import OP_MODULES, OpsError, get_op, get_ops
from fastcram.data.tokenizer import SpecialIds

SPECIAL = SpecialIds(0, 1, 2, 3, 4, 5, 6)


def _triton_ops_available() -> list[str]:
    ok = []
    for op in OP_MODULES:
        try:
            get_op(op, "triton")
            ok.append(op)
        except OpsError:
            pass
    return ok


def _cfg(ffn="geglu") -> ModelConfig:  # the tiny preset's shape, with a small vocabulary
    return ModelConfig(vocab_size=301, hidden=64, layers=2, heads=2, ffn=ffn, intermediate=96 if ffn == "geglu"
                       else 80)


def _batch(seed, vocab=301, B=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (B, 128), generator=g)
    return mask_batch(ids, DataConfig(), SPECIAL, vocab, g)


def _models(ffn, backend_ops):
    torch.manual_seed(1234)
    ref = CrammedBert(_cfg(ffn), get_ops("torch"))
    fused = CrammedBert(_cfg(ffn), get_ops("torch", per_op={op: "triton" for op in backend_ops}))
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("ffn", ["geglu", "gelu"])
def test_one_step_same_loss_and_gradients(ffn):
    ops = _triton_ops_available()
    if not ops:
        pytest.skip("no triton op available")
    ref, fused = _models(ffn, ops)
    assert fused.ops.choice != ref.ops.choice
    b = _batch(seed=torch.randint(0, 10**6, ()).item())  # fresh inputs each run
    l_ref = ref(b.input_ids, b.positions, b.labels)
    l_fused = fused(b.input_ids, b.positions, b.labels)
    l_ref.backward()
    l_fused.backward()
    torch.testing.assert_close(l_fused, l_ref, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("ffn", ["geglu", "gelu"])
def test_a_few_training_steps_match(ffn):
    ops = _triton_ops_available()
    if not ops:
        pytest.skip("no triton op available")
    ref, fused = _models(ffn, ops)
    losses = {}
    for name, model in (("torch", ref), ("triton", fused)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-12)
        out = []
        for step in range(3):
            b = _batch(seed=100)  # the same batch: the loss must fall
            loss = model(b.input_ids, b.positions, b.labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        losses[name] = out
    assert losses["torch"][-1] < losses["torch"][0]
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["torch"]), atol=1e-4, rtol=1e-4)


def test_eager_and_compiled_agree():
    torch.manual_seed(7)
    cfg = ModelConfig(vocab_size=301, hidden=32, layers=1, heads=2, intermediate=64)
    model = CrammedBert(cfg, get_ops("torch"))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    b = _batch(seed=3)
    eager_loss = model(b.input_ids, b.positions, b.labels)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    comp_loss = compiled(b.input_ids, b.positions, b.labels)
    comp_loss.backward()
    torch.testing.assert_close(comp_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
