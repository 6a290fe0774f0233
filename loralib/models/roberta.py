"""RoBERTa and BERT: a post-LayerNorm Transformer encoder, with LoRA inline.

One encoder serves both families; they differ only in where position ids start and in the
classification head:

- RoBERTa counts positions from `pad_token_id + 1` and gives pad tokens the pad position (fairseq's
  make_positions); its head is `classifier.dense` -> tanh -> `classifier.out_proj` on the first token.
- BERT counts positions 0, 1, 2, ...; its head is the pooler (`bert.pooler.dense` + tanh on the first
  token) followed by `classifier`.

Parameter names are the Hugging Face checkpoint names, e.g. `roberta.encoder.layer.3.attention.self.query`.
LoRA roles given to `make_linear` (a `LoRAConfig.target_modules` entry may name any of them):
"query", "key", "value", "attention.output" (attention.output.dense), "intermediate"
(intermediate.dense), "output" and "layer.output" (the FFN's output.dense).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LoRAConfig, make_linear
from .outputs import ModelOutput

ACTIVATIONS = {
    "gelu": F.gelu,  # the exact (erf) form, as BERT and RoBERTa were trained
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def activation(name: str, key: str = "hidden_act"):
    if name not in ACTIVATIONS:
        raise ValueError(f"config.json: {key}={name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def require_key(d: dict, key: str):
    if key not in d:
        raise ValueError(f"config.json: required key {key!r} is missing")
    return d[key]


def labels_from_hf(d: dict) -> int:
    """num_labels as transformers stores it: `num_labels`, else the size of `id2label`, else 2."""
    if "num_labels" in d:
        return int(d["num_labels"])
    if d.get("id2label"):
        return len(d["id2label"])
    return 2


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over (B, C) logits with ignore_index -100, or MSE when C == 1 (STS-B regression)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.view(-1).float())
    return F.cross_entropy(logits.float(), labels.view(-1).long(), ignore_index=-100)


# Checkpoint keys the loader drops silently: the position-id buffer older checkpoints saved.
IGNORED_CHECKPOINT_KEYS = (r"(\w+\.)?embeddings\.position_ids",)


def reject_cache(past_key_values, use_cache: bool) -> None:
    if past_key_values is not None or use_cache:
        raise ValueError("past_key_values / use_cache: an encoder attends bidirectionally and keeps no KV cache")


@dataclass
class RobertaConfig:
    """The fields of a RoBERTa or BERT config.json that the computation reads.

    model_type "roberta" counts positions from pad_token_id + 1; "bert" from 0.
    classifier_dropout: dropout inside the classification head (None: hidden_dropout_prob); read from
    `classifier_dropout`, or from `cls_dropout` as the LoRA/AdaLoRA scripts name it.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 1
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: Optional[float] = None
    num_labels: int = 2

    def __post_init__(self):
        if self.model_type not in ("roberta", "bert"):
            raise ValueError(f"config.json: model_type={self.model_type!r}; this file builds 'roberta' and 'bert'")
        if self.positions_after_padding and self.pad_token_id is None:
            raise ValueError("config.json: pad_token_id is null; RoBERTa's positions count from it")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"config.json: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        activation(self.hidden_act)

    @property
    def positions_after_padding(self) -> bool:
        return self.model_type == "roberta"

    @classmethod
    def from_hf(cls, d: dict) -> "RobertaConfig":
        model_type = require_key(d, "model_type")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config.json: position_embedding_type={d['position_embedding_type']!r} "
                             "is not supported (only 'absolute')")
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("config.json: is_decoder / add_cross_attention: only the encoder is supported")
        # cls_dropout (the GLUE scripts' flag) wins over transformers' classifier_dropout when both are set.
        cls_dropout = d["cls_dropout"] if d.get("cls_dropout") is not None else d.get("classifier_dropout")
        return cls(
            model_type=model_type,
            vocab_size=require_key(d, "vocab_size"),
            hidden_size=require_key(d, "hidden_size"),
            num_hidden_layers=require_key(d, "num_hidden_layers"),
            num_attention_heads=require_key(d, "num_attention_heads"),
            intermediate_size=require_key(d, "intermediate_size"),
            max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 2),
            hidden_act=d.get("hidden_act", "gelu"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            pad_token_id=d.get("pad_token_id", 1 if model_type == "roberta" else 0),
            hidden_dropout_prob=d.get("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob=d.get("attention_probs_dropout_prob", 0.1),
            classifier_dropout=cls_dropout,
            num_labels=labels_from_hf(d),
        )


# -- building blocks shared with deberta_v2.py ------------------------------------------------------

class DenseAddNorm(nn.Module):
    """A post-LN sublayer's exit: LayerNorm(dropout(dense(x)) + residual). (B, T, in) -> (B, T, out)."""

    def __init__(self, lora: Optional[LoRAConfig], path: str, in_features: int, out_features: int,
                 eps: float, dropout: float, roles: tuple):
        super().__init__()
        self.dense = make_linear(lora, f"{path}.dense", in_features, out_features, roles=roles)
        self.LayerNorm = nn.LayerNorm(out_features, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Intermediate(nn.Module):
    """The FFN's first half: act(dense(x)), (B, T, d) -> (B, T, d_ff)."""

    def __init__(self, lora: Optional[LoRAConfig], path: str, d: int, d_ff: int, act: str):
        super().__init__()
        self.dense = make_linear(lora, f"{path}.dense", d, d_ff, roles=("intermediate",))
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


def key_padding_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(B, T) of 1/0 -> (B, 1, 1, T) bool, True where a key may be attended; None when nothing is padded
    (lets SDPA pick its fused kernels). Pad queries still attend to the real tokens: their outputs are
    never read by a real position, so they are left defined but meaningless."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


# -- the encoder ---------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head self-attention through SDPA. (B, T, d) -> (B, T, d)."""

    def __init__(self, cfg: RobertaConfig, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.query = make_linear(lora, f"{path}.query", d, d, roles=("query",))
        self.key = make_linear(lora, f"{path}.key", d, d, roles=("key",))
        self.value = make_linear(lora, f"{path}.value", d, d, roles=("value",))
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, T, d = x.shape

        def heads(t):  # (B, T, d) -> (B, H, T, d / H)
            return t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                                           attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, T, d)


class Attention(nn.Module):
    def __init__(self, cfg: RobertaConfig, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        d = cfg.hidden_size
        self.self = SelfAttention(cfg, lora, f"{path}.self")
        self.output = DenseAddNorm(lora, f"{path}.output", d, d, cfg.layer_norm_eps, cfg.hidden_dropout_prob,
                                   roles=("attention.output",))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class EncoderLayer(nn.Module):
    """x -> LN(x + attn(x)) -> LN(. + W_out act(W_in .)): BERT's post-LN block."""

    def __init__(self, cfg: RobertaConfig, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        d = cfg.hidden_size
        self.attention = Attention(cfg, lora, f"{path}.attention")
        self.intermediate = Intermediate(lora, f"{path}.intermediate", d, cfg.intermediate_size, cfg.hidden_act)
        self.output = DenseAddNorm(lora, f"{path}.output", cfg.intermediate_size, d, cfg.layer_norm_eps,
                                   cfg.hidden_dropout_prob, roles=("output", "layer.output"))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, cfg: RobertaConfig, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(cfg, lora, f"{path}.layer.{i}") for i in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        for block in self.layer:
            x = block(x, mask)
        return x


class Embeddings(nn.Module):
    """LayerNorm(word + position + token_type), (B, T) ids -> (B, T, d)."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        d = cfg.hidden_size
        self.positions_after_padding = cfg.positions_after_padding
        self.pad_token_id = cfg.pad_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(
            cfg.max_position_embeddings, d, padding_idx=cfg.pad_token_id if cfg.positions_after_padding else None)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if not self.positions_after_padding:
            return torch.arange(T, device=input_ids.device)[None, :]
        # RoBERTa: real tokens get pad + 1, pad + 2, ... in order; pad tokens keep position pad.
        real = input_ids.ne(self.pad_token_id).long()
        return real.cumsum(dim=1) * real + self.pad_token_id

    def forward(self, input_ids, token_type_ids=None, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            position_ids = self.position_ids(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.dropout(self.LayerNorm(x))


class Pooler(nn.Module):
    """tanh(dense(h[:, 0])): (B, T, d) -> (B, d)."""

    def __init__(self, d: int):
        super().__init__()
        self.dense = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))


class RobertaModel(nn.Module):
    """The bare encoder, keys as transformers' RobertaModel: `embeddings.*`, `encoder.*`, `pooler.*`.

    `path` is where this module sits in the full model ("roberta" under a head, "" when it is the
    model), so LoRA targets see the real dotted names.
    """

    base_model_prefix = "roberta"
    ignored_checkpoint_keys = IGNORED_CHECKPOINT_KEYS

    def __init__(self, cfg: RobertaConfig, lora: Optional[LoRAConfig] = None, path: str = "",
                 add_pooling_layer: bool = True):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, lora, f"{path}.encoder" if path else "encoder")
        self.pooler = Pooler(cfg.hidden_size) if add_pooling_layer else None

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> torch.Tensor:
        """(B, T) ids -> (B, T, d) last hidden states."""
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        return self.encoder(x, key_padding_mask(attention_mask))

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                past_key_values=None, use_cache=False) -> ModelOutput:
        """logits and hidden_states are both the (B, T, d) last hidden states (there is no head)."""
        reject_cache(past_key_values, use_cache)
        if labels is not None:
            raise ValueError("labels: the bare encoder has no head to score them; build task='sequence-classification'")
        h = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        return ModelOutput(logits=h, hidden_states=h)


class BertModel(RobertaModel):
    """The same encoder under BERT's prefix (positions from 0 come from cfg.model_type == "bert")."""

    base_model_prefix = "bert"


class RobertaClassificationHead(nn.Module):
    """out_proj(dropout(tanh(dense(dropout(h[:, 0]))))): (B, T, d) -> (B, num_labels)."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        d = cfg.hidden_size
        p = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.dense = nn.Linear(d, d)
        self.dropout = nn.Dropout(p)
        self.out_proj = nn.Linear(d, cfg.num_labels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.dropout(h[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class RobertaForSequenceClassification(nn.Module):
    """Keys: `roberta.embeddings.*`, `roberta.encoder.*`, `classifier.dense.*`, `classifier.out_proj.*`."""

    base_model_prefix = "roberta"
    ignored_checkpoint_keys = IGNORED_CHECKPOINT_KEYS

    def __init__(self, cfg: RobertaConfig, lora: Optional[LoRAConfig] = None):
        super().__init__()
        self.config = cfg
        self.roberta = RobertaModel(cfg, lora, path="roberta", add_pooling_layer=False)
        self.classifier = RobertaClassificationHead(cfg)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                past_key_values=None, use_cache=False) -> ModelOutput:
        reject_cache(past_key_values, use_cache)
        h = self.roberta.encode(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.classifier(h)
        loss = None if labels is None else sequence_classification_loss(logits, labels)
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)


class BertForSequenceClassification(nn.Module):
    """Keys: `bert.embeddings.*`, `bert.encoder.*`, `bert.pooler.dense.*`, `classifier.*`.
    logits = classifier(dropout(pooler(h)))."""

    base_model_prefix = "bert"
    ignored_checkpoint_keys = IGNORED_CHECKPOINT_KEYS

    def __init__(self, cfg: RobertaConfig, lora: Optional[LoRAConfig] = None):
        super().__init__()
        self.config = cfg
        p = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.bert = BertModel(cfg, lora, path="bert", add_pooling_layer=True)
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, position_ids=None,
                past_key_values=None, use_cache=False) -> ModelOutput:
        reject_cache(past_key_values, use_cache)
        h = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids)
        logits = self.classifier(self.dropout(self.bert.pooler(h)))
        loss = None if labels is None else sequence_classification_loss(logits, labels)
        return ModelOutput(logits=logits, loss=loss, hidden_states=h)


def build(hf_config: dict, task: str, num_labels: Optional[int] = None,
          lora: Optional[LoRAConfig] = None) -> nn.Module:
    """A RoBERTa or BERT model (by hf_config["model_type"]) for task "base" or "sequence-classification"."""
    cfg = RobertaConfig.from_hf(hf_config)
    if num_labels is not None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        cfg.num_labels = num_labels
    bert = cfg.model_type == "bert"
    if task == "base":
        return (BertModel if bert else RobertaModel)(cfg, lora)
    if task == "sequence-classification":
        return (BertForSequenceClassification if bert else RobertaForSequenceClassification)(cfg, lora)
    raise ValueError(f"task={task!r}: a {cfg.model_type} encoder builds 'base' or 'sequence-classification'")
