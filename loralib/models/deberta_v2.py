"""DeBERTa-v2 (base to xxlarge) and DeBERTa-v3 (the same architecture), with LoRA inline.

DeBERTa's attention disentangles content from relative position (He et al., 2021). With content
queries/keys Q, K (B, H, T, D), relative embeddings R (2k, d) projected to Kr, Qr (H, 2k, D), and
delta(i, j) the bucketed, clamped relative-position index of query i and key j,

    score(i, j) = [ Q_i . K_j  +  Q_i . Kr_delta(i,j)  (c2p)  +  K_j . Qr_delta(i,j)  (p2c) ] / sqrt(D s)

where s counts the terms present (1 + c2p + p2c). The position terms are an additive bias, so the
softmax and the value product go through `scaled_dot_product_attention`.

Config facts this file follows (as in transformers' DebertaV2 and microsoft's DeBERTa):
- relative positions q - k are log-bucketed when position_buckets > 0: |r| <= mid = buckets // 2 is
  kept, farther ones map to mid + ceil(log(|r| / mid) / log((max_rel - 1) / mid) * (mid - 1)), signed;
  the index into R is clamp(bucket + k, 0, 2k - 1) with k = position_buckets (else max_relative_positions,
  which defaults to max_position_embeddings).
- share_att_key: Kr and Qr come from key_proj and query_proj; otherwise from pos_key_proj (c2p) and
  pos_query_proj (p2c).
- norm_rel_ebd "layer_norm": R passes through encoder.LayerNorm first.
- conv_kernel_size > 0 (xxlarge): after the first layer, h = LN(h + act(conv(embeddings))) * mask.
- embeddings are multiplied by the attention mask; position embeddings are added only when
  position_biased_input (v3 and xxlarge use relative attention alone).

LoRA roles: "query", "key", "value" (query_proj, key_proj, value_proj), "attention.output",
"intermediate", "output" / "layer.output".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LoRAConfig, make_linear
from .outputs import ModelOutput
from .roberta import (DenseAddNorm, Intermediate, activation, labels_from_hf, reject_cache, require_key,
                      sequence_classification_loss)


# Checkpoint keys the loader drops silently: the position-id buffer, and position embeddings that
# checkpoints of models with position_biased_input = false still carry (unused, as in transformers).
IGNORED_CHECKPOINT_KEYS = (r"(\w+\.)?embeddings\.position_ids", r"(\w+\.)?embeddings\.position_embeddings\.weight")


def _parse_list(value, key: str, allowed: Tuple[str, ...]) -> Tuple[str, ...]:
    """"p2c|c2p", ["p2c", "c2p"] or None -> ("p2c", "c2p"), rejecting unknown entries."""
    if value is None:
        return ()
    items = value.lower().split("|") if isinstance(value, str) else list(value)
    items = tuple(s.strip().lower() for s in items if s.strip())
    unknown = [s for s in items if s not in allowed]
    if unknown:
        raise ValueError(f"config.json: {key}={value!r} has unsupported entries {unknown}; known: {list(allowed)}")
    return items


@dataclass
class DebertaV2Config:
    """The fields of a deberta-v2 config.json that the computation reads (v3 uses the same)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    pad_token_id: Optional[int] = 0
    embedding_size: Optional[int] = None  # None: hidden_size (no embed_proj)
    attention_head_size: Optional[int] = None  # None: hidden_size // num_attention_heads
    position_biased_input: bool = True
    relative_attention: bool = False
    max_relative_positions: int = -1
    position_buckets: int = -1
    pos_att_type: Tuple[str, ...] = ()
    share_att_key: bool = False
    norm_rel_ebd: Tuple[str, ...] = ()
    conv_kernel_size: int = 0
    conv_groups: int = 1
    conv_act: str = "tanh"
    pooler_hidden_size: Optional[int] = None  # None: hidden_size
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    cls_dropout: Optional[float] = None  # None: hidden_dropout_prob
    num_labels: int = 2

    def __post_init__(self):
        self.pos_att_type = _parse_list(self.pos_att_type, "pos_att_type", ("c2p", "p2c"))
        self.norm_rel_ebd = _parse_list(self.norm_rel_ebd, "norm_rel_ebd", ("layer_norm", "none"))
        if self.attention_head_size is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"config.json: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        activation(self.hidden_act)
        activation(self.conv_act, "conv_act")
        activation(self.pooler_hidden_act, "pooler_hidden_act")

    @property
    def head_dim(self) -> int:
        return self.attention_head_size or self.hidden_size // self.num_attention_heads

    @property
    def max_relative(self) -> int:
        """The largest distance the bucketing resolves (max_relative_positions, else max_position_embeddings)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def att_span(self) -> int:
        """k: relative indices run over [0, 2k); R has 2k rows."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @classmethod
    def from_hf(cls, d: dict) -> "DebertaV2Config":
        if d.get("model_type", "deberta-v2") != "deberta-v2":
            raise ValueError(f"config.json: model_type={d['model_type']!r}; this file builds 'deberta-v2'")
        known = {f for f in cls.__dataclass_fields__} - {"num_labels"}
        kwargs = {k: d[k] for k in known if k in d and (d[k] is not None or k == "pad_token_id")}
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            require_key(d, key)
        if "cls_dropout" not in kwargs and d.get("classifier_dropout") is not None:
            kwargs["cls_dropout"] = d["classifier_dropout"]
        return cls(**kwargs, num_labels=labels_from_hf(d))


# -- relative positions ------------------------------------------------------------------------------

def log_bucket(rel: torch.Tensor, buckets: int, max_position: int) -> torch.Tensor:
    """Signed log-bucketing of relative distances (long tensor in, long tensor out).

    Distances within buckets // 2 keep their value; beyond, the magnitude grows logarithmically so
    that max_position - 1 lands on bucket buckets // 2 + (buckets // 2 - 1)."""
    mid = buckets // 2
    magnitude = rel.abs()
    near = magnitude <= mid
    # Computed in float32 like the reference: ceil() sits on exact boundaries for some distances.
    far_mag = torch.where(near, torch.full_like(magnitude, mid), magnitude).float()
    log_ratio = torch.log(far_mag / mid) / torch.log(torch.tensor((max_position - 1) / mid))
    far = (torch.ceil(log_ratio * (mid - 1)) + mid).long() * rel.sign()
    return torch.where(near, rel, far)


def relative_index(T: int, cfg: DebertaV2Config, device) -> torch.Tensor:
    """(T, T) long: delta(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1), the row of R that query i uses
    for key j (c2p) and key j uses for query i (p2c; the bucketing is odd, so one index serves both)."""
    pos = torch.arange(T, device=device)
    rel = pos[:, None] - pos[None, :]
    if cfg.position_buckets > 0:
        rel = log_bucket(rel, cfg.position_buckets, cfg.max_relative)
    k = cfg.att_span
    return (rel + k).clamp(0, 2 * k - 1)


# -- attention ---------------------------------------------------------------------------------------

class DisentangledSelfAttention(nn.Module):
    """(B, T, d) -> (B, T, H * D), scores as in the module docstring."""

    def __init__(self, cfg: DebertaV2Config, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.query_proj = make_linear(lora, f"{path}.query_proj", d, hd, roles=("query",))
        self.key_proj = make_linear(lora, f"{path}.key_proj", d, hd, roles=("key",))
        self.value_proj = make_linear(lora, f"{path}.value_proj", d, hd, roles=("value",))
        self.relative = cfg.relative_attention
        self.c2p = self.relative and "c2p" in cfg.pos_att_type
        self.p2c = self.relative and "p2c" in cfg.pos_att_type
        self.share_att_key = cfg.share_att_key
        if self.relative and not cfg.share_att_key:
            if self.c2p:
                self.pos_key_proj = nn.Linear(d, hd)
            if self.p2c:
                self.pos_query_proj = nn.Linear(d, hd)
        self.att_span = cfg.att_span
        # The scale counts the configured terms, also when relative attention is off (as the reference).
        n_terms = 1 + ("c2p" in cfg.pos_att_type) + ("p2c" in cfg.pos_att_type)
        self.scale = 1.0 / math.sqrt(self.head_dim * n_terms)
        self.pos_dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(..., L, H * D) -> (..., H, L, D)."""
        return t.unflatten(-1, (self.n_head, self.head_dim)).transpose(-3, -2)

    def position_bias(self, q: torch.Tensor, k: torch.Tensor, rel_embeddings: torch.Tensor,
                      rel_idx: torch.Tensor) -> torch.Tensor:
        """c2p + p2c terms, already scaled: q, k (B, H, T, D), rel_embeddings (>= 2k, d),
        rel_idx (T, T) -> (B, H, T, T)."""
        R = self.pos_dropout(rel_embeddings[: 2 * self.att_span])
        B, H, T, _ = q.shape
        idx = rel_idx.expand(B, H, T, T)
        bias = q.new_zeros(())
        if self.c2p:
            Kr = self._heads((self.key_proj if self.share_att_key else self.pos_key_proj)(R))  # (H, 2k, D)
            bias = bias + torch.gather(q @ Kr.transpose(-1, -2), -1, idx)  # [i, j] = Q_i . Kr_delta(i,j)
        if self.p2c:
            Qr = self._heads((self.query_proj if self.share_att_key else self.pos_query_proj)(R))
            # [j, i] = K_j . Qr_delta(i,j), then transposed to (query, key).
            bias = bias + torch.gather(k @ Qr.transpose(-1, -2), -1, idx.transpose(-1, -2)).transpose(-1, -2)
        return bias * self.scale

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], rel_embeddings: Optional[torch.Tensor],
                rel_idx: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, T, d); key_mask (B, 1, 1, T) bool or None."""
        q, k, v = (self._heads(p(x)) for p in (self.query_proj, self.key_proj, self.value_proj))
        mask = key_mask
        if self.c2p or self.p2c:
            bias = self.position_bias(q, k, rel_embeddings, rel_idx)
            mask = bias if key_mask is None else bias.masked_fill(~key_mask, torch.finfo(bias.dtype).min)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).flatten(2)


class Attention(nn.Module):
    def __init__(self, cfg: DebertaV2Config, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        self.self = DisentangledSelfAttention(cfg, lora, f"{path}.self")
        self.output = DenseAddNorm(lora, f"{path}.output", cfg.num_attention_heads * cfg.head_dim,
                                   cfg.hidden_size, cfg.layer_norm_eps, cfg.hidden_dropout_prob,
                                   roles=("attention.output",))

    def forward(self, x, key_mask, rel_embeddings, rel_idx):
        return self.output(self.self(x, key_mask, rel_embeddings, rel_idx), x)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: DebertaV2Config, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        d = cfg.hidden_size
        self.attention = Attention(cfg, lora, f"{path}.attention")
        self.intermediate = Intermediate(lora, f"{path}.intermediate", d, cfg.intermediate_size, cfg.hidden_act)
        self.output = DenseAddNorm(lora, f"{path}.output", cfg.intermediate_size, d, cfg.layer_norm_eps,
                                   cfg.hidden_dropout_prob, roles=("output", "layer.output"))

    def forward(self, x, key_mask, rel_embeddings, rel_idx):
        h = self.attention(x, key_mask, rel_embeddings, rel_idx)
        return self.output(self.intermediate(h), h)


class ConvLayer(nn.Module):
    """xxlarge's n-gram branch: LN(h + act(conv(e) masked)) * mask, e the embeddings (B, T, d)."""

    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        k = cfg.conv_kernel_size
        self.conv = nn.Conv1d(cfg.hidden_size, cfg.hidden_size, k, padding=(k - 1) // 2, groups=cfg.conv_groups)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.act = activation(cfg.conv_act, "conv_act")

    def forward(self, embeddings: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """mask (B, T, 1) float."""
        out = self.conv(embeddings.transpose(1, 2)).transpose(1, 2) * mask
        return self.LayerNorm(h + self.act(self.dropout(out))) * mask


class Encoder(nn.Module):
    def __init__(self, cfg: DebertaV2Config, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        self.cfg = cfg
        self.layer = nn.ModuleList(EncoderLayer(cfg, lora, f"{path}.layer.{i}") for i in range(cfg.num_hidden_layers))
        if cfg.relative_attention:
            self.rel_embeddings = nn.Embedding(2 * cfg.att_span, cfg.hidden_size)
            if "layer_norm" in cfg.norm_rel_ebd:
                self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.conv = ConvLayer(cfg) if cfg.conv_kernel_size > 0 else None

    def forward(self, embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """embeddings (B, T, d), attention_mask (B, T) 1/0 -> (B, T, d)."""
        T = embeddings.shape[1]
        key_mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        R = rel_idx = None
        if self.cfg.relative_attention:
            R = self.rel_embeddings.weight
            if hasattr(self, "LayerNorm"):
                R = self.LayerNorm(R)
            rel_idx = relative_index(T, self.cfg, embeddings.device)
        h = embeddings
        for i, block in enumerate(self.layer):
            h = block(h, key_mask, R, rel_idx)
            if i == 0 and self.conv is not None:
                h = self.conv(embeddings, h, attention_mask[..., None].to(h.dtype))
        return h


class Embeddings(nn.Module):
    """LayerNorm(embed_proj(word [+ position] [+ token_type])) * mask: (B, T) ids -> (B, T, d)."""

    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        e = cfg.embedding_size or cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, e, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, e) if cfg.position_biased_input else None
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, e) if cfg.type_vocab_size > 0 else None
        self.embed_proj = nn.Linear(e, cfg.hidden_size, bias=False) if e != cfg.hidden_size else None
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, attention_mask, token_type_ids=None, position_ids=None) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            x = x + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(
                torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.LayerNorm(x) * attention_mask[..., None].to(x.dtype)
        return self.dropout(x)


class DebertaV2Model(nn.Module):
    """The bare encoder, keys as transformers' DebertaV2Model: `embeddings.*`, `encoder.*`."""

    base_model_prefix = "deberta"
    ignored_checkpoint_keys = IGNORED_CHECKPOINT_KEYS

    def __init__(self, cfg: DebertaV2Config, lora: Optional[LoRAConfig] = None, path: str = ""):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, lora, f"{path}.encoder" if path else "encoder")

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> torch.Tensor:
        """(B, T) ids -> (B, T, d) last hidden states."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embeddings(input_ids, attention_mask, token_type_ids, position_ids)
        return self.encoder(x, attention_mask)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                past_key_values=None, use_cache=False) -> ModelOutput:
        """logits and hidden_states are both the (B, T, d) last hidden states (there is no head)."""
        reject_cache(past_key_values, use_cache)
        if labels is not None:
            raise ValueError("labels: the bare encoder has no head to score them; build task='sequence-classification'")
        h = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        return ModelOutput(logits=h, hidden_states=h)


class ContextPooler(nn.Module):
    """act(dense(dropout(h[:, 0]))): (B, T, d) -> (B, d_pool)."""

    def __init__(self, cfg: DebertaV2Config):
        super().__init__()
        p = cfg.pooler_hidden_size or cfg.hidden_size
        self.dense = nn.Linear(p, p)
        self.dropout = nn.Dropout(cfg.pooler_dropout)
        self.act = activation(cfg.pooler_hidden_act, "pooler_hidden_act")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(self.dropout(h[:, 0])))


class DebertaV2ForSequenceClassification(nn.Module):
    """Keys: `deberta.*`, `pooler.dense.*`, `classifier.*`. logits = classifier(dropout(pooler(h)))."""

    base_model_prefix = "deberta"
    ignored_checkpoint_keys = IGNORED_CHECKPOINT_KEYS

    def __init__(self, cfg: DebertaV2Config, lora: Optional[LoRAConfig] = None):
        super().__init__()
        self.config = cfg
        self.deberta = DebertaV2Model(cfg, lora, path="deberta")
        self.pooler = ContextPooler(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob if cfg.cls_dropout is None else cfg.cls_dropout)
        self.classifier = nn.Linear(cfg.pooler_hidden_size or cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                past_key_values=None, use_cache=False) -> ModelOutput:
        reject_cache(past_key_values, use_cache)
        h = self.deberta.encode(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.classifier(self.dropout(self.pooler(h)))
        loss = None if labels is None else sequence_classification_loss(logits, labels)
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)


def build(hf_config: dict, task: str, num_labels: Optional[int] = None,
          lora: Optional[LoRAConfig] = None) -> nn.Module:
    """A DeBERTa-v2/v3 model for task "base" or "sequence-classification"."""
    cfg = DebertaV2Config.from_hf(hf_config)
    if num_labels is not None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        cfg.num_labels = num_labels
    if task == "base":
        return DebertaV2Model(cfg, lora)
    if task == "sequence-classification":
        return DebertaV2ForSequenceClassification(cfg, lora)
    raise ValueError(f"task={task!r}: a deberta-v2 encoder builds 'base' or 'sequence-classification'")
