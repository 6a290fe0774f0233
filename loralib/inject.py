"""Put LoRA into any PyTorch model, in place, keeping its pretrained weights.

`inject(model, target_modules, r, lora_alpha, ...)` replaces every matching `nn.Linear`, `nn.Embedding`,
`nn.Conv1d/2d/3d` and GPT-2-style `Conv1D` (transformers' layer that stores its weight (in, out)) with the
loralib layer of the chosen method. The new layer takes over the old one's weight and bias tensors (no copy,
no re-initialisation of the big weight); only the low-rank factors are new.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from . import layers
from .config import WHOLE_PROJECTION, LoRAConfig, _swap_init, target_matches
from . import init_methods
from .init_methods import loraga_init
from .transaction import model_transaction
from .utils import mark_only_lora_as_trainable


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: y = x @ W + b with W (in, out); matched by shape of its API, so
    # transformers need not be imported.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _materialise(layer: nn.Module, base_params: Dict[str, nn.Parameter], device, dtype) -> nn.Module:
    """Turn a layer built on the meta device into a real one that uses the base module's tensors."""
    layer.to_empty(device=device)
    for name, param in base_params.items():
        owner = layer
        *path, leaf = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, leaf, param)
    for name, param in layer.named_parameters():
        if name not in base_params and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)
    layer.rebuild_buffers()  # first: a weight-dependent init (DoRA's m, PiSSA) reads them (MergedLinear's columns)
    layer.reset_lora_parameters()
    return layer


def _lora_layer_for(module: nn.Module, path: str, config: LoRAConfig) -> nn.Module:
    """The loralib layer that replaces `module` (same weight tensors), or a ValueError naming it."""
    config = config.for_module(path)  # its own r and lora_alpha (rank_pattern / alpha_pattern)
    weight = module.weight
    device, dtype = weight.device, weight.dtype
    has_bias = getattr(module, "bias", None) is not None
    chunks = len(config.enable_lora) if config.enable_lora is not None else 1
    # our model files build every projection as a loralib Linear, rank 0 where no LoRA was asked for: such a
    # layer is a plain linear map and may be given a rank like an nn.Linear
    plain_loralib = type(module) is layers.Linear and not module.has_lora
    if isinstance(module, layers.LoRALayer) and not plain_loralib:
        raise ValueError(f"module {path!r} already carries LoRA ({type(module).__name__}); "
                         "unmerge/remove it before injecting again")
    if isinstance(module, nn.Linear) or _is_gpt2_conv1d(module) or plain_loralib:
        fan_in_fan_out = module.fan_in_fan_out if plain_loralib else not isinstance(module, nn.Linear)
        in_f, out_f = (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])
        try:
            with torch.device("meta"):
                layer = config.make_linear(path, in_f, out_f, bias=has_bias, fan_in_fan_out=fan_in_fan_out,
                                           chunks=chunks)
        except ValueError as err:
            raise ValueError(f"module {path!r} ({type(module).__name__}, in {in_f}, out {out_f}): {err}") from None
        base = {"weight": module.weight}
        if has_bias:
            base["bias"] = module.bias
        layer = _materialise(layer, base, device, dtype)
        if config.init_swapped and layer.has_lora:
            _swap_init(layer)
        return layer
    if config.method != "lora":
        raise ValueError(f"module {path!r} is a {type(module).__name__}; method {config.method!r} "
                         "adapts linear projections only")
    if config.init_lora_weights is not True:
        raise ValueError(f"module {path!r} is a {type(module).__name__}; init_lora_weights="
                         f"{config.init_lora_weights!r} is implemented for linear projections (nn.Linear, "
                         "transformers' Conv1D) only")
    from . import dora

    if isinstance(module, nn.Embedding):
        with torch.device("meta"):
            cls = dora.DoRAEmbedding if config.use_dora else layers.Embedding
            layer = cls(module.num_embeddings, module.embedding_dim, r=config.r, lora_alpha=config.lora_alpha,
                        merge_weights=config.merge_weights, use_rslora=config.use_rslora,
                        padding_idx=module.padding_idx, max_norm=module.max_norm, norm_type=module.norm_type,
                        scale_grad_by_freq=module.scale_grad_by_freq, sparse=module.sparse)
        return _materialise(layer, {"weight": module.weight}, device, dtype)
    plain = {nn.Conv1d: layers.Conv1d, nn.Conv2d: layers.Conv2d, nn.Conv3d: layers.Conv3d}
    with_dora = {nn.Conv1d: dora.DoRAConv1d, nn.Conv2d: dora.DoRAConv2d, nn.Conv3d: dora.DoRAConv3d}
    conv_types = with_dora if config.use_dora else plain
    if type(module) in conv_types:
        ks = set(module.kernel_size)
        if len(ks) != 1:
            raise ValueError(f"module {path!r} has a non-square kernel {module.kernel_size}; "
                             "LoRA convolutions need one kernel size")
        with torch.device("meta"):
            layer = conv_types[type(module)](module.in_channels, module.out_channels, ks.pop(), r=config.r,
                                             lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                             merge_weights=config.merge_weights, use_rslora=config.use_rslora,
                                             bias=False)
        layer.to_empty(device=device)
        layer.conv = module  # keep the real convolution, stride/padding/groups included
        for param in layer.parameters(recurse=False):
            param.data = param.data.to(dtype)
        layer.reset_lora_parameters()
        return layer
    raise ValueError(f"target module {path!r} is a {type(module).__name__}; loralib adapts nn.Linear, "
                     "nn.Embedding, nn.Conv1d/2d/3d and transformers' Conv1D")


def inject(model: nn.Module, target_modules: Union[str, Sequence[str]], r: int = 8, lora_alpha: float = 16,
           lora_dropout: float = 0.0, use_rslora: bool = False, method: str = "lora",
           enable_lora: Optional[Sequence[bool]] = None, merge_weights: bool = True,
           init_swapped: bool = False, freeze: bool = True, bias: str = "none",
           config: Optional[LoRAConfig] = None, use_dora: bool = False,
           init_lora_weights: Union[bool, str] = True,
           loraga_train_step: Optional[Callable[[], None]] = None) -> nn.Module:
    """Replace the target modules of `model` with LoRA layers, in place; returns the model.

    target_modules: names matched as dotted suffixes of module paths (["q_proj", "v_proj"]) or one regex
        matched against whole paths (PEFT's convention). Every listed name must match at least one module.
    enable_lora: for fused projections (GPT-2's c_attn), which equal output chunks get LoRA; None (or
        WHOLE_PROJECTION) puts one LoRA on the whole projection, as PEFT does.
    freeze: mark only LoRA parameters (and `bias`) trainable afterwards.
    use_dora, init_lora_weights: DoRA and PiSSA / LoRA-GA initialisation, named as PEFT names them
        (see LoRAConfig). PiSSA and LoRA-GA replace the targeted weights by their residuals, in place.
    loraga_train_step: with init_lora_weights="lora_ga", the callback (forward + backward over the
        gradient-estimation batches) that loralib.loraga_init runs right after injection; without it,
        call loraga_init(model, train_step) yourself before training.
    config: a ready LoRAConfig instead of the keyword arguments.
    The config used is stored as `model.loralib_config` for save_adapter / export_peft, with enable_lora=None
    recorded as WHOLE_PROJECTION: the layers built here, which a model file given None would build chunked.
    """
    if config is None:
        config = LoRAConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=target_modules, use_rslora=use_rslora, method=method,
                            enable_lora=tuple(enable_lora) if enable_lora is not None else None,
                            merge_weights=merge_weights, init_swapped=init_swapped, use_dora=use_dora,
                            init_lora_weights=init_lora_weights)
    if loraga_train_step is not None and config.init_lora_weights != "lora_ga":
        raise ValueError("inject: loraga_train_step is given but init_lora_weights is "
                         f"{config.init_lora_weights!r}, not 'lora_ga'")
    targets = config.target_modules
    matched: List[Tuple[str, nn.Module]] = [
        (path, module) for path, module in model.named_modules()
        if path and target_matches(targets, path) and not _inside_lora_layer(model, path)]
    _check_every_target_matched(model, targets, [p for p, _ in matched])
    paths = tuple(p for p, _ in matched)
    # all or nothing: a layer that cannot be built (or a LoRA-GA step that fails) leaves the model as it was.
    # The new layers share the frozen tensors, so only PiSSA / LoRA-GA (which rewrite them in place) need
    # copies, of the matched modules' tensors alone; otherwise the module tree is all that is restored.
    copied = paths if init_methods.mutates_weight(config.init_lora_weights) else ()
    with model_transaction(model, tensors=lambda name, _: any(name.startswith(p + ".") for p in copied)):
        for path, module in matched:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, _lora_layer_for(module, path, config))
        model.loralib_config = config if config.enable_lora is not None else config.replace(
            enable_lora=WHOLE_PROJECTION)
        if loraga_train_step is not None:
            loraga_init(model, loraga_train_step)
    if freeze:
        mark_only_lora_as_trainable(model, bias=bias)
    return model


def _inside_lora_layer(model: nn.Module, path: str) -> bool:
    """True for the `.conv` inside a LoRA convolution: it is adapted through its parent."""
    parent_path = path.rpartition(".")[0]
    return bool(parent_path) and isinstance(model.get_submodule(parent_path), layers.LoRALayer)


def _check_every_target_matched(model: nn.Module, targets, matched_paths: List[str]) -> None:
    if isinstance(targets, str):
        if not matched_paths:
            raise ValueError(f"target_modules pattern {targets!r} matches no module of "
                             f"{type(model).__name__}")
        return
    missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p in matched_paths)]
    if missing:
        examples = [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))][:8]
        raise ValueError(f"target_modules {missing} match no module of {type(model).__name__} "
                         f"(some module names: {examples})")
