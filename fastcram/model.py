"""Crammed BERT: pre-LayerNorm encoder with GELU-GLU FFN, no Linear biases, tied sparse-prediction decoder.

Every fusable op goes through the `ops` bundle (fastcram.ops); this file never imports triton.
Parameters and state_dict keys are the same for every ops backend.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .ops import Ops


class Norm(nn.Module):
    """LayerNorm parameters only: the norm itself is applied through the ops bundle (maybe fused)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=False)  # one fused projection: q, k, v rows
        self.out = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.dropout = cfg.dropout

    def forward(self, h: torch.Tensor, attn_mask: torch.Tensor | None = None,
                h_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over h [B, L, D] -> [B, L, D]. With h_rows [B, m, D] (rows of h), only those rows
        ask queries: keys and values still cover all L positions, and the output is [B, m, D]."""
        B, L, D = h.shape
        hd = D // self.heads
        if h_rows is None:
            qkv = self.qkv(h).view(B, L, 3, self.heads, hd)  # [B, L, 3, H, hd]
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
        else:
            w = self.qkv.weight  # [3D, D]: the q rows first, then k, then v
            kv = F.linear(h, w[D:]).view(B, L, 2, self.heads, hd)  # [B, L, 2, H, hd]
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
            m = h_rows.shape[1]
            q = F.linear(h_rows, w[:D]).view(B, m, self.heads, hd).transpose(1, 2)  # [B, H, m, hd]
        drop = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)  # [B, H, Lq, hd]
        return self.out(o.transpose(1, 2).reshape(B, q.shape[2], D))  # [B, Lq, D]


class FFN(nn.Module):
    """GELU-GLU (or classic GELU) FFN, bias-free, one op of the bundle. No dropout inside: cramming's FFN has
    none (fine-tuning's dropouts are the embedding's, the attention probabilities' and the residual branches')."""

    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.kind = cfg.ffn  # "geglu" | "gelu"
        self.ops = ops
        self.inp = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)  # GLU: [a rows | gate rows]
        self.outp = nn.Linear(cfg.ffn_out_in, cfg.hidden, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ops.ffn(h, self.inp.weight, self.outp.weight, self.kind)  # [B, L, D]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.norm1 = Norm(cfg.hidden)
        self.attn = Attention(cfg)
        self.norm2 = Norm(cfg.hidden)
        self.ffn = FFN(cfg, ops)
        self.drop = nn.Dropout(cfg.dropout)


def sinusoidal_positions(seq_len: int, dim: int) -> torch.Tensor:
    """Standard sin/cos position table [seq_len, dim], base 10000."""
    pos = torch.arange(seq_len, dtype=torch.float32).unsqueeze(1)  # [L, 1]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # [D/2]
    table = torch.zeros(seq_len, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class CrammedBert(nn.Module):
    """The encoder and its sparse-prediction MLM loss.

    residual_dtype: the dtype the residual stream is kept in (None: what the embedding norm returns, fp32
    under autocast). bf16 halves the bytes of every residual add + norm; it needs bf16 autocast, since an
    fp32 branch output would promote the sum back to fp32.
    """

    def __init__(self, cfg: ModelConfig, ops: Ops, residual_dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg, self.ops, self.residual_dtype = cfg, ops, residual_dtype
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden)  # also the tied decoder
        self.pos_scale = nn.Parameter(torch.tensor(1.0 / math.sqrt(cfg.hidden)))
        self.register_buffer("pos_table", sinusoidal_positions(cfg.seq_len, cfg.hidden), persistent=False)
        self.emb_norm = Norm(cfg.hidden)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, ops) for _ in range(cfg.layers))
        self.final_norm = Norm(cfg.hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, self.cfg.init_std)
            elif isinstance(m, Norm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.pos_scale.fill_(1.0 / math.sqrt(self.cfg.hidden))

    def _embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream x, first block's normed input h), each [B, L, D]."""
        ops, eps = self.ops, self.cfg.norm_eps
        L = input_ids.shape[1]
        e = self.tok_emb(input_ids) + self.pos_scale * self.pos_table[:L]  # [B, L, D]
        x = self.emb_drop(ops.layer_norm(e, self.emb_norm.weight, self.emb_norm.bias, eps))  # residual stream
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        return x, ops.layer_norm(x, self.blocks[0].norm1.weight, self.blocks[0].norm1.bias, eps)

    def _block(self, i: int, x: torch.Tensor, h: torch.Tensor, attn_mask: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i on (x, h) [B, L, D] -> the new (x, h). Each residual add is fused with the LayerNorm that
        follows it (the next block's, or the final one).

        rows [B, m] (flat indices into B * L, m per sequence): only those rows go past the attention's keys
        and values; the result is then (x, h) at those rows, [B, m, D].
        """
        ops, eps, blk = self.ops, self.cfg.norm_eps, self.blocks[i]
        nxt = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else self.final_norm
        h_rows = None
        if rows is not None:
            B, L, D = h.shape
            h_rows = h.reshape(B * L, D).index_select(0, rows.reshape(-1)).view(rows.shape[0], -1, D)  # [B, m, D]
            x = x.reshape(B * L, D).index_select(0, rows.reshape(-1)).view(rows.shape[0], -1, D)  # [B, m, D]
        a = blk.drop(blk.attn(h, attn_mask, h_rows))  # [B, L or m, D]
        x, h = ops.add_layer_norm(a, x, blk.norm2.weight, blk.norm2.bias, eps)
        f = blk.drop(blk.ffn(h))  # [B, L or m, D]
        return ops.add_layer_norm(f, x, nxt.weight, nxt.bias, eps)

    def encode(self, input_ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, L, D] (after the final norm)."""
        x, h = self._embed(input_ids)
        for i in range(len(self.blocks)):
            x, h = self._block(i, x, h, attn_mask)
        return h

    def predicted_rows(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states [K, D] at the predicted positions, in the order of `positions`.

        positions [K]: flat indices into [B * L]. With cfg.sparse_last_layer, K = B * m and each run of m
        consecutive entries lies in one sequence, in sequence order (what mask_batch and rank_slice give):
        the last block then computes its queries and everything after them at those rows only.
        """
        B, L = input_ids.shape
        K = positions.shape[0]
        sparse = self.cfg.sparse_last_layer and K % B == 0  # static shapes: decided when the graph is traced
        if sparse and not torch.compiler.is_compiling():  # eager: check the layout (on the device, no sync)
            seq = torch.div(positions.view(B, K // B), L, rounding_mode="floor")  # [B, m]
            torch._assert_async((seq == torch.arange(B, device=seq.device).unsqueeze(1)).all(),
                                 "predicted_rows: positions must come m per sequence, in sequence order")
        x, h = self._embed(input_ids)
        last = len(self.blocks) - 1
        for i in range(last):
            x, h = self._block(i, x, h)
        if sparse:
            _, h = self._block(last, x, h, rows=positions.view(B, K // B))  # [B, m, D]
            return h.reshape(K, h.shape[-1])
        _, h = self._block(last, x, h)  # [B, L, D]
        return h.reshape(-1, h.shape[-1]).index_select(0, positions)  # [K, D]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean MLM cross-entropy over the predicted positions (flat indices into [B * L]; see predicted_rows)."""
        rows = self.predicted_rows(input_ids, positions)  # [K, D]: only the predicted rows
        return self.ops.mlm_loss(rows, labels, self.tok_emb.weight)


def parameter_breakdown(model: CrammedBert) -> dict[str, int]:
    """Parameter counts per component (the tied decoder is counted once, in the embedding)."""
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            key = "blocks." + name.split(".", 2)[2].rsplit(".", 1)[0]  # e.g. blocks.attn.qkv
        else:
            key = name.rsplit(".", 1)[0] if "." in name else name
        groups[key] = groups.get(key, 0) + p.numel()
    return groups
