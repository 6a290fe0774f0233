"""T5 (v1.0 as in t5-small/base/large, and v1.1 / google/t5-v1_1-*): an encoder-decoder transformer with
relative position buckets, RMS-style layer norms, no biases, and LoRA inline on any projection.

    encoder, each block:  h = x + o(attn(q(n(x)), k(n(x)), v(n(x))) + bias_enc)          n = T5 LayerNorm
                          y = h + FF(n(h))
    decoder, each block:  h = x + o(attn_causal(..., n(x)) + bias_dec)                   cached keys/values
                          h = h + o'(attn(q'(n(h)), k'(enc), v'(enc)))                    cross-attention
                          y = h + FF(n(h))
    FF v1.0 (relu):       wo(relu(wi(x)));   v1.1 (gated-gelu): wo(gelu_tanh(wi_0(x)) * wi_1(x))
    logits = lm_head(n(dec) * d_model^-0.5) when the head is tied to the embedding (v1.0), else lm_head(n(dec))
    (config.json's scale_decoder_outputs, written by transformers >= 5, overrides the rescale)

Attention scores are q k^T with no 1/sqrt(D) (T5 folds it into the initialisation) plus a learned bias per
head and relative-position bucket; the bias table lives in block 0 of each stack and the other blocks reuse
its output. Buckets (Raffel et al. 2020, Sec. 2.1): half the buckets for each direction in the encoder (only
the past in the decoder); distances below num_buckets/2 (of a direction) get a bucket each, longer ones share
logarithmically wider buckets up to max_distance, beyond which all fall in the last.

Parameter names are the Hugging Face checkpoint names (`encoder.block.N.layer.0.SelfAttention.q.weight`,
`decoder.block.N.layer.1.EncDecAttention.k.weight`, `...layer.1.DenseReluDense.wi_0.weight`, `shared.weight`,
`lm_head.weight`), so `loralib.models.from_pretrained(folder, task="seq2seq-lm")` loads a checkpoint as it is.
Shapes: B batch, T new (query) tokens, S key tokens (cached + new, or the encoder's), H heads, D d_kv, d d_model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LoRAConfig, make_linear
from .cache import KVCache
from .llama import RMSNorm
from .outputs import ModelOutput

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "swish": F.silu}
# Roles a LoRAConfig can name besides dotted suffixes (PEFT's T5 names are the bare "q", "k", "v", "o", "wi", ...).
PROJECTIONS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")


@dataclass
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    @classmethod
    def from_hf(cls, d: dict) -> "T5Config":
        """Read a Hugging Face T5 config.json dict. feed_forward_proj is "relu" (v1.0), "gated-gelu" (v1.1:
        transformers maps it to the tanh GELU "gelu_new") or "[gated-]ACT"."""
        for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if key not in d:
                raise ValueError(f"T5 config.json lacks the required key {key!r}")
        proj = d.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"config.json: feed_forward_proj={proj!r} is not of the form '[gated-]ACT'")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if act not in _ACTIVATIONS:
            raise ValueError(f"config.json: feed_forward_proj={proj!r}: activation {act!r} is not supported; "
                             f"supported: {sorted(_ACTIVATIONS)}")
        if d.get("is_encoder_decoder") is False:
            raise ValueError("config.json: is_encoder_decoder=false (a T5 encoder alone) is not supported")
        pad = d.get("pad_token_id", 0)
        tied = bool(d.get("tie_word_embeddings", True))
        # transformers >= 5 ties v1.1's head too and records the rescale separately (scale_decoder_outputs);
        # the hub's own configs say tie_word_embeddings, which then implies the rescale.
        scale = d.get("scale_decoder_outputs")
        return cls(vocab_size=d["vocab_size"], d_model=d["d_model"], d_kv=d["d_kv"], d_ff=d["d_ff"],
                   num_layers=d["num_layers"], num_decoder_layers=d.get("num_decoder_layers") or d["num_layers"],
                   num_heads=d["num_heads"],
                   relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
                   relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
                   dropout_rate=d.get("dropout_rate", 0.1), layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
                   dense_act_fn=act, is_gated_act=parts[0] == "gated" and len(parts) == 2,
                   tie_word_embeddings=tied, scale_decoder_outputs=tied if scale is None else bool(scale),
                   pad_token_id=0 if pad is None else pad, eos_token_id=d.get("eos_token_id", 1),
                   decoder_start_token_id=d.get("decoder_start_token_id", pad if pad is not None else 0))


# -- relative positions ----------------------------------------------------------------------------

def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each relative position (key - query), same shape, long."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).long() * num_buckets   # keys after the query: the upper half
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)                       # only the past counts; the future is 0
    exact = num_buckets // 2
    # log-spaced buckets between `exact` and max_distance (distance 0 is kept away from log(0) by the where)
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


def position_bias(table: nn.Embedding, n_queries: int, n_keys: int, first: int, bidirectional: bool,
                  max_distance: int) -> torch.Tensor:
    """The learned bias (1, H, T, S) of T queries at positions first..first+T-1 over S keys at 0..S-1;
    table: (num_buckets, H)."""
    queries = torch.arange(first, first + n_queries, device=table.weight.device)[:, None]
    keys = torch.arange(n_keys, device=table.weight.device)[None, :]
    buckets = relative_position_bucket(keys - queries, bidirectional, table.num_embeddings, max_distance)
    return table(buckets).permute(2, 0, 1)[None]


# -- blocks ----------------------------------------------------------------------------------------

def _proj(lora, path, name, n_in, n_out):
    return make_linear(lora, f"{path}.{name}", n_in, n_out, bias=False, roles=(name,))


class Attention(nn.Module):
    """Multi-head attention without score scaling; self-attention (cached keys/values in the decoder) or
    cross-attention over the encoder output (its keys/values computed once per generation)."""

    def __init__(self, config: T5Config, path: str, lora: Optional[LoRAConfig], layer_idx: int,
                 has_relative_bias: bool = False):
        super().__init__()
        c, inner = config, config.num_heads * config.d_kv
        self.n_heads, self.d_kv, self.layer_idx, self.dropout = c.num_heads, c.d_kv, layer_idx, c.dropout_rate
        self.q = _proj(lora, path, "q", c.d_model, inner)
        self.k = _proj(lora, path, "k", c.d_model, inner)
        self.v = _proj(lora, path, "v", c.d_model, inner)
        self.o = _proj(lora, path, "o", inner, c.d_model)
        if has_relative_bias:  # block 0's self-attention holds the table (num_buckets, H) of its stack
            self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.d_kv).transpose(1, 2)                 # (B, H, T, D)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, source: Optional[torch.Tensor] = None,
                cache: Optional["Seq2SeqCache"] = None) -> torch.Tensor:
        """x (B, T, d); bias (B or 1, H, T, S) float: relative bias + mask (-inf-like where masked);
        source: the encoder output (B, S, d) for cross-attention, None for self-attention."""
        B, T, _ = x.shape
        q = self._heads(self.q(x))
        if source is None:
            k, v = self._heads(self.k(x)), self._heads(self.v(x))
            if cache is not None:
                k, v = cache.self_attn.update(self.layer_idx, k, v)                   # (B, H, S, D)
        elif cache is not None and cache.cross[self.layer_idx] is not None:
            k, v = cache.cross[self.layer_idx]
        else:
            k, v = self._heads(self.k(source)), self._heads(self.v(source))
            if cache is not None:
                cache.cross[self.layer_idx] = (k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(B, T, self.n_heads * self.d_kv))


class FeedForward(nn.Module):
    """wo(act(wi x)) (v1.0), or wo(act(wi_0 x) * wi_1 x) (gated, v1.1); dropout before wo."""

    def __init__(self, config: T5Config, path: str, lora: Optional[LoRAConfig]):
        super().__init__()
        c = config
        self.gated = c.is_gated_act
        if self.gated:
            self.wi_0 = _proj(lora, path, "wi_0", c.d_model, c.d_ff)
            self.wi_1 = _proj(lora, path, "wi_1", c.d_model, c.d_ff)
        else:
            self.wi = _proj(lora, path, "wi", c.d_model, c.d_ff)
        self.wo = _proj(lora, path, "wo", c.d_ff, c.d_model)
        self.act = _ACTIVATIONS[c.dense_act_fn]
        self.dropout = nn.Dropout(c.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.dropout(h))


class SelfAttentionLayer(nn.Module):
    def __init__(self, config, path, lora, layer_idx):
        super().__init__()
        self.SelfAttention = Attention(config, f"{path}.SelfAttention", lora, layer_idx, layer_idx == 0)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, bias, cache=None):
        return x + self.dropout(self.SelfAttention(self.layer_norm(x), bias, cache=cache))


class CrossAttentionLayer(nn.Module):
    def __init__(self, config, path, lora, layer_idx):
        super().__init__()
        self.EncDecAttention = Attention(config, f"{path}.EncDecAttention", lora, layer_idx)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x, bias, source, cache=None):
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), bias, source=source, cache=cache))


class FeedForwardLayer(nn.Module):
    def __init__(self, config, path, lora):
        super().__init__()
        self.DenseReluDense = FeedForward(config, f"{path}.DenseReluDense", lora)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x):
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class Block(nn.Module):
    """`layer` = [self-attention, (cross-attention,) feed-forward], the checkpoint's layer.0/1/2."""

    def __init__(self, config: T5Config, path: str, lora: Optional[LoRAConfig], layer_idx: int, is_decoder: bool):
        super().__init__()
        parts = [SelfAttentionLayer(config, f"{path}.layer.0", lora, layer_idx)]
        if is_decoder:
            parts.append(CrossAttentionLayer(config, f"{path}.layer.1", lora, layer_idx))
        parts.append(FeedForwardLayer(config, f"{path}.layer.{len(parts)}", lora))
        self.layer = nn.ModuleList(parts)
        self.is_decoder = is_decoder

    def forward(self, x, self_bias, source=None, cross_bias=None, cache=None):
        x = self.layer[0](x, self_bias, cache)
        if self.is_decoder:
            x = self.layer[1](x, cross_bias, source, cache)
        return self.layer[-1](x)


def key_mask_bias(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(B, S) 1/0 -> (B, 1, 1, S) additive bias: 0 where attended, the dtype's minimum where masked (as
    transformers does, so a row with every key masked averages them instead of producing NaN)."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class Stack(nn.Module):
    """The encoder or the decoder: embed_tokens (shared), block[0..n), final_layer_norm, dropouts."""

    def __init__(self, config: T5Config, embed_tokens: nn.Embedding, path: str, lora: Optional[LoRAConfig],
                 is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.embed_tokens = embed_tokens
        n = config.num_decoder_layers if is_decoder else config.num_layers
        self.block = nn.ModuleList([Block(config, f"{path}.block.{i}", lora, i, is_decoder) for i in range(n)])
        self.max_distance = config.relative_attention_max_distance
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                source: Optional[torch.Tensor] = None, source_mask: Optional[torch.Tensor] = None,
                cache: Optional["Seq2SeqCache"] = None) -> torch.Tensor:
        """input_ids (B, T); attention_mask (B, S) over (cached +) new tokens; source (B, S_enc, d) and
        source_mask (B, S_enc) for the decoder. Returns the final-norm hidden states (B, T, d)."""
        B, T = input_ids.shape
        x = self.dropout(self.embed_tokens(input_ids))
        n_past = cache.seq_len if cache is not None else 0
        S = n_past + T
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, cached + new "
                             f"tokens) = {(B, S)}")
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        bias = position_bias(table, T, S, n_past, not self.is_decoder, self.max_distance).to(x.dtype)  # (1, H, T, S)
        keys = key_mask_bias(attention_mask, x.dtype)
        if keys is not None:
            bias = bias + keys
        if self.is_decoder and T > 1:
            future = torch.arange(S, device=x.device)[None, :] > torch.arange(n_past, S, device=x.device)[:, None]
            bias = bias.masked_fill(future, torch.finfo(x.dtype).min)
        cross = None
        if self.is_decoder:
            cross = key_mask_bias(source_mask, x.dtype)
            if cross is None:
                cross = x.new_zeros(1, 1, 1, 1)
        for block in self.block:
            x = block(x, bias, source, cross, cache)
        if cache is not None:
            cache.self_attn.advance(T)
        return self.dropout(self.final_layer_norm(x))


class Seq2SeqCache:
    """The decoder's self-attention KVCache, and each layer's cross-attention (k, v) of the encoder output."""

    def __init__(self, n_layers: int, capacity: Optional[int] = None):
        self.self_attn = KVCache(n_layers, capacity)
        self.cross: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * n_layers

    @property
    def seq_len(self) -> int:
        return self.self_attn.seq_len

    def reorder(self, index: torch.Tensor) -> None:
        self.self_attn.reorder(index)
        self.cross = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.cross]


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: [start, y_0, ..., y_{T-2}], with -100 read as padding."""
    shifted = torch.cat([labels.new_full((labels.shape[0], 1), start_id), labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == -100, pad_id)


class T5Model(nn.Module):
    """The bare encoder-decoder ("base" task): shared (the token embedding of both stacks), encoder, decoder.
    forward returns the decoder's final hidden states (B, T, d) as `hidden_states` and `logits`."""

    base_model_prefix = ""
    # Old v1.0 checkpoints carry a relative-bias table for the cross-attention that no computation reads.
    ignored_checkpoint_keys = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)

    def __init__(self, config: T5Config, lora: Optional[LoRAConfig] = None):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, self.shared, "encoder", lora, is_decoder=False)
        self.decoder = Stack(config, self.shared, "decoder", lora, is_decoder=True)

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The encoder's output (B, S, d)."""
        return self.encoder(input_ids, attention_mask)

    def decode(self, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
               decoder_input_ids: torch.Tensor, decoder_attention_mask: Optional[torch.Tensor],
               encoder_outputs: Optional[torch.Tensor], cache: Optional[Seq2SeqCache]) -> torch.Tensor:
        """The decoder's final hidden states (B, T, d), encoding input_ids first unless encoder_outputs is given."""
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("T5: give input_ids or encoder_outputs")
            encoder_outputs = self.encode(input_ids, attention_mask)
        return self.decoder(decoder_input_ids, decoder_attention_mask, encoder_outputs, attention_mask, cache)

    def _cache(self, past_key_values: Optional[Seq2SeqCache], use_cache: bool) -> Optional[Seq2SeqCache]:
        if past_key_values is None and use_cache:
            return Seq2SeqCache(len(self.decoder.block))
        return past_key_values

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, encoder_outputs=None, past_key_values=None, use_cache=False) -> ModelOutput:
        if decoder_input_ids is None:
            raise ValueError("T5Model: give decoder_input_ids")
        cache = self._cache(past_key_values, use_cache)
        hidden = self.decode(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                             cache)
        return ModelOutput(logits=hidden, past_key_values=cache if use_cache else None, hidden_states=hidden)


class T5ForConditionalGeneration(T5Model):
    """T5Model plus lm_head (d -> vocab, no bias; tied to shared in v1.0, so both keys appear in state_dict())."""

    def __init__(self, config: T5Config, lora: Optional[LoRAConfig] = None):
        super().__init__(config, lora)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight

    def forward(self, input_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                encoder_outputs: Optional[torch.Tensor] = None, past_key_values: Optional[Seq2SeqCache] = None,
                use_cache: bool = False) -> ModelOutput:
        """logits (B, T, vocab) of the decoder tokens; with labels (B, T) and no decoder_input_ids, the decoder
        reads the labels shifted right and loss = mean cross-entropy over labels != -100 (pad ids included
        when the caller left them as ids, as transformers does). encoder_outputs: a precomputed encode()."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5: give decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        cache = self._cache(past_key_values, use_cache)
        hidden = self.decode(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, encoder_outputs,
                             cache)
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model ** -0.5        # Mesh TensorFlow's rescale before the tied head
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, past_key_values=cache if use_cache else None,
                           hidden_states=hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 20, eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding: (B, 1 + n) ids, the start token then up to max_new_tokens tokens; rows that
        produced eos continue with pad (as transformers' generate returns them). Encoder once, decoder cached."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        c = self.config
        eos = c.eos_token_id if eos_token_id is None else eos_token_id
        source = self.encode(input_ids, attention_mask)
        B = input_ids.shape[0]
        out = input_ids.new_full((B, 1), c.decoder_start_token_id)
        cache = Seq2SeqCache(len(self.decoder.block), capacity=max_new_tokens + 1)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(attention_mask=attention_mask, decoder_input_ids=out[:, -1:], encoder_outputs=source,
                          past_key_values=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1).masked_fill(done, c.pad_token_id)
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == eos
            if bool(done.all()):
                break
        return out


TASKS = {"seq2seq-lm": T5ForConditionalGeneration, "base": T5Model}


def build(hf_config: dict, task: str, num_labels: Optional[int] = None,
          lora: Optional[LoRAConfig] = None) -> nn.Module:
    """The model for `task` ("seq2seq-lm" or "base") from a config.json dict, randomly initialised (torch's
    defaults); `loralib.models.from_pretrained` loads the weights."""
    config = T5Config.from_hf(hf_config)
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a T5 task; choose one of {list(TASKS)}")
    return TASKS[task](config, lora)
