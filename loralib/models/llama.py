"""Llama 1/2/3 (and SmolLM2, TinyLlama, ...): a pre-norm decoder with RMSNorm, rotary positions,
grouped-query attention and a SwiGLU MLP, with LoRA inline on any of the seven projections.

    h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))     n = RMSNorm
    y = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))

Parameter names are the Hugging Face checkpoint names (`model.layers.N.self_attn.q_proj.weight`, ...),
so `loralib.models.from_pretrained` loads a checkpoint without a rename table. Shapes: B batch, T new
tokens, S = cached + new tokens, H query heads, G key/value heads (H % G == 0), D head_dim, d hidden.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..config import LoRAConfig, make_linear
from .cache import KVCache
from .lm_head import head_logits_and_loss
from .outputs import ModelOutput

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
# Roles a LoRAConfig can name, besides dotted suffixes: the long names and the short ones.
ROLES = {"q_proj": ("q_proj", "q"), "k_proj": ("k_proj", "k"), "v_proj": ("v_proj", "v"),
         "o_proj": ("o_proj", "o"), "gate_proj": ("gate_proj", "gate"), "up_proj": ("up_proj", "up"),
         "down_proj": ("down_proj", "down")}


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope: dict = field(default_factory=lambda: {"rope_type": "default"})  # the rope_scaling dict
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    initializer_range: float = 0.02
    num_labels: int = 2
    problem_type: Optional[str] = None

    @property
    def rope_type(self) -> str:
        return self.rope["rope_type"]

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """Read a Hugging Face config.json dict (transformers 4.x `rope_scaling` + `rope_theta`, or 5.x
        `rope_parameters`)."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in d:
                raise ValueError(f"Llama config.json lacks the required key {key!r}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"config.json: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv_heads}")
        act = d.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act={act!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
        if (d.get("partial_rotary_factor") or 1.0) != 1.0:
            raise ValueError("config.json: partial_rotary_factor != 1 is not a Llama feature and is not supported")
        max_pos = d.get("max_position_embeddings", 2048)
        rope, theta = _read_rope(d, max_pos)
        num_labels = d.get("num_labels") or (len(d["id2label"]) if d.get("id2label") else 2)
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                   max_position_embeddings=max_pos, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=theta, rope=rope, hidden_act=act,
                   attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
                   tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   pad_token_id=d.get("pad_token_id"), initializer_range=d.get("initializer_range", 0.02),
                   num_labels=num_labels, problem_type=d.get("problem_type"))


def _read_rope(d: dict, max_pos: int) -> Tuple[dict, float]:
    """The rope dict with its rope_type and required fields checked, and the base theta."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json: rope_scaling.rope_type={rope_type!r} is not supported; "
                         f"supported: {list(ROPE_TYPES)}")
    rope["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):
        rope.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings", max_pos))
    required = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type, ())
    for key in required:
        if rope.get(key) is None:
            raise ValueError(f"config.json: rope_scaling.{key} is required for rope_type={rope_type!r}")
    return rope, theta


# -- rotary position embedding ---------------------------------------------------------------------

def rope_frequencies(config: LlamaConfig, seq_len: Optional[int] = None) -> Tuple[torch.Tensor, float]:
    """(D/2,) inverse frequencies theta^(-2i/D), rescaled as config.rope names, and the factor that
    multiplies cos and sin (YaRN's attention temperature; 1 otherwise). `seq_len` only matters for
    "dynamic" (NTK), which raises the base once a sequence outgrows max_position_embeddings."""
    dim, base, rope = config.head_dim, config.rope_theta, config.rope
    kind = rope["rope_type"]
    if kind == "dynamic":
        longest = max(seq_len or 0, config.max_position_embeddings)
        factor = rope["factor"]
        base = base * ((factor * longest / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":  # positions divided by factor, i.e. frequencies divided by it
        return inv_freq / rope["factor"], 1.0
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, rope), 1.0
    if kind == "yarn":
        return _yarn_frequencies(inv_freq, rope, dim, base)
    return inv_freq, 1.0


def _llama3_frequencies(inv_freq: torch.Tensor, rope: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than L/low_freq_factor are stretched by `factor`, those shorter than
    L/high_freq_factor kept, and the band between blended linearly in L/wavelength (L = original context)."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    context = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    stretched = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, stretched)


def _yarn_frequencies(inv_freq: torch.Tensor, rope: dict, dim: int, base: float) -> Tuple[torch.Tensor, float]:
    """YaRN (Peng et al., 2023): dimensions that rotate fewer than beta_slow times over the original
    context are interpolated (divided by factor), those that rotate more than beta_fast times kept, with a
    linear ramp between; cos/sin are scaled by 0.1 ln(factor) + 1 (or the ratio of the mscale terms)."""
    factor, context = rope["factor"], rope["original_max_position_embeddings"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def dim_for_rotations(n):  # the dimension index whose wavelength fits n times into the context
        return dim * math.log(context / (n * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(rope.get("beta_fast") or 32), dim_for_rotations(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos and sin of position * inv_freq, (B, T, D) each; the halves repeat, as rotate_half expects."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rebuild_buffers(self) -> None:
        """Recompute inv_freq (it is derived, never in a checkpoint), e.g. after building on meta."""
        device = self.inv_freq.device if self.inv_freq.device.type != "meta" else "cpu"
        inv_freq, self.attention_scaling = rope_frequencies(self.config)
        self.inv_freq = inv_freq.to(device)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scale = self.inv_freq, self.attention_scaling
        if self.config.rope_type == "dynamic":
            # Stateless form of dynamic NTK: frequencies follow the longest position of this forward.
            longest = int(position_ids.max()) + 1
            if longest > self.config.max_position_embeddings:
                inv_freq, scale = rope_frequencies(self.config, longest)
                inv_freq = inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq.float()  # (B, T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, D) rotated by the angles in cos, sin (B, T, D)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


# -- blocks ----------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the statistic taken in fp32 and cast back before the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm with its backward written out: it keeps x (in its own dtype, not an fp32 copy) and 1/rms
    (B, T, 1), and takes fewer passes over (B, T, d) than autograd's pow/mean/rsqrt/mul chain.
    With x^ = x / rms and gn = the gradient reaching x^ (grad * weight):
        d/dx = (gn - x^ mean(gn x^)) / rms,   d/dweight = sum over tokens of grad * x^."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.float() * rstd
        grad_weight = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x_hat.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # the forward cast x^ to x.dtype before the weight; its gradient passes through that cast
            gn = (grad * weight).to(x.dtype).float()
            dot = (gn * x_hat).mean(-1, keepdim=True)
            grad_x = gn.sub_(x_hat.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def _proj(lora, path, name, n_in, n_out, bias):
    return make_linear(lora, f"{path}.{name}", n_in, n_out, bias=bias, roles=ROLES[name])


class Attention(nn.Module):
    """Grouped-query self-attention: H query heads share G key/value heads in groups of H / G."""

    def __init__(self, config: LlamaConfig, layer_idx: int, path: str, lora: Optional[LoRAConfig]):
        super().__init__()
        c, D = config, config.head_dim
        self.layer_idx, self.head_dim = layer_idx, D
        self.n_heads, self.n_kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.q_proj = _proj(lora, path, "q_proj", c.hidden_size, c.num_attention_heads * D, c.attention_bias)
        self.k_proj = _proj(lora, path, "k_proj", c.hidden_size, c.num_key_value_heads * D, c.attention_bias)
        self.v_proj = _proj(lora, path, "v_proj", c.hidden_size, c.num_key_value_heads * D, c.attention_bias)
        self.o_proj = _proj(lora, path, "o_proj", c.num_attention_heads * D, c.hidden_size, c.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                is_causal: bool, cache: Optional[KVCache]) -> torch.Tensor:
        """x (B, T, d); mask (B, 1, T, S) bool (True = attend) or None; returns (B, T, d)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, G, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                                    # (B, G, S, D)
        out = self._attend(q, k, v, mask, is_causal)                                     # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q, k, v, mask, is_causal):
        """Query head h reads key/value head h // (H / G)."""
        B, H, T, D = q.shape
        G = self.n_kv_heads
        if G == H:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        if T == 1:
            # One new token: its H / G query heads per group act as H / G queries of that group's single
            # key/value head, so no copy of the cache is made. mask (B, 1, 1, S) broadcasts over them.
            out = F.scaled_dot_product_attention(q.view(B, G, H // G, D), k, v, attn_mask=mask)
            return out.reshape(B, H, 1, D)  # some CUDA kernels return a strided output
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
        # Masked GQA falls back to slow kernels on most backends; give SDPA the repeated heads instead.
        k = k[:, :, None].expand(B, G, H // G, *k.shape[2:]).reshape(B, H, *k.shape[2:])
        v = v[:, :, None].expand(B, G, H // G, *v.shape[2:]).reshape(B, H, *v.shape[2:])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), (B, T, d) -> (B, T, d)."""

    def __init__(self, config: LlamaConfig, path: str, lora: Optional[LoRAConfig]):
        super().__init__()
        c = config
        self.gate_proj = _proj(lora, path, "gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.up_proj = _proj(lora, path, "up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.down_proj = _proj(lora, path, "down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)
        self.act = _ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is F.silu:
            return self.down_proj(_SiLUGate.apply(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class _SiLUGate(torch.autograd.Function):
    """silu(g) * u for g, u (B, T, I). Autograd would keep silu(g) as well as g and u for backward;
    here silu(g) is recomputed from g instead, one (B, T, I) activation less per layer:
        d/du = grad * silu(g),   d/dg = grad * u * silu'(g)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g).mul_(u)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g, u = ctx.saved_tensors
        grad_g = torch.ops.aten.silu_backward(grad * u, g) if ctx.needs_input_grad[0] else None
        grad_u = F.silu(g).mul_(grad) if ctx.needs_input_grad[1] else None
        return grad_g, grad_u


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, path: str, lora: Optional[LoRAConfig]):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, f"{path}.self_attn", lora)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, f"{path}.mlp", lora)

    def forward(self, x, cos, sin, mask, is_causal, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def positions_from_mask(attention_mask: torch.Tensor, n_new: int) -> torch.Tensor:
    """(B, S) 1/0 mask -> (B, n_new) positions of the last n_new tokens: the count of real tokens
    before each one, so a left-padded row starts at 0 (pads get 1, as transformers' generate gives them)."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -n_new:]


def attention_mask_for(attention_mask: Optional[torch.Tensor], n_new: int, n_past: int
                       ) -> Tuple[Optional[torch.Tensor], bool]:
    """The SDPA mask (B, 1, T, S) bool, or None plus is_causal when the plain causal rule suffices.

    Query t (absolute position n_past + t) sees key s when s <= n_past + t and s is not padding. A query
    that is itself padding would see nothing, which turns softmax into NaN; it sees itself instead (its
    output is never used by a real token)."""
    # Under torch.compile the data-dependent check would break the graph: the explicit mask is built instead
    # (for a mask of all ones it equals the causal rule).
    has_padding = attention_mask is not None and (torch.compiler.is_compiling() or not bool(attention_mask.all()))
    if not has_padding:
        if n_new == 1:
            return None, False                      # one query sees every key
        if n_past == 0:
            return None, True                       # square causal
    total = n_past + n_new
    device = attention_mask.device if attention_mask is not None else None
    query_pos = torch.arange(n_past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]                       # (1, 1, T, S)
    if has_padding:
        mask = (mask & attention_mask.bool()[:, None, None, :]) | (key_pos == query_pos)
    return mask, False


class LlamaModel(nn.Module):
    """The decoder stack: embed_tokens, layers, norm. forward -> ModelOutput whose `hidden_states` (and
    `logits`, for a uniform interface) are the final-norm hidden states (B, T, d)."""

    base_model_prefix = "model"
    # Checkpoints from transformers < 4.31 stored the derived rotary frequencies.
    ignored_checkpoint_keys = (r"(.*\.)?rotary_emb\.inv_freq",)

    def __init__(self, config: LlamaConfig, lora: Optional[LoRAConfig] = None, path: str = ""):
        super().__init__()
        self.config = config
        prefix = f"{path}." if path else ""
        pad = config.pad_token_id if config.pad_token_id is not None and 0 <= config.pad_token_id < config.vocab_size \
            else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList([DecoderLayer(config, i, f"{prefix}layers.{i}", lora)
                                     for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, labels=None, token_type_ids=None) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, S) over cached + new tokens; returns hidden (B, T, d).
        (labels and token_type_ids are accepted for the shared interface and ignored.)"""
        B, T = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(len(self.layers))
        n_past = cache.seq_len if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, n_past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                             f"(batch, cached + new tokens) = {(B, n_past + T)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = positions_from_mask(attention_mask, T)
            else:
                position_ids = torch.arange(n_past, n_past + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        mask, is_causal = attention_mask_for(attention_mask, T, n_past)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, is_causal, cache)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        return ModelOutput(logits=x, past_key_values=cache if use_cache else None, hidden_states=x)


class LlamaForCausalLM(nn.Module):
    """LlamaModel under `model.` plus `lm_head` (d -> vocab, no bias), tied to embed_tokens when
    config.tie_word_embeddings (then both keys appear in state_dict(), as in transformers)."""

    base_model_prefix = "model"
    ignored_checkpoint_keys = LlamaModel.ignored_checkpoint_keys

    def __init__(self, config: LlamaConfig, lora: Optional[LoRAConfig] = None):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, lora, path="model")
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, token_type_ids=None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False, logits_to_keep: int = 0) -> ModelOutput:
        """logits (B, T, vocab), or (B, logits_to_keep, vocab) for the last positions only (generation
        needs just the last one); loss = mean next-token cross-entropy over labels != -100 (when it will
        be differentiated, its gradient is computed in the forward already; logits still carry gradients)."""
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep and labels cannot be combined: the loss needs every position")
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        hidden = out.hidden_states
        logits, loss = head_logits_and_loss(self.lm_head, hidden, labels, logits_to_keep)
        return ModelOutput(logits=logits, loss=loss, past_key_values=out.past_key_values, hidden_states=hidden)


class LlamaForSequenceClassification(nn.Module):
    """LlamaModel under `model.` plus `score` (d -> num_labels, no bias) read at each row's last real
    token; MSE loss when num_labels == 1 (regression), cross-entropy otherwise."""

    base_model_prefix = "model"
    ignored_checkpoint_keys = LlamaModel.ignored_checkpoint_keys

    def __init__(self, config: LlamaConfig, lora: Optional[LoRAConfig] = None, num_labels: Optional[int] = None):
        super().__init__()
        self.config = config
        self.num_labels = num_labels or config.num_labels
        self.model = LlamaModel(config, lora, path="model")
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, token_type_ids=None,
                position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[KVCache] = None,
                use_cache: bool = False) -> ModelOutput:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        hidden = out.hidden_states                                            # (B, T, d)
        last = last_token_index(input_ids, attention_mask, self.config.pad_token_id)
        logits = self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])  # (B, labels)
        loss = None if labels is None else classification_loss(logits, labels, self.num_labels,
                                                                self.config.problem_type)
        return ModelOutput(logits=logits, loss=loss, past_key_values=out.past_key_values, hidden_states=hidden)


def last_token_index(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                     pad_token_id: Optional[int]) -> torch.Tensor:
    """(B,) index of each row's rightmost real token (left or right padding): from attention_mask,
    else from pad_token_id, else the last position."""
    T = input_ids.shape[1]
    if attention_mask is not None:
        real = attention_mask[:, -T:].bool()
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        return torch.full((input_ids.shape[0],), T - 1, dtype=torch.long, device=input_ids.device)
    return (torch.arange(T, device=input_ids.device) * real).argmax(-1)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int,
                        problem_type: Optional[str] = None) -> torch.Tensor:
    """MSE for regression (num_labels == 1), BCE-with-logits for multi-label (float labels of shape
    (B, num_labels)), cross-entropy otherwise; problem_type from config.json overrides the guess."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float()) if num_labels == 1 \
            else F.mse_loss(logits.float(), labels.float())
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.view(-1, num_labels).float(), labels.view(-1))


TASKS = {"causal-lm": LlamaForCausalLM, "sequence-classification": LlamaForSequenceClassification,
         "base": LlamaModel}


def build(hf_config: dict, task: str, num_labels: Optional[int] = None,
          lora: Optional[LoRAConfig] = None) -> nn.Module:
    """The model for `task` ("causal-lm", "sequence-classification", "base") from a config.json dict,
    randomly initialised (torch's defaults); `loralib.models.from_pretrained` loads the weights."""
    config = LlamaConfig.from_hf(hf_config)
    if task == "causal-lm":
        return LlamaForCausalLM(config, lora)
    if task == "sequence-classification":
        return LlamaForSequenceClassification(config, lora, num_labels)
    if task == "base":
        return LlamaModel(config, lora)
    raise ValueError(f"task={task!r} is not a Llama task; choose one of {list(TASKS)}")
