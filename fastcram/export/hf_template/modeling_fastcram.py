"""A crammed-BERT model exported by fastcram (`fastcram export hf`), for Hugging Face transformers.

Self-contained: torch and transformers only. Load it with trust_remote_code=True:

    from transformers import AutoModelForMaskedLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)

The network is fastcram's CrammedBert computed at every position: token embedding + scaled sinusoidal
positions, LayerNorm, pre-LayerNorm blocks (fused QKV attention, GELU-GLU or GELU FFN, no Linear biases), a
final LayerNorm; the masked-LM decoder is the token embedding itself (tied, no bias). Dropout sits where
fastcram's GLUE fine-tuning has it: after the embedding norm, on the attention probabilities and on each
block's two outputs (none inside the FFN); the classification head is fastcram's: first token -> Linear -> Tanh ->
dropout -> Linear.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput, SequenceClassifierOutput


class FastcramConfig(PretrainedConfig):
    model_type = "fastcram"

    def __init__(self, vocab_size: int = 32768, hidden_size: int = 768, num_hidden_layers: int = 16,
                 num_attention_heads: int = 12, ffn: str = "geglu", intermediate_size: int = 3072,
                 max_position_embeddings: int = 128, layer_norm_eps: float = 1e-12, initializer_range: float = 0.02,
                 hidden_dropout_prob: float = 0.1, classifier_hidden_size: int = 1024,
                 classifier_dropout: float = 0.1, pad_token_id: int = 0, fastcram: dict | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.ffn = ffn  # "geglu": first FFN matmul's output is [a | gate], out = GELU(gate) * a; "gelu": classic
        self.intermediate_size = intermediate_size  # width of the first FFN matmul's output
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.hidden_dropout_prob = hidden_dropout_prob  # every dropout of the encoder (0 in pretraining)
        self.classifier_hidden_size = classifier_hidden_size
        self.classifier_dropout = classifier_dropout
        self.fastcram = fastcram or {}  # provenance: fastcram version, run, checkpoint, data and tokenizer hashes
        super().__init__(pad_token_id=pad_token_id, **kwargs)


def sinusoidal_positions(seq_len: int, dim: int, device: torch.device) -> torch.Tensor:
    """Standard sin/cos position table [seq_len, dim], base 10000 (fastcram's, computed the same way)."""
    pos = torch.arange(seq_len, dtype=torch.float32, device=device).unsqueeze(1)  # [L, 1]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(seq_len, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class FastcramAttention(nn.Module):
    def __init__(self, config: FastcramConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)  # one fused projection
        self.out = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.dropout = config.hidden_dropout_prob

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        B, L, D = h.shape
        qkv = self.qkv(h).view(B, L, 3, self.heads, D // self.heads)  # [B, L, 3, H, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
        drop = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=drop)  # [B, H, L, hd]
        return self.out(o.transpose(1, 2).reshape(B, L, D))  # [B, L, D]


class FastcramFFN(nn.Module):
    def __init__(self, config: FastcramConfig):
        super().__init__()
        self.glu = config.ffn == "geglu"
        width = config.intermediate_size // 2 if self.glu else config.intermediate_size
        self.inp = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # GLU: [a rows | gate rows]
        self.outp = nn.Linear(width, config.hidden_size, bias=False)  # no dropout inside, as in fastcram

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.inp(h)  # [B, L, intermediate]
        if self.glu:
            a, gate = z.chunk(2, dim=-1)
            act = F.gelu(gate) * a  # [B, L, intermediate / 2]
        else:
            act = F.gelu(z)
        return self.outp(act)  # [B, L, D]


class FastcramBlock(nn.Module):
    """Pre-LayerNorm: x = x + drop(attn(norm1(x))); x = x + drop(ffn(norm2(x)))."""

    def __init__(self, config: FastcramConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = FastcramAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FastcramFFN(config)
        self.drop = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        x = self.drop(self.attn(self.norm1(x), keep)) + x
        return self.drop(self.ffn(self.norm2(x))) + x  # [B, L, D]


class FastcramPreTrainedModel(PreTrainedModel):
    config_class = FastcramConfig
    base_model_prefix = "encoder"
    _no_split_modules = ["FastcramBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        """fastcram's init: normal(0, initializer_range) for Linear and Embedding, LayerNorm 1 and 0, zero biases
        (only the classification head has biases), position scale 1/sqrt(hidden)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, FastcramModel):
            nn.init.constant_(module.pos_scale, 1.0 / math.sqrt(self.config.hidden_size))


def _keep_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, L] with 1 = a real token -> the boolean SDPA mask [B, 1, 1, L] (True = attend to that key)."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


class FastcramModel(FastcramPreTrainedModel):
    """The encoder: final hidden states [B, L, D] after the final LayerNorm."""

    def __init__(self, config: FastcramConfig):
        super().__init__(config)
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)  # also the tied MLM decoder
        self.pos_scale = nn.Parameter(torch.tensor(1.0 / math.sqrt(config.hidden_size)))
        self.emb_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.emb_drop = nn.Dropout(config.hidden_dropout_prob)
        self.blocks = nn.ModuleList(FastcramBlock(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self._positions: dict = {}  # device -> the position table; a plain cache, never saved
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_emb = value

    def position_table(self, length: int, device: torch.device) -> torch.Tensor:
        limit = self.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"input of {length} tokens is longer than this model's {limit} positions; "
                             f"truncate it (tokenizer(..., truncation=True))")
        table = self._positions.get(device)
        if table is None:
            table = self._positions[device] = sinusoidal_positions(limit, self.config.hidden_size, device)
        return table[:length]  # [L, D]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutput | tuple:
        """input_ids [B, L]; attention_mask [B, L] (1 = token, 0 = padding). token_type_ids and other
        BERT-style inputs are accepted and ignored (the model has no segment embeddings)."""
        L = input_ids.shape[1]
        keep = _keep_mask(attention_mask)
        table = self.position_table(L, input_ids.device).to(self.tok_emb.weight.dtype)  # [L, D]; the model's dtype
        e = self.tok_emb(input_ids) + self.pos_scale * table  # [B, L, D]
        x = self.emb_drop(self.emb_norm(e))  # the residual stream
        states = [x] if output_hidden_states else None
        for blk in self.blocks:
            x = blk(x, keep)
            if states is not None:
                states.append(x)
        out = BaseModelOutput(last_hidden_state=self.final_norm(x),
                              hidden_states=tuple(states) if states is not None else None)
        return out if return_dict is not False else out.to_tuple()


class FastcramForMaskedLM(FastcramPreTrainedModel):
    """Logits over the vocabulary at every position; the decoder is the token embedding (tied, no bias)."""

    def __init__(self, config: FastcramConfig):
        super().__init__(config)
        self.encoder = FastcramModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.tok_emb = value

    def get_output_embeddings(self):
        return None  # the decoder reads the input embedding directly, so it is tied by construction

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> MaskedLMOutput | tuple:
        """labels [B, L]: the token ids to predict, -100 where nothing is predicted."""
        enc = self.encoder(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        logits = F.linear(enc.last_hidden_state, self.encoder.tok_emb.weight)  # [B, L, V]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), labels.view(-1), ignore_index=-100)
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=enc.hidden_states)
        return out if return_dict is not False else out.to_tuple()


class FastcramForSequenceClassification(FastcramPreTrainedModel):
    """fastcram's GLUE head on the first token: Linear(hidden -> classifier_hidden_size), Tanh, dropout,
    Linear -> num_labels. num_labels 1 is regression (MSE), otherwise single-label cross-entropy unless
    config.problem_type says multi_label_classification."""

    def __init__(self, config: FastcramConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.encoder = FastcramModel(config)
        self.dense = nn.Linear(config.hidden_size, config.classifier_hidden_size)
        self.drop = nn.Dropout(config.classifier_dropout)
        self.out = nn.Linear(config.classifier_hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.tok_emb = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> SequenceClassifierOutput | tuple:
        enc = self.encoder(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        x = self.drop(torch.tanh(self.dense(enc.last_hidden_state[:, 0])))  # [B, classifier_hidden_size]
        logits = self.out(x)  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels)
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=enc.hidden_states)
        return out if return_dict is not False else out.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            return F.mse_loss(logits.float().view(-1), labels.float().view(-1))
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
