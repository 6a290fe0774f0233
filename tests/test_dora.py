"""DoRA held to PEFT 0.21.2's use_dora=True: forward and the gradient of every trainable tensor to 1e-6
(fp32), before and after merge; exact unmerge; merged_state_dict; the model files; bad combinations."""
import copy

import pytest
import torch
import torch.nn as nn

import loralib as lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


class Tiny(nn.Module):
    """Two linear layers and a GPT-2 style Conv1D (weight (in, out))."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(12, 10)
        self.v = nn.Linear(10, 14, bias=False)
        self.c = Conv1D(9, 14)  # nf=9 out, nx=14 in
        self.act = nn.Tanh()

    def forward(self, x):
        return self.c(self.act(self.v(self.act(self.q(x)))))


TARGETS = ["q", "v", "c"]


def _pair(use_rslora=False, dropout=0.0, r=4, alpha=8):
    torch.manual_seed(0)
    base = Tiny()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=TARGETS, use_dora=True,
        use_rslora=use_rslora, fan_in_fan_out=False))
    ours = lora.inject(copy.deepcopy(base), TARGETS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                       use_rslora=use_rslora, use_dora=True, merge_weights=False)
    # trained-looking factors and magnitudes, the same in both
    g = torch.Generator().manual_seed(1)
    for name in TARGETS:
        mine, peft_layer = getattr(ours, name), theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            mine.lora_A.copy_(torch.randn(mine.lora_A.shape, generator=g) * 0.3)
            mine.lora_B.copy_(torch.randn(mine.lora_B.shape, generator=g) * 0.3)
            mine.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(mine.lora_magnitude_vector.shape, generator=g))
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(mine.lora_magnitude_vector)
    return base, ours, theirs


def _grads(model, names):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad for k in names if k in n}


def _ours_vs_peft_names(name):
    """our parameter name -> PEFT's."""
    path, _, leaf = name.rpartition(".")
    leaf = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight",
            "lora_magnitude_vector": "lora_magnitude_vector.default.weight"}[leaf]
    return f"base_model.model.{path}.{leaf}"


def test_magnitude_starts_at_the_row_norms_as_in_peft():
    torch.manual_seed(0)
    base = Tiny()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    ours = lora.inject(copy.deepcopy(base), TARGETS, r=4, use_dora=True)
    for name in TARGETS:
        m = getattr(ours, name).lora_magnitude_vector
        ref = theirs.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(m, ref, rtol=0, atol=1e-6)
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=1e-6)  # B = 0: the base output


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_every_gradient_equal_peft(use_rslora):
    _, ours, theirs = _pair(use_rslora=use_rslora)
    x = torch.randn(3, 5, 12)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_peft = ours(x1), theirs(x2)
    torch.testing.assert_close(y_ours, y_peft, rtol=0, atol=1e-6)
    w = torch.randn_like(y_ours)
    (y_ours * w).sum().backward()
    (y_peft * w).sum().backward()
    peft_params = dict(theirs.named_parameters())
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == 9  # A, B and m of three layers
    for name in trainable:
        ref = peft_params[_ours_vs_peft_names(name)]
        assert ref.requires_grad
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, ref.grad, rtol=0, atol=1e-6,
                                   msg=name)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-6)


def test_with_lora_dropout_in_training_equals_peft():
    _, ours, theirs = _pair(dropout=0.3)
    ours.train(), theirs.train()
    x = torch.randn(4, 12)
    torch.manual_seed(5)
    y_ours = ours(x)
    torch.manual_seed(5)
    y_peft = theirs(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=0, atol=1e-6)
    y_ours.sum().backward(), y_peft.sum().backward()
    peft_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, peft_params[_ours_vs_peft_names(name)].grad, rtol=0, atol=1e-6)


def test_norm_is_a_constant_in_backward():
    """d y / d A with the norm detached differs from the one through the norm; ours is the detached one."""
    layer = lora.DoRALinear(6, 5, r=2, lora_alpha=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    ours = layer.lora_A.grad.clone()
    layer.lora_A.grad = None
    # the same layer written as a formula with the norm left in the graph
    W = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    f_detached = layer.lora_magnitude_vector / W.norm(dim=1).detach()
    (x @ (W * f_detached[:, None]).t() + layer.bias).sum().backward()
    torch.testing.assert_close(ours, layer.lora_A.grad, rtol=0, atol=1e-6)
    layer.lora_A.grad = None
    W2 = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
    f_live = layer.lora_magnitude_vector / W2.norm(dim=1)
    (x @ (W2 * f_live[:, None]).t() + layer.bias).sum().backward()
    assert not torch.allclose(ours, layer.lora_A.grad, atol=1e-4)


def test_merge_equals_peft_merge_and_unmerge_is_exact():
    base, ours, theirs = _pair()
    x = torch.randn(7, 12)
    unmerged = ours(x)
    before = {n: getattr(ours, n).weight.detach().clone() for n in TARGETS}
    lora.merge_lora(ours)
    torch.testing.assert_close(ours(x), unmerged, rtol=0, atol=1e-6)
    folded = theirs.merge_and_unload()
    for n in TARGETS:
        torch.testing.assert_close(getattr(ours, n).weight, folded.get_submodule(n).weight, rtol=0, atol=1e-6)
    # state_dict while merged holds the unmerged weight; merged_state_dict the folded one
    sd = ours.state_dict()
    for n in TARGETS:
        assert torch.equal(sd[f"{n}.weight"], before[n])
    lora.unmerge_lora(ours)
    for n in TARGETS:
        assert torch.equal(getattr(ours, n).weight, before[n])  # bit for bit
    plain = lora.merged_state_dict(ours)
    assert not any("lora_" in k for k in plain)
    reference = copy.deepcopy(base)
    reference.load_state_dict(plain)
    torch.testing.assert_close(reference(x), unmerged, rtol=0, atol=1e-6)
    for n in TARGETS:  # merged_state_dict left the model unmerged
        assert not getattr(ours, n).merged


def test_eval_merges_train_unmerges_and_reload_while_merged():
    layer = lora.DoRALinear(8, 6, r=2, lora_alpha=4, merge_weights=True)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(2, 8)
    y = layer(x)
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-6)
    fresh = lora.DoRALinear(8, 6, r=2, lora_alpha=4).eval()
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=1e-6)
    layer.train()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-6)


def test_fused_projection_dora_equals_a_whole_projection_dora():
    """DoRA on a MergedLinear with q and v enabled: the PEFT DoRA of the whole projection whose B has zero
    rows for k (as export_peft writes it)."""
    torch.manual_seed(0)
    fused = lora.DoRAMergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True], merge_weights=False)
    with torch.no_grad():
        fused.lora_B.normal_()
        fused.lora_magnitude_vector.mul_(torch.rand(12) + 0.5)
    whole = lora.DoRALinear(8, 12, r=4, lora_alpha=8, merge_weights=False)  # same scaling 2
    A, B, _ = lora.adapters._peft_factors(fused)
    with torch.no_grad():
        whole.weight.copy_(fused.weight), whole.bias.copy_(fused.bias)
        whole.lora_A.copy_(A), whole.lora_B.copy_(B)
        whole.lora_magnitude_vector.copy_(fused.lora_magnitude_vector)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fused(x), whole(x), rtol=0, atol=1e-6)
    fused(x).pow(2).sum().backward(), whole(x).pow(2).sum().backward()
    torch.testing.assert_close(fused.lora_magnitude_vector.grad, whole.lora_magnitude_vector.grad, rtol=0, atol=1e-6)
    fused.merge()
    torch.testing.assert_close(fused(x), whole(x), rtol=0, atol=1e-6)


def test_dora_inside_our_llama_equals_peft_on_transformers(tmp_path):
    from _llama_fixtures import hf_model, save, tiny_config
    from loralib.models.loading import from_pretrained

    targets = ("q_proj", "v_proj", "down_proj")
    hf = hf_model(tiny_config())
    save(hf, tmp_path / "m")
    ours = from_pretrained(tmp_path / "m", lora=lora.LoRAConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 use_dora=True, merge_weights=False))
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                     use_dora=True))
    peft_params = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_" in name:
                if "magnitude" in name:
                    torch.testing.assert_close(p, peft_params[_ours_vs_peft_names(name)], rtol=0, atol=1e-6)
                p.add_(0.1 * torch.randn(p.shape, generator=g))
                peft_params[_ours_vs_peft_names(name)].copy_(p)
    ids = torch.randint(4, 96, (2, 7))
    torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["adalora", "lora2"])
def test_dora_with_a_rank_adaptive_method_is_refused_naming_both(method):
    with pytest.raises(ValueError, match=r"DoRA.*(AdaLoRA|LoRA²)"):
        lora.LoRAConfig(method=method, use_dora=True)


def test_dora_on_a_1x1_convolution_equals_peft():
    """A 1x1 kernel: our conv factors (A (r, in), B (out, r)) are PEFT's, so forward and gradients compare."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 1, bias=True))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                                      use_dora=True))
    ours = lora.inject(copy.deepcopy(base), ["0"], r=2, lora_alpha=4, use_dora=True, merge_weights=False)
    ref = theirs.base_model.model[0]
    torch.testing.assert_close(ours[0].lora_magnitude_vector, ref.lora_magnitude_vector["default"].weight.flatten(),
                               rtol=0, atol=1e-6)
    with torch.no_grad():
        ours[0].lora_A.normal_(), ours[0].lora_B.normal_(), ours[0].lora_magnitude_vector.mul_(1.3)
        ref.lora_A["default"].weight.copy_(ours[0].lora_A.view(2, 4, 1, 1))
        ref.lora_B["default"].weight.copy_(ours[0].lora_B.view(6, 2, 1, 1))
        ref.lora_magnitude_vector["default"].weight.copy_(ours[0].lora_magnitude_vector.view(1, 6, 1, 1))
    x = torch.randn(2, 4, 5, 5)
    y_ours, y_peft = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=0, atol=1e-5)
    w = torch.randn_like(y_ours)
    (y_ours * w).sum().backward(), (y_peft * w).sum().backward()
    torch.testing.assert_close(ours[0].lora_A.grad, ref.lora_A["default"].weight.grad.view(2, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[0].lora_B.grad, ref.lora_B["default"].weight.grad.view(6, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[0].lora_magnitude_vector.grad,
                               ref.lora_magnitude_vector["default"].weight.grad.flatten(), rtol=0, atol=1e-5)


def test_dora_on_a_3x3_convolution_is_the_formula_and_merges_exactly():
    conv = lora.DoRAConv2d(3, 4, 3, r=2, lora_alpha=4, padding=1, merge_weights=False)
    with torch.no_grad():
        conv.lora_B.normal_(), conv.lora_magnitude_vector.mul_(torch.rand(4) + 0.5)
    x = torch.randn(2, 3, 6, 6)
    W = conv.conv.weight + (conv.lora_B @ conv.lora_A).view(4, 3, 3, 3) * conv.scaling
    f = conv.lora_magnitude_vector / W.flatten(1).norm(dim=1)
    want = torch.nn.functional.conv2d(x, W * f.view(-1, 1, 1, 1), conv.conv.bias, padding=1)
    torch.testing.assert_close(conv(x), want, rtol=0, atol=1e-5)
    before = conv.conv.weight.detach().clone()
    conv.merge()
    torch.testing.assert_close(conv(x), want, rtol=0, atol=1e-5)
    conv.unmerge()
    assert torch.equal(conv.conv.weight, before)


def test_loraplus_puts_the_magnitude_where_peft_does():
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    _, ours, theirs = _pair()
    opt = lora.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    ref = peft_loraplus(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    ours_names = {id(p): n for n, p in ours.named_parameters()}
    peft_names = {id(p): n for n, p in theirs.named_parameters()}
    ours_lr = {_ours_vs_peft_names(ours_names[id(p)]): g["lr"] for g in opt.param_groups for p in g["params"]}
    peft_lr = {peft_names[id(p)]: g["lr"] for g in ref.param_groups for p in g["params"]}
    assert ours_lr == peft_lr
    assert ours_lr["base_model.model.q.lora_magnitude_vector.default.weight"] == pytest.approx(16e-3)


def test_export_peft_writes_the_magnitude_where_peft_reads_it(tmp_path):
    base, ours, _ = _pair()
    lora.export_peft(ours, tmp_path / "a")
    from safetensors.torch import load_file
    import json

    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert "base_model.model.q.lora_magnitude_vector" in keys
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    x = torch.randn(6, 12)
    torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=1e-6)


def test_import_peft_reads_a_peft_dora_adapter(tmp_path):
    base, ours, theirs = _pair()
    theirs.save_pretrained(tmp_path / "p")
    back = lora.import_peft(copy.deepcopy(base), tmp_path / "p")
    assert isinstance(back.q, lora.DoRALinear) and back.loralib_config.use_dora
    x = torch.randn(6, 12)
    torch.testing.assert_close(back(x), theirs(x), rtol=0, atol=1e-6)
    lora.export_peft(back, tmp_path / "again")  # and back to PEFT
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(again(x), theirs(x), rtol=0, atol=1e-6)
    # into layers built beforehand without DoRA: refused, naming the layer
    plain = lora.inject(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    with pytest.raises(lora.AdapterError, match=r"use_dora=true but the model's layer '.' is a Linear, built without DoRA"):
        lora.import_peft(plain, tmp_path / "p")


# -- the GLUE entry points take the baselines as flags ---------------------------------------------------
from test_run_glue import LORA2, LORAPLUS, NLU, _base, _json, files  # noqa: E402,F401  (files: a fixture)


@pytest.mark.parametrize("entry, extra, want", [
    (NLU, ("--apply_lora", "--use_dora"), (True, True)),
    (LORA2, ("--apply_lora", "--init_lora_weights", "pissa"), (False, "pissa")),
    (LORAPLUS, ("--target_modules", "query, value", "--use_original_init", "--init_lora_weights", "lora_ga",
                "--loraga_batches", "2"),
     (False, "lora_ga")),
    # GPT-2's fused c_attn: PiSSA chunk by chunk
    (LORAPLUS, ("--target_modules", "c_attn, c_proj, c_fc", "--use_original_init", "--init_lora_weights",
                "pissa_niter_2"), (False, "pissa_niter_2")),
])
def test_glue_entry_points_rerun_a_row_with_a_baseline(files, tmp_path, entry, extra, want):
    out = tmp_path / "run"
    model = "gpt2" if "c_attn, c_proj, c_fc" in extra else "roberta"
    argv = _base(files, model, "rte", out, "--do_train", "--do_eval", "--max_steps", "2", *extra)
    assert entry.main(argv) == 0
    lora_cfg = _json(out / "run_config.json")["lora"]
    assert (lora_cfg["use_dora"], lora_cfg["init_lora_weights"]) == want
    assert 0.0 <= _json(out / "eval_results.json")["accuracy"] <= 1.0


def test_glue_refuses_dora_with_lorapro_naming_both(files, tmp_path, capsys):
    argv = _base(files, "roberta", "rte", tmp_path / "o", "--do_train", "--apply_lora", "--apply_lorapro", "--use_dora")
    assert NLU.main(argv) != 0
    assert "DoRA (--use_dora) does not compose with LoRA-Pro (--apply_lorapro)" in capsys.readouterr().err


def test_glue_refuses_dora_with_adalora_naming_both(files, tmp_path, capsys):
    argv = _base(files, "roberta", "rte", tmp_path / "o", "--do_train", "--apply_lora", "--lora_type", "svd",
                 "--svd_layer", "adalora", "--apply_adalora", "--target_rank", "2", "--use_dora")
    assert LORA2.main(argv) != 0
    assert "--use_dora / --init_lora_weights: DoRA (use_dora=True) does not compose with AdaLoRA" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["dora", "pissa"])
def test_variant_method_names_on_our_deberta_and_through_inject(method):
    """method="dora" / "pissa" is LoRA with use_dora / PiSSA init: in a model file (LoRAConfig) and inject."""
    from test_methods_everywhere import TARGETS as ENCODER_TARGETS, _our_deberta
    from _tiny_hf import tiny_roberta, token_batch

    config = lora.LoRAConfig(r=4, lora_alpha=8, target_modules=ENCODER_TARGETS, method=method)
    assert config.method == "lora" and (config.use_dora, config.init_lora_weights) == (
        (True, True) if method == "dora" else (False, "pissa"))
    plain = _our_deberta(None).eval()
    adapted = _our_deberta(config)
    adapted.load_state_dict(plain.state_dict(), strict=False)
    for _, layer in lora.lora_layers(adapted):  # the weights came after construction: initialise from them
        if layer.has_lora:
            layer.reset_lora_parameters()
    layers = [m for _, m in lora.lora_layers(adapted) if m.has_lora]
    assert len(layers) == 12 and all(isinstance(m, lora.DoRALinear) == (method == "dora") for m in layers)
    ids, mask = token_batch(vocab=64)
    adapted.eval()
    torch.testing.assert_close(adapted(input_ids=ids, attention_mask=mask).logits,
                               plain(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    base = tiny_roberta()
    ids, mask = token_batch()
    model = lora.inject(copy.deepcopy(base), ["query", "value"], r=4, lora_alpha=8, method=method)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               base(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"method='pissa'\) sets init_lora_weights='pissa'; it was given"):
        lora.LoRAConfig(method="pissa", init_lora_weights="lora_ga")


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.q = nn.Linear(6, 5)

    def forward(self, ids):
        return self.q(self.emb(ids))


def test_dora_on_an_embedding_equals_peft_forward_gradients_merge_and_files(tmp_path):
    torch.manual_seed(0)
    base = WithEmbedding()
    targets = ["emb", "q"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets,
                                                                      use_dora=True))
    ours = lora.inject(copy.deepcopy(base), targets, r=3, lora_alpha=6, use_dora=True, merge_weights=False)
    assert isinstance(ours.emb, lora.DoRAEmbedding)
    emb_peft = theirs.base_model.model.emb
    torch.testing.assert_close(ours.emb.lora_magnitude_vector, emb_peft.lora_magnitude_vector["default"].weight,
                               rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer, ref_name in ((ours.emb, "emb"), (ours.q, "q")):
            ref = theirs.base_model.model.get_submodule(ref_name)
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.lora_magnitude_vector.shape, generator=g))
            if ref_name == "emb":
                ref.lora_embedding_A["default"].copy_(layer.lora_A)
                ref.lora_embedding_B["default"].copy_(layer.lora_B)
            else:
                ref.lora_A["default"].weight.copy_(layer.lora_A)
                ref.lora_B["default"].weight.copy_(layer.lora_B)
            ref.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    ids = torch.randint(0, 20, (3, 7))
    y_ours, y_peft = ours(ids), theirs(ids)
    torch.testing.assert_close(y_ours, y_peft, rtol=0, atol=1e-6)
    w = torch.randn_like(y_ours)
    (y_ours * w).sum().backward(), (y_peft * w).sum().backward()
    for mine, ref in ((ours.emb.lora_A, emb_peft.lora_embedding_A["default"]),
                      (ours.emb.lora_B, emb_peft.lora_embedding_B["default"]),
                      (ours.emb.lora_magnitude_vector, emb_peft.lora_magnitude_vector["default"].weight)):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=0, atol=1e-6)
    before = ours.emb.weight.detach().clone()
    ours.emb.merge()
    torch.testing.assert_close(ours(ids), y_peft, rtol=0, atol=1e-6)
    ours.emb.unmerge()
    assert torch.equal(ours.emb.weight, before)
    lora.export_peft(ours, tmp_path / "e")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "e")
    torch.testing.assert_close(loaded(ids), y_peft, rtol=0, atol=1e-6)
    theirs.save_pretrained(tmp_path / "p")
    back = lora.import_peft(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(back(ids), y_peft, rtol=0, atol=1e-6)


@pytest.mark.parametrize("init", [True, "pissa"])
def test_gpt2_fused_qv_with_dora_exports_to_peft_exactly(tmp_path, init):
    """transformers' GPT-2 (Conv1D, fan_in_fan_out) with DoRA on c_attn's q and v (a fused DoRA layer, m over the
    whole projection) and, for PiSSA, residual q and v chunks: the PEFT export gives PEFT the same logits on the
    original model, and importing it back gives ours again."""
    from _tiny_hf import randomise_lora, tiny_gpt2, token_batch

    base = tiny_gpt2()
    model = lora.inject(copy.deepcopy(base), ["c_attn"], r=2, lora_alpha=8, enable_lora=[True, False, True],
                        use_dora=True, init_lora_weights=init, merge_weights=False)
    assert isinstance(model.transformer.h[0].attn.c_attn, lora.DoRAMergedLinear)
    ids, mask = token_batch()
    if init == "pissa":
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   base(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
    randomise_lora(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.abs_().add_(0.5)
    want = model(input_ids=ids, attention_mask=mask).logits
    lora.export_peft(model, tmp_path / "p")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p"))
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)
    back = lora.import_peft(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, want, rtol=1e-5, atol=1e-5)


def test_dora_and_pissa_inside_our_gpt2_model_file(tmp_path):
    """Our GPT-2 file (c_attn a MergedLinear with q, v enabled) built by the loader with DoRA + PiSSA: the
    buffers the init reads are rebuilt first; the step-0 logits are transformers' GPT-2's."""
    from _tiny_hf import tiny_gpt2, token_batch
    from loralib.models.loading import from_pretrained

    hf = tiny_gpt2()
    hf.save_pretrained(tmp_path / "g")
    config = lora.LoRAConfig(r=2, lora_alpha=4, target_modules=("c_attn", "c_fc"), enable_lora=(True, False, True),
                             use_dora=True, init_lora_weights="pissa", merge_weights=False)
    ours = from_pretrained(tmp_path / "g", lora=config)
    c_attn = ours.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, lora.DoRAMergedLinear) and c_attn.initial_factors_set
    ids, mask = token_batch()
    keep = mask.bool()  # padded positions are not compared (ours and transformers' differ there for any model)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).logits[keep], hf(input_ids=ids, attention_mask=mask).logits[keep],
                                   rtol=0, atol=1e-4)
