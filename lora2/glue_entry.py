"""What lora2/run_glue.py and lora2/run_glue_adalora.py share: the flags of the released AdaLoRA / LoRA² NLU
scripts (forks of microsoft/LoRA's examples/NLU, so LoRA's flags too) and their translation into a GlueRun.

The two files differ only in what `--lora_type svd` builds by default (--svd_layer): "lora2" in lora2/run_glue.py
(in the LoRA² repository its loralib redefined SVDLinear as LoRA²'s layer, inner rank k = 8), "adalora"
(AdaLoRA's SVDLinear) in lora2/run_glue_adalora.py and here when not said; --apply_lora2 always builds LoRA²
(inner rank --lora2_k); the allocator runs only with --apply_adalora. --apply_rankselector (the released MRPC
scripts' spelling) means --apply_adalora; --apply_adalora or --apply_lora2 imply --apply_lora; --apply_adalora
needs --lora_type svd (or --apply_lora2) and --target_rank (or --target_total_rank). --root_output_dir ROOT puts
the run in ROOT/model, as the released scripts did.
"""
import argparse
from pathlib import Path
from typing import Optional

from loralib.config import LoRAConfig
from loralib.methods import Method, make_method
from loralib.tasks.glue import run as glue
from loralib.train import hf_flags

LORA2_RELEASED_CLS_DROPOUT = 0.15  # the released LoRA² run_glue.py's hard-coded head dropout


def build_parser(prog: str = "run_glue.py", svd_layer: str = "adalora") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="LoRA² and AdaLoRA on GLUE with the flags of the "
                                                            "released LoRA² / AdaLoRA scripts.")
    hf_flags.add_glue_flags(parser)
    hf_flags.add_lora_flags(parser, lora_module="query,value")
    _add_adaptive(parser, svd_layer)
    return parser


def _add_adaptive(parser: argparse.ArgumentParser, svd_layer: str) -> None:
    g = parser.add_argument_group("AdaLoRA / LoRA²")
    g.add_argument("--lora_type", choices=("frd", "svd"), default=None,
                   help="frd: LoRA's B A; svd: AdaLoRA's P diag(E) Q (default frd, svd with --apply_lora2)")
    g.add_argument("--apply_adalora", "--apply_rankselector", dest="apply_adalora", action="store_true",
                   help="allocate ranks during training (--apply_rankselector: the released scripts' spelling)")
    g.add_argument("--apply_lora2", action="store_true",
                   help="LoRA²: P and Q themselves low-rank (inner rank --lora2_k)")
    g.add_argument("--svd_layer", choices=("adalora", "lora2"), default=svd_layer,
                   help=f"what --lora_type svd builds: AdaLoRA's SVDLinear, or LoRA²'s layer (the LoRA² repository's "
                        f"meaning; lora2/run_glue.py's default). Default here: {svd_layer}")
    g.add_argument("--lora2_k", type=int, default=8)
    g.add_argument("--target_rank", type=int, default=None, help="average final rank per matrix")
    g.add_argument("--target_total_rank", type=int, default=None, help="final total rank (overrides --target_rank)")
    g.add_argument("--init_warmup", type=int, default=4500)
    g.add_argument("--final_warmup", type=int, default=12000)
    g.add_argument("--mask_interval", type=int, default=10)
    g.add_argument("--beta1", type=float, default=0.85)
    g.add_argument("--beta2", type=float, default=0.85)
    g.add_argument("--reg_orth_coef", type=float, default=0.0)
    g.add_argument("--root_output_dir", default=None, help="the run goes to ROOT/model (as the released scripts did)")


def parse_args(argv=None, svd_layer: str = "adalora") -> argparse.Namespace:
    return build_parser(svd_layer=svd_layer).parse_args(argv)


def method_of(args: argparse.Namespace) -> Optional[Method]:
    """The method of the flags; None without a LoRA flag (full fine-tuning, or the adapter --lora_path names)."""
    hf_flags.check_positive(args, "lora_r")
    if not (args.apply_lora or args.apply_adalora or args.apply_lora2):
        given = [f"--{n}" for n in ("lora_r", "lora_alpha", "lora_type", "target_rank", "target_total_rank")
                 if getattr(args, n) is not None] + (["--reg_orth_coef"] if args.reg_orth_coef else [])
        hf_flags.check_lora_off(args, given)
        return None
    name = _layer(args)
    if args.apply_lorapro:
        if not args.apply_lora:
            raise ValueError("--apply_lorapro trains LoRA factors: add --apply_lora")
        if name != "lora":
            raise ValueError(f"--apply_lorapro works on LoRA's B A layers, not {name}'s SVD-form ones: "
                             "drop --apply_adalora / --apply_lora2 / --lora_type svd")
    r = args.lora_r if args.lora_r is not None else 8
    lora = LoRAConfig(r=r, lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * r,
                      lora_dropout=args.lora_dropout,
                      target_modules=hf_flags.split_list(args.lora_module, "--lora_module"),
                      method=name, lora2_k=args.lora2_k)
    lora = hf_flags.with_baselines(args, lora, lorapro=args.apply_lorapro)
    if args.apply_lorapro:
        return make_method("lorapro", lora, lorapro_mode=args.lorapro_mode)
    svd = name != "lora"
    return make_method(name, lora, allocate=args.apply_adalora, reg_orth_coef=args.reg_orth_coef,
                       target_rank=args.target_rank if svd else None)


def _layer(args: argparse.Namespace) -> str:
    """"lora", "adalora" or "lora2": the layer --lora_type, --svd_layer and --apply_lora2 ask for (checked)."""
    lora_type = args.lora_type or ("svd" if args.apply_lora2 else "frd")
    if args.apply_lora2 and lora_type != "svd":
        raise ValueError("--apply_lora2 builds LoRA² layers, which are SVD-form: drop --lora_type frd")
    if args.apply_adalora and lora_type != "svd":
        raise ValueError("--apply_adalora allocates ranks of SVD-form layers: add --lora_type svd (AdaLoRA) or "
                         "--apply_lora2 (LoRA²)")
    if args.reg_orth_coef < 0:
        raise ValueError(f"--reg_orth_coef must be >= 0, got {args.reg_orth_coef}")
    if args.reg_orth_coef > 0 and lora_type != "svd":
        raise ValueError("--reg_orth_coef regularizes SVD-form factors: add --lora_type svd or --apply_lora2")
    if args.apply_adalora and args.target_rank is None and args.target_total_rank is None:
        raise ValueError("--apply_adalora needs --target_rank (average final rank per matrix) or --target_total_rank")
    hf_flags.check_positive(args, "lora2_k")
    if lora_type != "svd":
        return "lora"
    return "lora2" if args.apply_lora2 or args.svd_layer == "lora2" else "adalora"


def output_dir(args: argparse.Namespace) -> Optional[str]:
    """--root_output_dir ROOT: the run goes to ROOT/model (as the released scripts did); else --output_dir."""
    root = args.root_output_dir
    if root is None:
        return args.output_dir
    if args.output_dir is not None and Path(args.output_dir) != Path(root) / "model":
        raise ValueError("--root_output_dir puts the run in ROOT/model; give it or --output_dir, not both")
    return str(Path(root) / "model")


def glue_run(args: argparse.Namespace) -> glue.GlueRun:
    """The GlueRun of the flags."""
    method = method_of(args)
    released_lora2 = method is not None and method.name == "lora2" and args.recipe == "released"
    allocation = glue.Allocation(init_warmup=args.init_warmup, final_warmup=args.final_warmup,
                                 mask_interval=args.mask_interval, beta1=args.beta1, beta2=args.beta2,
                                 target_total_rank=args.target_total_rank)
    return glue.GlueRun(**hf_flags.glue_fields(args, output_dir(args), record={"flavour": "lora2"}), method=method,
                        adapter_method=lambda lora: glue.adapter_method(hf_flags.with_baselines(args, lora)),
                        fixed_cls_dropout=LORA2_RELEASED_CLS_DROPOUT if released_lora2 else None,
                        lora_a_init=args.lora_a_init, allocation=allocation, target_flag="--lora_module")


def run_glue(argv=None, svd_layer: str = "adalora") -> glue.RunResult:
    """Parse, translate, prepare and execute; errors propagate."""
    return glue.run_glue(glue_run(parse_args(argv, svd_layer)))


def main(argv, prog: str, svd_layer: str) -> int:
    """0 on success; a bad flag, file or adapter: one `error:` line and 2."""
    args = build_parser(prog, svd_layer).parse_args(argv)
    return glue.main(lambda: glue_run(args), prog)
