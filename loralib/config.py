"""LoRAConfig: which projections carry an adapter, and which method's layer they get.

Model files call `config.make_linear(path, in_features, out_features, ...)` for every projection they
build; `loralib.inject` uses the same matching on an arbitrary model. The layer type is pluggable:
each method registers a factory under its name (`register_method`), so AdaLoRA's SVDLinear or the LoRA²
layer land in exactly the places plain LoRA would.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch.nn as nn

from . import init_methods, layers

LinearFactory = Callable[..., nn.Module]
_METHODS: Dict[str, LinearFactory] = {}
# enable_lora for "one update over the whole projection, however many chunks it fuses" (see LoRAConfig)
WHOLE_PROJECTION: Tuple[bool, ...] = (True,)


def register_method(name: str, factory: LinearFactory) -> None:
    """factory(config, in_features, out_features, bias=..., fan_in_fan_out=...) -> nn.Module."""
    _METHODS[name] = factory


def target_matches(targets: Union[str, Sequence[str]], path: str, roles: Sequence[str] = ()) -> bool:
    """PEFT's rule, plus roles: a string is a regex that must match the whole dotted path; a list
    matches when an entry equals the path, is a dotted suffix of it, or equals one of the roles the
    model file gives the projection (e.g. "intermediate" or "attention.output" in an encoder layer)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(t == path or path.endswith("." + t) or t in roles for t in targets)


_METHOD_NAMES = {"adalora": "AdaLoRA", "lora2": "LoRA²"}
# method names that are LoRA with another layer or init (the method registry's "dora", "pissa", "lora-ga")
VARIANT_METHODS = {"dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"},
                   "lora-ga": {"init_lora_weights": "lora_ga"}}
_DEFAULTS = {"use_dora": False, "init_lora_weights": True}


def check_combination(method: str, use_dora: bool, init_lora_weights, init_swapped: bool = False) -> None:
    """One ValueError naming both sides of a combination that does not compose."""
    init_name = {"lora_ga": "LoRA-GA"}.get(init_lora_weights, "PiSSA" if init_methods.is_pissa(init_lora_weights)
                                          else f"init_lora_weights={init_lora_weights!r}")
    if method in _METHOD_NAMES:
        if use_dora:
            raise ValueError(f"DoRA (use_dora=True) does not compose with {_METHOD_NAMES[method]} "
                             f"(method={method!r}): its layers have no DoRA form")
        if init_lora_weights is not True:
            raise ValueError(f"{init_name} does not compose with {_METHOD_NAMES[method]} (method={method!r}): "
                             "its layers have their own initialisation")
    if init_swapped and init_methods.mutates_weight(init_lora_weights):
        raise ValueError(f"{init_name} does not compose with LoRA+'s swapped init (init_swapped=True): "
                         "both set the factors")


@dataclass
class LoRAConfig:
    """How to adapt a model.

    r, lora_alpha, lora_dropout, use_rslora: the low-rank update and its scaling (alpha/r or alpha/sqrt r).
    target_modules: names (dotted suffixes or roles) or one regex; see `target_matches`.
    method: "lora" (default), or a method registered by loralib ("adalora", "lora2"); "dora", "pissa" and
        "lora-ga" are read as method "lora" with use_dora=True / init_lora_weights "pissa" / "lora_ga".
    enable_lora: for fused projections (GPT-2's c_attn = q|k|v), which chunks get LoRA;
        None enables every chunk. The LoRA paper used (True, False, True). WHOLE_PROJECTION, the single
        entry (True,), is one low-rank update over the fused projection unchunked (A (r, in), B (3 out, r)):
        PEFT's LoRA on GPT-2's c_attn, and what `inject` builds when given no enable_lora.
    merge_weights: fold B A into W on eval() and out again on train(), as loralib 0.1.2 does.
    init_swapped: LoRA+'s experiments initialised B with kaiming and A with zeros; False keeps LoRA's.
    lora2_k: inner rank of LoRA²'s factors.
    use_dora: DoRA (loralib.dora): a trainable magnitude per output row on top of the low-rank update.
    init_lora_weights: PEFT's names: True (kaiming A, zero B), "gaussian", "pissa", "pissa_niter_<N>" or
        "lora_ga" (then loralib.loraga_init(model, train_step)); see loralib.init_methods.
    rank_pattern, alpha_pattern: PEFT's per-module r and lora_alpha, keyed by module path (or a dotted
        suffix of it), overriding r and lora_alpha there; import_peft records those of the adapter it loads,
        so that a model built from the config save_adapter writes has the imported ranks and scalings.
    Combinations that do not compose (AdaLoRA / LoRA² with DoRA, PiSSA or LoRA-GA; LoRA+'s swapped init
    with PiSSA or LoRA-GA) raise one ValueError naming both.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: Union[str, Tuple[str, ...]] = ("q_proj", "v_proj")
    use_rslora: bool = False
    method: str = "lora"
    enable_lora: Optional[Tuple[bool, ...]] = None
    merge_weights: bool = True
    init_swapped: bool = False
    lora2_k: int = 8
    use_dora: bool = False
    init_lora_weights: Union[bool, str] = True
    rank_pattern: Optional[Dict[str, int]] = None
    alpha_pattern: Optional[Dict[str, float]] = None

    def __post_init__(self):
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = tuple(self.target_modules)
        if isinstance(self.enable_lora, list):  # from JSON: a tuple, so configs read back compare equal
            self.enable_lora = tuple(self.enable_lora)
        if not self.target_modules:
            raise ValueError("LoRAConfig.target_modules is empty: name at least one projection")
        layers._check_hparams(self.r, self.lora_alpha, self.lora_dropout)
        for rank in (self.rank_pattern or {}).values():
            layers._check_hparams(rank, self.lora_alpha, self.lora_dropout)
        for alpha in (self.alpha_pattern or {}).values():
            layers._check_hparams(self.r, alpha, self.lora_dropout)
        init_methods.check_init(self.init_lora_weights)
        if self.method in VARIANT_METHODS:  # "dora" -> method "lora" + use_dora=True, and so on
            self._expand_variant_method()
        check_combination(self.method, self.use_dora, self.init_lora_weights, self.init_swapped)

    def _expand_variant_method(self) -> None:
        name = self.method
        for key, value in VARIANT_METHODS[name].items():
            current = getattr(self, key)
            same_kind = key == "init_lora_weights" and init_methods.is_pissa(current) and init_methods.is_pissa(value)
            if current != value and current != _DEFAULTS[key] and not same_kind:
                raise ValueError(f"LoRAConfig(method={name!r}) sets {key}={value!r}; it was given {key}={current!r}")
            if not same_kind:
                setattr(self, key, value)
        self.method = "lora"

    def matches(self, path: str, roles: Sequence[str] = ()) -> bool:
        return target_matches(self.target_modules, path, roles)

    def replace(self, **changes) -> "LoRAConfig":
        return dataclasses.replace(self, **changes)

    def for_module(self, path: str) -> "LoRAConfig":
        """This config with the module's own r and lora_alpha from rank_pattern / alpha_pattern (the first
        key that is the path or a dotted suffix of it); itself when neither names the module."""
        if not (self.rank_pattern or self.alpha_pattern):
            return self
        r, alpha = _pattern_value(self.rank_pattern, path, self.r), _pattern_value(self.alpha_pattern, path,
                                                                                  self.lora_alpha)
        return self.replace(r=r, lora_alpha=alpha, rank_pattern=None, alpha_pattern=None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = (self.target_modules if isinstance(self.target_modules, str)
                               else list(self.target_modules))
        for key in ("rank_pattern", "alpha_pattern"):  # unset: left out, so configs without stay as they were
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LoRAConfig: unknown keys {unknown}")
        return cls(**d)

    def make_linear(self, path: str, in_features: int, out_features: int, bias: bool = True,
                    fan_in_fan_out: bool = False, roles: Sequence[str] = (), chunks: int = 1) -> nn.Module:
        """The projection at `path`: the method's adapted layer if targeted, else a plain one.

        A plain projection is a `loralib.Linear` with r = 0 (an nn.Linear that can store its weight
        (in, out) for GPT-2's checkpoints). `chunks` > 1 marks a fused projection (q|k|v); with
        enable_lora=WHOLE_PROJECTION it is adapted as one projection (what inject and PEFT do).
        """
        if self.enable_lora == WHOLE_PROJECTION:
            chunks = 1
        if not self.matches(path, roles):
            return layers.Linear(in_features, out_features, r=0, bias=bias, fan_in_fan_out=fan_in_fan_out)
        if self.method not in _METHODS:
            raise ValueError(f"LoRAConfig.method={self.method!r} is unknown; registered: {sorted(_METHODS)}")
        return _METHODS[self.method](self.for_module(path), in_features, out_features, bias=bias,
                                     fan_in_fan_out=fan_in_fan_out, chunks=chunks)


def _pattern_value(pattern: Optional[Dict[str, float]], path: str, default):
    for key, value in (pattern or {}).items():
        if key == path or path.endswith("." + key):
            return value
    return default


def _swap_init(layer: nn.Module) -> None:
    """LoRA+'s experiment init: kaiming-uniform on B, zeros on A (B A is still zero at the start)."""
    import math
    nn.init.zeros_(layer.lora_A)
    nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))


def _lora_factory(config: LoRAConfig, in_features: int, out_features: int, bias: bool = True,
                  fan_in_fan_out: bool = False, chunks: int = 1) -> nn.Module:
    from . import dora

    common = dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                  fan_in_fan_out=fan_in_fan_out, merge_weights=config.merge_weights,
                  use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights, bias=bias)
    if chunks > 1:
        enable = config.enable_lora if config.enable_lora is not None else (True,) * chunks
        if len(enable) != chunks:
            raise ValueError(f"LoRAConfig.enable_lora={enable!r} has {len(enable)} entries; "
                             f"this fused projection has {chunks} chunks")
        cls = dora.DoRAMergedLinear if config.use_dora else layers.MergedLinear
        layer = cls(in_features, out_features, enable_lora=list(enable), **common)
    else:
        cls = dora.DoRALinear if config.use_dora else layers.Linear
        layer = cls(in_features, out_features, **common)
    if config.init_swapped and layer.has_lora:
        _swap_init(layer)
    return layer


register_method("lora", _lora_factory)


def make_linear(config: Optional[LoRAConfig], path: str, in_features: int, out_features: int,
                bias: bool = True, fan_in_fan_out: bool = False, roles: Sequence[str] = (),
                chunks: int = 1) -> nn.Module:
    """`config.make_linear(...)`, or a plain projection (loralib.Linear with r = 0) when config is None."""
    if config is None:
        return layers.Linear(in_features, out_features, r=0, bias=bias, fan_in_fan_out=fan_in_fan_out)
    return config.make_linear(path, in_features, out_features, bias=bias, fan_in_fan_out=fan_in_fan_out,
                              roles=roles, chunks=chunks)
