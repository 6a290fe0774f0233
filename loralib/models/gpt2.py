"""GPT-2 (small, medium, large, xl) with LoRA inline.

The architecture (Radford et al., 2019): token + learned position embeddings, n_layer pre-LayerNorm
blocks x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)), a final ln_f, and an LM head tied to the token
embedding. Attention is causal multi-head attention from one fused projection c_attn = [q | k | v];
the MLP is c_fc -> gelu (tanh approximation, "gelu_new") -> c_proj.

Parameter names are those of Hugging Face's GPT-2 checkpoints, so `load_state_dict` takes them as they
are. Every projection (c_attn, c_proj, c_fc) stores its weight (in, out), as OpenAI's Conv1D did, so
they are built with fan_in_fan_out=True. Which of them carry LoRA is decided by `loralib.LoRAConfig`
through `make_linear`; c_attn is a fused projection of 3 chunks, so LoRAConfig.enable_lora picks the
chunks (the LoRA paper adapted q and v: enable_lora=(True, False, True)).

Shapes: B batch, T new tokens, S = cached + new tokens, C = n_embd, H = n_head, D = C / H, V = vocab.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import LoRAConfig, make_linear
from .cache import KVCache
from .lm_head import head_logits_and_loss
from .outputs import ModelOutput

# The activations a GPT-2 config can name. "gelu_new" (OpenAI's) is the tanh approximation of GELU;
# F.gelu(approximate="tanh") computes it in one kernel and keeps only its input for backward.
_ACTIVATIONS = {
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "gelu_fast": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# Old checkpoints carry each layer's causal mask as buffers `h.N.attn.bias` / `h.N.attn.masked_bias`;
# we build masks on the fly, so the loader skips those keys (regexes matched against the whole key).
IGNORED_CHECKPOINT_KEYS = (r"(.*\.)?h\.\d+\.attn\.(masked_)?bias",)

# Hugging Face names for the same fields (GPT2Config.attribute_map); a config.json may use either.
_ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
            "n_positions": "max_position_embeddings"}


@dataclass
class GPT2Config:
    """The fields of a Hugging Face GPT-2 config.json that the architecture uses.

    Defaults are GPT-2 small's (= transformers' GPT2Config defaults). n_inner=None means 4 * n_embd.
    scale_attn_by_inverse_layer_idx divides layer i's attention scores by (i + 1) as well (Mistral's
    GPT-2 runs); reorder_and_upcast_attn computes the attention in fp32 whatever the model's dtype.
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[Union[int, list]] = 50256
    num_labels: int = 2

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(f"GPT2Config: activation_function={self.activation_function!r} is not supported; "
                             f"supported: {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_ff(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_hf(cls, d: dict) -> "GPT2Config":
        """Read a Hugging Face GPT-2 config.json dict. vocab_size, n_embd, n_layer and n_head (or their
        aliases hidden_size, num_hidden_layers, num_attention_heads) are required."""
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config.json: model_type={d.get('model_type')!r} is not 'gpt2'")
        if d.get("add_cross_attention"):
            raise ValueError("config.json: add_cross_attention=True (GPT-2 as a decoder of an "
                             "encoder-decoder model) is not supported")
        values = {}
        for f in fields(cls):
            for key in (f.name, _ALIASES.get(f.name)):
                if key is not None and key in d and d[key] is not None:
                    values[f.name] = d[key]
                    break
        for required in ("vocab_size", "n_embd", "n_layer", "n_head"):
            if required not in values:
                raise ValueError(f"config.json: required key {required!r} is missing")
        if "n_positions" not in values and d.get("n_ctx") is not None:
            values["n_positions"] = d["n_ctx"]
        if "num_labels" not in values and isinstance(d.get("id2label"), dict):
            values["num_labels"] = len(d["id2label"])
        return cls(**values)


# -- attention masks ---------------------------------------------------------------------------------

def positions_from_mask(attention_mask: Optional[torch.Tensor], past: int, T: int,
                        device: torch.device) -> torch.Tensor:
    """Position ids (B or 1, T) of the T new tokens. With a mask, a token's position counts the real
    tokens before it (cumsum - 1), so a left-padded row starts at 0; pad slots get 0."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device).unsqueeze(0)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)[:, -T:]


def attention_bias(attention_mask: Optional[torch.Tensor], past: int, T: int,
                   device: torch.device) -> Tuple[Optional[torch.Tensor], bool]:
    """(mask, is_causal) for F.scaled_dot_product_attention over S = past + T keys.

    With no padding, a prompt uses SDPA's own causal path and a single new token needs no mask.
    Otherwise a boolean (B, 1, T, S) mask, True where query t may attend key s: s is not padding and
    s <= past + t. A query at a pad slot would see nothing and give NaN, so it sees itself; its output is
    never read by a real token (pad keys are masked) and callers ignore pad positions.
    """
    # Under torch.compile the data-dependent check would break the graph: the explicit mask is built instead
    # (for a mask of all ones it equals the causal rule).
    no_padding = attention_mask is None or (not torch.compiler.is_compiling() and bool(attention_mask.all()))
    if no_padding and past == 0:
        return None, T > 1
    if no_padding and T == 1:
        return None, False
    S = past + T
    q_pos = torch.arange(past, S, device=device).unsqueeze(1)  # (T, 1)
    k_pos = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    mask = k_pos <= q_pos  # (T, S)
    if not no_padding:
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        mask = mask | (k_pos == q_pos)
    return mask, False


# -- the model ---------------------------------------------------------------------------------------

class GPT2Attention(nn.Module):
    """Causal self-attention: c_attn (C -> 3C, fused q|k|v), SDPA over H heads, c_proj (C -> C)."""

    def __init__(self, config: GPT2Config, layer_idx: int, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        C = config.n_embd
        self.n_head, self.head_dim, self.layer_idx = config.n_head, config.head_dim, layer_idx
        self.c_attn = make_linear(lora, f"{path}.c_attn", C, 3 * C, bias=True, fan_in_fan_out=True,
                                  roles=("c_attn",), chunks=3)
        self.c_proj = make_linear(lora, f"{path}.c_proj", C, C, bias=True, fan_in_fan_out=True,
                                  roles=("attn.c_proj",))
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.upcast = config.reorder_and_upcast_attn
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # load_state_dict drops the old mask buffers (IGNORED_CHECKPOINT_KEYS) too.
        self.register_load_state_dict_pre_hook(_drop_mask_buffers)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool,
                cache: Optional[KVCache]) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, S, D)
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.to(dtype).transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def _drop_mask_buffers(module, state_dict, prefix, *args):
    for name in ("bias", "masked_bias"):
        state_dict.pop(prefix + name, None)


class GPT2MLP(nn.Module):
    """c_fc (C -> d_ff), activation, c_proj (d_ff -> C)."""

    def __init__(self, config: GPT2Config, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        C = config.n_embd
        self.c_fc = make_linear(lora, f"{path}.c_fc", C, config.d_ff, bias=True, fan_in_fan_out=True,
                                roles=("c_fc",))
        self.c_proj = make_linear(lora, f"{path}.c_proj", config.d_ff, C, bias=True, fan_in_fan_out=True,
                                  roles=("mlp.c_proj",))
        self.act = _ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    """Pre-LN residual block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPT2Config, layer_idx: int, lora: Optional[LoRAConfig], path: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx, lora, f"{path}.attn")
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, lora, f"{path}.mlp")

    def forward(self, x, mask, is_causal, cache):
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """The transformer without a head: keys wte, wpe, h.N.*, ln_f.

    `prefix` is the module's own dotted path inside a wrapping model ("transformer" under a head), so
    LoRA target paths read e.g. "transformer.h.3.attn.c_attn".
    """

    base_model_prefix = "transformer"
    ignored_checkpoint_keys = IGNORED_CHECKPOINT_KEYS

    def __init__(self, config: GPT2Config, lora: Optional[LoRAConfig] = None, prefix: str = ""):
        super().__init__()
        self.config = config
        dot = f"{prefix}." if prefix else ""
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i, lora, f"{dot}h.{i}") for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        _init_weights(self, config)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, S) of 1/0 over cached + new tokens. A given cache is
        extended in place; use_cache=True starts one. Returns the last hidden states (B, T, C) as both
        `logits` and `hidden_states` (the bare model has no head; labels are not used)."""
        B, T = input_ids.shape
        cache = past_key_values if past_key_values is not None else (
            KVCache(self.config.n_layer) if use_cache else None)
        past = cache.seq_len if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"{(B, past + T)} (batch, cached + new tokens)")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, T, input_ids.device)
        if past + T > self.config.n_positions and int(position_ids.max()) >= self.config.n_positions:
            raise ValueError(f"sequence reaches position {int(position_ids.max())}, but GPT-2 has "
                             f"n_positions={self.config.n_positions} learned positions")

        x = self.wte(input_ids) + self.wpe(position_ids)
        if token_type_ids is not None:
            x = x + self.wte(token_type_ids)  # GPT-2 embeds token types with the token table
        x = self.drop(x)
        mask, is_causal = attention_bias(attention_mask, past, T, input_ids.device)
        for block in self.h:
            x = block(x, mask, is_causal, cache)
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        return ModelOutput(logits=x, past_key_values=cache, hidden_states=x)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with the LM head: logits (B, T, V) = ln_f(h) @ wte^T. Keys transformer.*, lm_head.weight."""

    base_model_prefix = "transformer"
    ignored_checkpoint_keys = IGNORED_CHECKPOINT_KEYS

    def __init__(self, config: GPT2Config, lora: Optional[LoRAConfig] = None):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, lora, prefix="transformer")
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.tie_weights()
        else:
            nn.init.normal_(self.lm_head.weight, std=config.initializer_range)

    def tie_weights(self) -> None:
        """Share lm_head.weight with transformer.wte.weight (again, e.g. after loading or to_empty)."""
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, logits_to_keep: int = 0) -> ModelOutput:
        """logits (B, T, V), or (B, logits_to_keep, V) for the last positions only (generation). With
        labels (B, T): loss = mean cross-entropy of token t + 1 given tokens <= t, skipping -100."""
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep and labels cannot be combined: the loss needs every position")
        out = self.transformer(input_ids, attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache)
        h = out.hidden_states
        logits, loss = head_logits_and_loss(self.lm_head, h, labels, logits_to_keep)
        return ModelOutput(logits=logits, loss=loss, past_key_values=out.past_key_values, hidden_states=h)


class GPT2ForSequenceClassification(nn.Module):
    """GPT-2 scoring the last real token: logits (B, num_labels) = score(h[b, last_b]). Keys transformer.*,
    score.weight (no bias). num_labels == 1 is regression (MSE)."""

    base_model_prefix = "transformer"
    ignored_checkpoint_keys = IGNORED_CHECKPOINT_KEYS

    def __init__(self, config: GPT2Config, num_labels: Optional[int] = None, lora: Optional[LoRAConfig] = None):
        super().__init__()
        self.config = config
        self.num_labels = num_labels if num_labels is not None else config.num_labels
        self.transformer = GPT2Model(config, lora, prefix="transformer")
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False) -> ModelOutput:
        out = self.transformer(input_ids, attention_mask, token_type_ids=token_type_ids,
                               position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache)
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)  # (B,)
        pooled = out.hidden_states[torch.arange(input_ids.shape[0], device=last.device), last]  # (B, C)
        logits = self.score(pooled)
        loss = classification_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states)


def last_token_index(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                     pad_token_id: Optional[int]) -> torch.Tensor:
    """(B,) index among the T new tokens of each row's last real token: the last 1 of attention_mask,
    else (as transformers does) the last token that is not pad_token_id. Works for left and right padding."""
    B, T = input_ids.shape
    if attention_mask is not None:
        real = attention_mask[:, -T:].bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    elif B == 1:
        return torch.full((1,), T - 1, device=input_ids.device, dtype=torch.long)
    else:
        raise ValueError("GPT2ForSequenceClassification needs attention_mask (or config pad_token_id) to "
                         "find the last token of each row in a batch of more than one")
    return (torch.arange(T, device=input_ids.device) * real).argmax(-1)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MSE for one output (regression, e.g. STS-B); cross-entropy for integer labels; binary
    cross-entropy for float multi-label targets (transformers' problem_type rules)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))
    if labels.dtype.is_floating_point:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels.view(-1))


def _init_weights(model: GPT2Model, config: GPT2Config) -> None:
    """GPT-2's initialisation for a model trained from scratch: N(0, 0.02) weights, zero biases, and the
    residual projections (c_proj) scaled by 1 / sqrt(2 n_layer). LoRA factors keep their own init.
    Weights are stored (in, out) contiguous, as in the checkpoints."""
    std = config.initializer_range
    for emb in (model.wte, model.wpe):
        nn.init.normal_(emb.weight, std=std)
    for block in model.h:
        for name, layer in (("c_attn", block.attn.c_attn), ("c_proj", block.attn.c_proj),
                            ("c_fc", block.mlp.c_fc), ("c_proj", block.mlp.c_proj)):
            s = std / math.sqrt(2 * config.n_layer) if name == "c_proj" else std
            layer.weight.data = torch.empty(layer.in_features, layer.out_features,
                                            dtype=layer.weight.dtype, device=layer.weight.device).normal_(std=s)
            nn.init.zeros_(layer.bias)


TASKS = {"causal-lm": GPT2LMHeadModel, "sequence-classification": GPT2ForSequenceClassification,
         "base": GPT2Model}


def build(hf_config: dict, task: str, num_labels: Optional[int] = None,
          lora: Optional[LoRAConfig] = None) -> nn.Module:
    """The model for `task` ("causal-lm", "sequence-classification" or "base") from a config.json dict,
    randomly initialised (load the checkpoint with load_state_dict)."""
    config = GPT2Config.from_hf(hf_config)
    if task == "causal-lm":
        return GPT2LMHeadModel(config, lora)
    if task == "sequence-classification":
        return GPT2ForSequenceClassification(config, num_labels, lora)
    if task == "base":
        return GPT2Model(config, lora)
    raise ValueError(f"task={task!r} is not one of {sorted(TASKS)}")
