"""Adapter files: our own (safetensors + a JSON of how it was made) and PEFT's, both ways.

Our format, one folder:
  adapter.safetensors    the "lora_" tensors, plus trained non-LoRA tensors such as a classifier head
  adapter_config.json    {"format": "loralib-adapter", "format_version": 1, "lora": LoRAConfig fields,
                          "layers": {path: {"type", "r", "weight_shape"}}, "extra_keys": [...], "metadata": {...}}
PEFT's format: adapter_model.safetensors (keys "base_model.model.<path>.lora_A.weight", ...) + adapter_config.json.
A MergedLinear with some chunks disabled (GPT-2's c_attn with q and v) is exported exactly as a PEFT LoRA of
rank r * n_enabled on the whole projection, whose A stacks the chunks' A and whose B is block-structured with
zeros for the disabled chunks; `rank_pattern` / `alpha_pattern` carry its rank and scaling.
AdaLoRA and LoRA² layers are exported exactly as plain PEFT LoRAs too (any PEFT LoRA loader reads them):
    AdaLoRA  delta-W = B diag(E) A * s         -> A' = (E * A)[kept] (r', in),  B' = B[:, kept] (out, r')
    LoRA²    delta-W = bb aa diag(E) B A * s   -> A' = (aa' diag(E') B') A (k, in), B' = bb (out, k),
                                                 or A' = diag(E') B' A, B' = bb aa' when r' < k (rank r')
with s = alpha / (ranknum + 1e-5), and primes / kept = the ranks with E != 0 (pruned ones add nothing); a
layer with none left adds nothing and is left out.
DoRA layers add "base_model.model.<path>.lora_magnitude_vector" (out,) and "use_dora": true, as PEFT saves
them. PiSSA / LoRA-GA adapters are written by default as PEFT's conversion writes them: a plain LoRA of
rank 2 r that applies to the ORIGINAL weights, A' = [A; A0], B' = [B, -B0] (loralib.init_methods).

Reading: every path goes through loralib.adapter_files.open_adapter, which decides what it is (ours, PEFT's,
microsoft's released files, a checkpoint or run folder); `load_adapter_source` loads any of them,
`load_adapter` ours (and checkpoints / run folders), `import_peft` PEFT's. A PEFT import records the config of
the layers it made (one LoRA per projection, GPT-2's fused c_attn unchunked: enable_lora=WHOLE_PROJECTION; each
module's own rank and alpha: rank_pattern / alpha_pattern), so save_adapter then writes a folder that a model
built from its config loads exactly.

Files are written to a temporary name and renamed into place, the config last, so an interrupted save
never leaves a config pointing at a half-written tensor file.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import save_file

from . import init_methods, layers
from .adalora import SVDLinear, apply_rank_pattern, rank_adaptive_layers, trim_ranks
from .adapter_files import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT, FORMAT_VERSION, PEFT_PREFIX, PEFT_WEIGHTS,
                            AdapterError, AdapterSource, open_adapter, read_adapter_config)
from .config import WHOLE_PROJECTION, LoRAConfig
from .lora2 import LoRA2Linear
from .files import apply_umask, write_json_atomic
from .transaction import model_transaction
from .utils import lora_layers, mark_only_lora_as_trainable

PathLike = Union[str, os.PathLike]
__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "PEFT_WEIGHTS", "AdapterError", "AdapterSource",
           "export_peft", "import_peft", "load_adapter", "load_adapter_source", "open_adapter",
           "read_adapter_config", "save_adapter"]


# -- atomic writes ---------------------------------------------------------------------------------
def _atomic_write_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    """The tensors as one safetensors file, or an AdapterError naming the first non-finite one (nothing written:
    the weights file comes before the config)."""
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise AdapterError(f"{path}: {bad} holds non-finite values (nan or inf); the adapter was not written")
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    apply_umask(tmp)  # safetensors writes 0600; an adapter is shared like any other file
    os.replace(tmp, path)


def _atomic_write_json(obj: dict, path: Path) -> None:
    write_json_atomic(path, obj, sort_keys=True)


# -- our format ------------------------------------------------------------------------------------
def _extra_keys(model: nn.Module, include: Optional[Iterable[str]]) -> List[str]:
    """State-dict keys saved besides the LoRA factors: trainable non-LoRA parameters by default
    (a classifier head), or the keys under the given prefixes."""
    if include is None:
        return [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    prefixes = list(include)
    return [k for k in model.state_dict() if "lora_" not in k and any(k == p or k.startswith(p + ".") for p in prefixes)]


def save_adapter(model: nn.Module, directory: PathLike, config: Optional[LoRAConfig] = None,
                 include: Optional[Iterable[str]] = None, metadata: Optional[dict] = None,
                 state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write the model's adapter (LoRA factors + trained extras) into `directory`.

    state_dict: the tensors to read instead of model.state_dict(), when the model cannot give them whole
    (DeepSpeed ZeRO-3: loralib.train.zero3.gathered_state_dict)."""
    config = config or getattr(model, "loralib_config", None)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v for k, v in state.items() if "lora_" in k}
    extras = _extra_keys(model, include)
    tensors.update({k: state[k] for k in extras})
    layer_info = {
        path: {"type": type(layer).__name__, "r": layer.r,
               # ds_shape: the whole shape of a ZeRO-3-partitioned weight
               "weight_shape": list(getattr(layer._base_weight(), "ds_shape", layer._base_weight().shape))}
        for path, layer in lora_layers(model) if layer.has_lora}
    _atomic_write_tensors(tensors, directory / ADAPTER_WEIGHTS)
    _atomic_write_json({"format": FORMAT, "format_version": FORMAT_VERSION,
                        "lora": config.to_dict() if config is not None else None,
                        "layers": layer_info, "extra_keys": extras, "metadata": metadata or {}},
                       directory / ADAPTER_CONFIG)
    return directory


def _check_against_model(model: nn.Module, tensors: Dict[str, torch.Tensor], source: Path,
                         strict: bool) -> None:
    """Every tensor must name a model entry of the same shape; with strict, every LoRA entry of the
    model must be in the file."""
    state = model.state_dict()
    for key, value in tensors.items():
        if key not in state:
            raise AdapterError(f"{source}: key {key!r} is not in the model "
                               f"({type(model).__name__}); the adapter was made for another model")
        if tuple(state[key].shape) != tuple(value.shape):
            raise AdapterError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects "
                               f"{tuple(state[key].shape)}")
    if strict:
        missing = [k for k in state if "lora_" in k and k not in tensors]
        if missing:
            raise AdapterError(f"{source}: the model has LoRA entries the file lacks, e.g. {missing[:3]}")


def load_adapter(model: nn.Module, directory: PathLike, strict: bool = True) -> nn.Module:
    """Load an adapter written by save_adapter: its folder, a checkpoint-<step>/ of the training loop or a
    run's output folder (open_adapter finds the adapter/ in them). If the model has no LoRA layers yet, they
    are injected first from the adapter's recorded LoRAConfig. Other formats: load_adapter_source."""
    source = open_adapter(directory)
    if source.format != "loralib":
        hint = ("it looks like a PEFT adapter: use import_peft" if source.format == "peft" else
                f"a {source.format} adapter file: use load_adapter_source")
        where = source.path / ADAPTER_CONFIG if source.format == "peft" else source.path
        raise AdapterError(f"{where}: not a loralib adapter config ({hint})")
    return _load_ours(model, source, strict)


def load_adapter_source(model: nn.Module, source: Union[PathLike, AdapterSource], strict: bool = True,
                        merge_weights: bool = True) -> nn.Module:
    """Load any adapter open_adapter recognises into `model` (all or nothing) and return the model.

    ours / checkpoints / run folders: as load_adapter (layers injected from the recorded config when the
    model has none; an AdaLoRA / LoRA² rank pattern saved with it re-applied; a checkpoint's model_extra.pt
    loaded too). PEFT: as import_peft. microsoft's NLU files: layers injected from `source.lora` when the
    model has none, then models.released_nlu.load_nlu_adapter; GPT-2 NLG files: load_gpt2_nlg_adapter (the
    model must be built with `source.lora`: its fused c_attn cannot be injected afterwards). strict (ours):
    every LoRA entry of the model must be in the adapter."""
    if not isinstance(source, AdapterSource):
        source = open_adapter(source)
    if source.format == "loralib":
        return _load_ours(model, source, strict)
    if source.format == "peft":
        return _load_peft(model, source, merge_weights)
    return _load_released(model, source)


def _inject_if_bare(model: nn.Module, source: AdapterSource) -> None:
    """Layers from the source's LoRAConfig when the model has no LoRA layers yet."""
    from .inject import inject

    if any(layer.has_lora for _, layer in lora_layers(model)):
        return
    if not source.lora_keys:  # a folder of trained non-LoRA tensors only (full fine-tuning): nothing to inject
        return
    if source.lora is None:
        raise AdapterError(f"{source.path / ADAPTER_CONFIG}: the model has no LoRA layers and the adapter "
                           "records no LoRAConfig to create them")
    inject(model, target_modules=None, config=source.lora)


def _load_ours(model: nn.Module, source: AdapterSource, strict: bool) -> nn.Module:
    tensors = source.tensors
    ranks = (source.rank_state or {}).get("rank_pattern")
    extra = torch.load(source.model_extra, map_location="cpu", weights_only=True) if source.model_extra else {}
    # all or nothing: a file that does not fit leaves the model as it was (the injection undone)
    with model_transaction(model, tensors=lambda name, _: name in tensors or name in extra):
        _inject_if_bare(model, source)
        rank_adaptive = ranks is not None and any(True for _ in rank_adaptive_layers(model))
        if rank_adaptive and source.rank_state.get("trimmed"):  # the factors hold only the kept ranks
            trim_ranks(model, ranks)
        _check_against_model(model, tensors, source.weights, strict)
        _check_against_model(model, extra, source.model_extra, strict=False)
        _check_scalings(model, source)
        model.load_state_dict(tensors, strict=False)
        model.load_state_dict(extra, strict=False)
        if rank_adaptive and not source.rank_state.get("trimmed"):
            apply_rank_pattern(model, ranks)
    return model


def _check_scalings(model: nn.Module, source: AdapterSource) -> None:
    """The factors mean B A times the scaling they were trained with: a layer built with another lora_alpha
    (or rsLoRA setting) than the folder records would compute another function, so it is refused."""
    if source.lora is None:
        return
    for path, layer in lora_layers(model):
        prefix = path + "." if path else ""
        if not layer.has_lora or not any(k.startswith(prefix + "lora_") for k in source.tensors):
            continue
        want = source.lora.for_module(path)
        have = (float(layer.lora_alpha), bool(getattr(layer, "use_rslora", False)))
        if have != (float(want.lora_alpha), bool(want.use_rslora)):
            raise AdapterError(
                f"{source.path / ADAPTER_CONFIG}: layer {path!r} was trained with lora_alpha={want.lora_alpha:g}"
                f"{', rsLoRA' if want.use_rslora else ''}; the model's layer has lora_alpha={have[0]:g}"
                f"{', rsLoRA' if have[1] else ''}: build the model with the adapter's config (or load it into a "
                "model without LoRA layers, which takes it from the folder)")


def _load_released(model: nn.Module, source: AdapterSource) -> nn.Module:
    from .models.released import load_gpt2_nlg_adapter
    from .models.released_nlu import load_nlu_adapter

    if source.format == "microsoft-nlg":
        return load_gpt2_nlg_adapter(model, source.tensors, name=str(source.path))
    with model_transaction(model, tensors=lambda name, _: name in source.tensors):
        _inject_if_bare(model, source)
        load_nlu_adapter(model, source.tensors, name=str(source.path))
    return model


# -- PEFT ------------------------------------------------------------------------------------------
def _whole_projection(layer: "layers.MergedLinear", A: torch.Tensor, B: torch.Tensor):
    """A MergedLinear's chunked factors, A (n k, in) and B (n out_g, k), as one LoRA of rank n k on the whole
    projection: A as is, B (out, n k) block-structured with zeros for the disabled chunks."""
    n, chunk = layer.n_enabled, layer.chunk_size
    k = A.shape[0] // n
    whole_B = B.new_zeros((layer.out_features, n * k))
    for i, g in enumerate(g for g, on in enumerate(layer.enable_lora) if on):
        whole_B[g * chunk:(g + 1) * chunk, i * k:(i + 1) * k] = B[i * chunk:(i + 1) * chunk]
    return A, whole_B


def _peft_factors(layer: nn.Module):
    """(A (r, in), B (out, r), scaling) of a layer as a PEFT LoRA on the whole projection, with
    delta-W = B A * scaling exactly; r may be 0 (an AdaLoRA layer whose triplets were all pruned)."""
    if isinstance(layer, layers.MergedLinear):
        A, B = _whole_projection(layer, layer.lora_A, layer.lora_B)
        return A, B, layer.scaling
    if isinstance(layer, (layers.Linear, layers.Embedding)):
        return layer.lora_A, layer.lora_B, layer.scaling
    if isinstance(layer, SVDLinear):
        kept = layer.lora_E.view(-1) != 0
        return (layer.lora_E * layer.lora_A)[kept], layer.lora_B[:, kept], float(layer._rank_scale())
    if isinstance(layer, LoRA2Linear):
        kept = layer.lora_E.view(-1) != 0
        output_plane, input_plane = layer.lora_aa[:, kept], (layer.lora_E * layer.lora_B)[kept]  # (k, r'), (r', k)
        if int(kept.sum()) < layer.k:  # rank r' < k: bb aa' | diag(E') B' A
            return input_plane @ layer.lora_A, layer.lora_bb @ output_plane, float(layer._rank_scale())
        return (output_plane @ input_plane) @ layer.lora_A, layer.lora_bb, float(layer._rank_scale())
    raise AdapterError(f"export_peft: a {type(layer).__name__} has no PEFT LoRA form (Linear, fused Linear, "
                       "Embedding, AdaLoRA and LoRA² layers do)")


def _uniform(adapted, what: str, value_of):
    """The value every adapted layer shares (PEFT's config holds one), or an AdapterError naming a layer."""
    first = value_of(adapted[0][1])
    for path, layer in adapted:
        if value_of(layer) != first:
            raise AdapterError(f"export_peft: {path!r} differs from {adapted[0][0]!r} in {what}")
    return first


def export_peft(model: nn.Module, directory: PathLike, base_model_name_or_path: Optional[str] = None,
                task_type: Optional[str] = None, modules_to_save: Optional[List[str]] = None,
                convert_to_lora: bool = True) -> Path:
    """Write the model's adapter as a PEFT LoRA (from LoRA, fused, AdaLoRA or LoRA² layers: see the module
    docstring), loadable with PeftModel.from_pretrained on the same (transformers) model. modules_to_save:
    names of trained non-LoRA modules (a classifier head); by default the largest modules whose parameters
    are all trainable (none a LoRA factor), which must cover every trainable non-LoRA parameter.

    DoRA layers add their `lora_magnitude_vector` and use_dora=true. PiSSA / LoRA-GA layers (whose frozen
    weight is a residual): with convert_to_lora (default) the adapter is written as PEFT's conversion writes
    it, a plain LoRA of rank 2 r against the ORIGINAL weights (init_lora_weights=true, alpha doubled, or
    * sqrt 2 with rsLoRA); without, as trained (rank r, init_lora_weights "pissa..." / "lora_ga"), which
    PEFT re-initialises on the original weights when loading ("pissa" only: LoRA-GA's gradient is gone)."""
    adapted = [(p, l) for p, l in lora_layers(model) if l.has_lora]
    if not adapted:
        raise AdapterError("export_peft: the model has no LoRA layers")
    use_rslora = _uniform(adapted, "rsLoRA scaling (use_rslora)", lambda l: l.use_rslora)
    use_dora = _uniform(adapted, "DoRA (use_dora)", lambda l: hasattr(l, "lora_magnitude_vector"))
    init = _uniform(adapted, "init_lora_weights", lambda l: getattr(l, "init_lora_weights", True))
    convert = convert_to_lora and init_methods.mutates_weight(init)
    factors = _export_factors(adapted, convert, init)
    tensors, fan_in_fan_out = _peft_layer_tensors(factors, use_dora)
    if modules_to_save is None:
        modules_to_save = _trained_modules(model)
    tensors.update(_modules_to_save_tensors(model, modules_to_save))
    # PEFT scales by alpha / r (or alpha / sqrt r): each layer's alpha is chosen so its scaling stays the same.
    alphas = {path: scaling * (math.sqrt(A.shape[0]) if use_rslora else A.shape[0])
              for path, (A, _, scaling, _) in factors.items()}
    r_global, alpha_global = adapted[0][1].r, adapted[0][1].lora_alpha
    if convert:  # PEFT's conversion: twice the rank at the same scaling
        r_global, alpha_global = 2 * r_global, alpha_global * (math.sqrt(2) if use_rslora else 2)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r_global, "lora_alpha": alpha_global, "lora_dropout": float(getattr(
            adapted[0][1].lora_dropout, "p", 0.0)), "target_modules": sorted(factors),
        "rank_pattern": {path: A.shape[0] for path, (A, *_) in factors.items() if A.shape[0] != r_global},
        "alpha_pattern": {path: alpha for path, alpha in alphas.items() if not math.isclose(alpha, alpha_global)},
        "use_rslora": use_rslora, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
        "modules_to_save": modules_to_save, "init_lora_weights": True if convert else init,
        "inference_mode": True, "use_dora": use_dora, "layers_to_transform": None, "layers_pattern": None,
        "revision": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write_tensors(tensors, directory / PEFT_WEIGHTS)
    _atomic_write_json(config, directory / ADAPTER_CONFIG)
    return directory


def _is_factor(name: str) -> bool:
    return "lora_" in name.rsplit(".", 1)[-1]


def _trained_modules(model: nn.Module) -> Optional[List[str]]:
    """export_peft's default modules_to_save: the largest modules whose parameters are all trainable and hold
    no LoRA factor, covering every trainable non-LoRA parameter (PEFT saves modules_to_save whole). A trainable
    parameter in a module that also holds frozen weights or LoRA factors (a LoRA layer's bias) has no such
    module: refused, naming it, before anything is written."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not _is_factor(n)}
    chosen: List[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        params = list(module.named_parameters(prefix=prefix))
        if not any(n in trainable for n, _ in params):
            return
        if prefix and all(p.requires_grad and not _is_factor(n) for n, p in params):
            chosen.append(prefix)
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    stranded = sorted(n for n in trainable if not any(n.startswith(c + ".") for c in chosen))
    if stranded:
        raise AdapterError(
            f"export_peft: trainable parameters {stranded[:4]}{' ...' if len(stranded) > 4 else ''} sit in modules "
            "that also hold frozen weights or LoRA factors (e.g. a LoRA layer's bias); PEFT's modules_to_save saves "
            "whole modules, so they have no PEFT form: freeze them, pass modules_to_save, or use save_adapter")
    return sorted(chosen) or None


def _export_factors(adapted, convert: bool, init) -> Dict[str, tuple]:
    """{path: (A, B, scaling, layer)} of each adapted layer with rank left, as PEFT LoRA factors."""
    factors = {}
    for path, layer in adapted:
        if convert:
            if not layer.initial_factors_set:
                raise AdapterError(f"export_peft: {path!r} was made with init_lora_weights={init!r} but its "
                                   "initialisation has not run (LoRA-GA: loraga_init): nothing to convert")
            A, B, scaling = init_methods.as_plain_lora(layer)
            if isinstance(layer, layers.MergedLinear):
                A, B = _whole_projection(layer, A, B)
        else:
            A, B, scaling = _peft_factors(layer)
        if A.shape[0] > 0:
            factors[path] = (A.detach(), B.detach(), scaling, layer)
    if not factors:
        raise AdapterError("export_peft: every LoRA layer of the model has rank 0 left (all its triplets pruned)")
    return factors


def _peft_layer_tensors(factors: Dict[str, tuple], use_dora: bool):
    """(PEFT's tensors of the factors, whether any layer stores its weight (in, out): fan_in_fan_out)."""
    tensors: Dict[str, torch.Tensor] = {}
    fan_in_fan_out = False
    for path, (A, B, _, layer) in factors.items():
        if isinstance(layer, layers.Embedding):
            tensors[f"{PEFT_PREFIX}{path}.lora_embedding_A"] = A
            tensors[f"{PEFT_PREFIX}{path}.lora_embedding_B"] = B
        else:
            fan_in_fan_out = fan_in_fan_out or layer.fan_in_fan_out
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B
        if use_dora:
            tensors[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    return tensors, fan_in_fan_out


def _modules_to_save_tensors(model: nn.Module, modules_to_save: Optional[List[str]]) -> Dict[str, torch.Tensor]:
    state, tensors = model.state_dict(), {}
    for name in modules_to_save or []:
        keys = [k for k in state if k.startswith(name + ".") and "lora_" not in k]
        if not keys:
            raise AdapterError(f"export_peft: modules_to_save entry {name!r} names no module of the model")
        tensors.update({PEFT_PREFIX + k: state[k] for k in keys})
    return tensors


def import_peft(model: nn.Module, directory: PathLike, merge_weights: bool = True) -> nn.Module:
    """Load a PEFT LoRA (or AdaLoRA) adapter folder into `model` (a transformers model or one of ours with the
    same module names): LoRA layers are injected where the adapter has factors, with its ranks and scalings
    (rank_pattern / alpha_pattern; an AdaLoRA adapter as the plain LoRA it equals, see adapter_files)."""
    source = open_adapter(directory)
    if source.format != "peft":
        raise AdapterError(f"{source.path}: not a PEFT adapter folder (a {source.format} adapter: use "
                           + ("load_adapter)" if source.format == "loralib" else "load_adapter_source)"))
    return _load_peft(model, source, merge_weights)


def _peft_factors_by_module(source: AdapterSource) -> Dict[str, Dict[str, torch.Tensor]]:
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    for key in source.lora_keys:
        path, name = key.rsplit(".", 1)
        factors.setdefault(path, {})[name] = source.tensors[key]
    return factors


def _load_peft(model: nn.Module, source: AdapterSource, merge_weights: bool) -> nn.Module:
    factors = _peft_factors_by_module(source)
    extras = {key: source.tensors[key] for key in source.extra_keys}
    # all or nothing: an adapter that fails half-way leaves the model as it was (layers injected and merged
    # so far undone). Copied for that: the LoRA tensors of the modules the adapter names, the extras, and the
    # whole of a named layer that is merged now (unmerge / merge rewrite its frozen weight).
    present = dict(model.named_modules())
    merged_now = tuple(p for p in factors if getattr(present.get(p), "merged", False))

    def _touched(name: str, _) -> bool:
        under = lambda paths: any(name.startswith(p + ".") for p in paths)  # noqa: E731
        return name in extras or under(merged_now) or ("lora_" in name.rsplit(".", 1)[-1] and under(factors))

    with model_transaction(model, tensors=_touched):
        for path, tensors in factors.items():
            _import_peft_layer(model, source, path, tensors, merge_weights)
        if extras:
            _check_against_model(model, extras, source.weights, strict=False)
            model.load_state_dict(extras, strict=False)
        model.loralib_config = _as_loaded(source, factors, merge_weights)
    mark_only_lora_as_trainable(model)
    for name, param in model.named_parameters():
        if name in extras:  # a trained head (modules_to_save) stays trainable
            param.requires_grad = True
    return model


def _as_loaded(source: AdapterSource, factors, merge_weights: bool) -> LoRAConfig:
    """The LoRAConfig of the layers a PEFT load leaves, so that a model file built from the config save_adapter
    writes has exactly them: one LoRA per projection (a fused c_attn's unchunked: WHOLE_PROJECTION), each
    module's own rank and alpha where they differ from the global ones."""
    lora = source.lora
    ranks = {path: source.ranks[path] for path in factors if source.ranks[path] != lora.r}
    alphas = {path: source.alphas[path] for path in factors if source.alphas[path] != lora.lora_alpha}
    return lora.replace(merge_weights=merge_weights, enable_lora=WHOLE_PROJECTION, rank_pattern=ranks or None,
                        alpha_pattern=alphas or None)


def _import_peft_layer(model: nn.Module, source: AdapterSource, path: str, tensors: Dict[str, torch.Tensor],
                       merge_weights: bool) -> None:
    """One module's PEFT factors into the model: a LoRA layer injected there if it has none, the factors
    copied (shapes checked), and this module's own rank and alpha (rank_pattern / alpha_pattern) taken."""
    from .inject import inject

    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise AdapterError(f"{source.weights}: key for module {path!r}, which the model "
                           f"({type(model).__name__}) does not have") from None
    rank, alpha, use_dora = source.ranks[path], source.alphas[path], source.lora.use_dora
    if not getattr(module, "has_lora", False):  # a plain module, or a rank-0 loralib Linear
        inject(model, target_modules=None, freeze=False, config=source.lora.replace(
            r=rank, lora_alpha=alpha, target_modules=re.escape(path), merge_weights=merge_weights))
    layer = model.get_submodule(path)
    if isinstance(layer, (SVDLinear, LoRA2Linear)):
        raise AdapterError(f"{source.weights}: {path!r} is a {type(layer).__name__} (AdaLoRA / LoRA² SVD form, "
                           "B diag(E) A); a PEFT LoRA holds plain A and B: load it into a model without "
                           "AdaLoRA / LoRA² layers")
    if use_dora != hasattr(layer, "lora_magnitude_vector"):
        raise AdapterError(f"{source.path / ADAPTER_CONFIG}: use_dora={str(use_dora).lower()} but the model's layer "
                           f"{path!r} is a {type(layer).__name__}, built {'without' if use_dora else 'with'} DoRA")
    for name, value in tensors.items():
        target = getattr(layer, name)
        if tuple(target.shape) != tuple(value.shape):
            raise AdapterError(f"{source.weights}: {path}.{name} has shape {tuple(value.shape)}, the model "
                               f"expects {tuple(target.shape)}")
    with torch.no_grad():
        was_merged = layer.merged
        layer.unmerge()
        for name, value in tensors.items():
            getattr(layer, name).copy_(value.to(getattr(layer, name).dtype))
        # a layer built beforehand (from the global r / alpha) takes this module's alpha_pattern value
        layer.lora_alpha, layer.scaling = alpha, layers.lora_scaling(rank, alpha, source.lora.use_rslora)
        if was_merged:
            layer.merge()
