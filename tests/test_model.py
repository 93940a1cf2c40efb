import torch

from fastcram.config import ModelConfig, preset
from fastcram.model import CrammedBert, parameter_breakdown
from fastcram.ops import get_ops


def test_crammed_bert_parameter_count_per_component():
    cfg = preset("crammed-bert").model
    with torch.device("meta"):
        model = CrammedBert(cfg, get_ops("torch"))
    got = parameter_breakdown(model)
    d, V, L = 768, 32768, 16  # RECIPE shapes, hand-counted
    want = {
        "tok_emb": V * d,  # tied with the decoder: counted once
        "pos_scale": 1,
        "emb_norm": 2 * d,
        "blocks.norm1": L * 2 * d,
        "blocks.attn.qkv": L * d * 2304,
        "blocks.attn.out": L * d * d,
        "blocks.norm2": L * 2 * d,
        "blocks.ffn.inp": L * d * 3072,
        "blocks.ffn.outp": L * 1536 * d,
        "final_norm": 2 * d,
    }
    assert got == want
    assert 119e6 < sum(got.values()) < 121e6  # "about 120M"
    # no Linear has a bias; the decoder is the embedding itself
    assert not any(n.endswith(".bias") and "norm" not in n for n, _ in model.named_parameters())


def test_classic_ffn_shapes():
    cfg = preset("bert-classic-ffn").model
    with torch.device("meta"):
        model = CrammedBert(cfg, get_ops("torch"))
    assert model.blocks[0].ffn.inp.weight.shape == (3072, 768)
    assert model.blocks[0].ffn.outp.weight.shape == (768, 3072)


def test_init_and_loss_at_start():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, hidden=64, layers=2, heads=2, intermediate=128)
    model = CrammedBert(cfg, get_ops("torch"))
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(model.pos_scale.item() - 64 ** -0.5) < 1e-7
    ids = torch.randint(7, 500, (4, 128))
    pos = (torch.stack([torch.randperm(128)[:16] for _ in range(4)]) + 128 * torch.arange(4)[:, None]).reshape(-1)
    loss = model(ids, pos, torch.randint(0, 500, (64,)))  # labels unrelated to the visible inputs
    assert abs(loss.item() - torch.log(torch.tensor(500.0)).item()) < 0.1  # near uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_sparse_loss_matches_dense_gather():
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=300, hidden=32, layers=1, heads=2, intermediate=64)
    model = CrammedBert(cfg, get_ops("torch"))
    ids = torch.randint(7, 300, (2, 128))
    pos = torch.tensor([3, 100, 130, 255])
    labels = torch.tensor([5, 299, 0, 17])
    h = model.encode(ids).reshape(-1, 32)
    dense = torch.nn.functional.cross_entropy(h @ model.tok_emb.weight.T, torch.full((256,), -100).index_put(
        (pos,), labels), ignore_index=-100)
    assert torch.allclose(model(ids, pos, labels), dense, atol=1e-6)


def test_ffn_has_no_dropout_inside():
    """cramming's dropouts only (embedding, attention probabilities, residual branches): the FFN is
    deterministic in training mode even at a high dropout rate, and equals the reference FFN."""
    from fastcram.ops.ffn import ffn_ref

    for kind, width in (("geglu", 128), ("gelu", 64)):
        torch.manual_seed(2)
        cfg = ModelConfig(vocab_size=300, hidden=32, layers=2, heads=2, ffn=kind, intermediate=width, dropout=0.5)
        model = CrammedBert(cfg, get_ops("torch")).train()
        drops = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]
        assert drops == ["emb_drop", "blocks.0.drop", "blocks.1.drop"]
        ffn = model.blocks[0].ffn
        h = torch.randn(2, 128, 32)
        first, second = ffn(h), ffn(h)
        assert torch.equal(first, second)
        assert torch.equal(first, ffn_ref(h, ffn.inp.weight, ffn.outp.weight, kind))
