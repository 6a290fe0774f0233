"""Regression tests for each defect of loralib 0.1.2 that our layers fix (methods.md §1), plus rsLoRA."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib as lora


def _random_B(layer):
    with torch.no_grad():
        layer.lora_B.normal_()


@pytest.mark.parametrize("cls,shape,kwargs", [
    (lora.Conv1d, (2, 3, 11), dict()),
    (lora.Conv1d, (2, 4, 11), dict(groups=2, padding=1)),
    (lora.Conv2d, (2, 3, 7, 7), dict(stride=2)),
    (lora.Conv3d, (2, 3, 5, 6, 7), dict(padding=1)),
])
def test_conv_every_dimension_works_and_merges(cls, shape, kwargs):
    """0.1.2's Conv1d/Conv3d factors cannot be viewed as the kernel (upstream issue #115)."""
    layer = cls(shape[1], 6 if kwargs.get("groups") else 5, 3, r=2, lora_alpha=4, **kwargs)
    assert layer.lora_A.numel() and (layer.lora_B @ layer.lora_A).numel() == layer.conv.weight.numel()
    _random_B(layer)
    x = torch.randn(*shape)
    expected = layer.conv._conv_forward(
        x, layer.conv.weight + (layer.lora_B @ layer.lora_A).view(layer.conv.weight.shape) * layer.scaling,
        layer.conv.bias)
    torch.testing.assert_close(layer(x), expected)
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_merged_linear_without_enabled_chunk_is_plain_linear():
    layer = lora.MergedLinear(8, 24, r=4, enable_lora=[False, False, False])
    assert not hasattr(layer, "lora_A") and layer.weight.requires_grad
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    layer.eval()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_forward_is_per_chunk_low_rank_without_dense_delta(fan_in_fan_out, monkeypatch):
    layer = lora.MergedLinear(8, 24, r=2, lora_alpha=6, enable_lora=[True, False, True],
                              fan_in_fan_out=fan_in_fan_out)
    _random_B(layer)
    x = torch.randn(4, 5, 8)
    # the math, chunk by chunk: q and v get B_g A_g x * scaling, k nothing
    W = layer.weight.T if fan_in_fan_out else layer.weight
    base = F.linear(x, W, layer.bias)
    A_q, A_v = layer.lora_A[:2], layer.lora_A[2:]
    B_q, B_v = layer.lora_B[:8], layer.lora_B[8:]
    s = layer.scaling
    expected = torch.cat([base[..., :8] + x @ A_q.T @ B_q.T * s, base[..., 8:16],
                          base[..., 16:] + x @ A_v.T @ B_v.T * s], dim=-1)
    # a dense (out, in) delta-W must never be built in the unmerged forward
    monkeypatch.setattr(type(layer), "delta_weight", lambda self: pytest.fail("dense delta-W built"))
    torch.testing.assert_close(layer(x), expected)


def test_merge_and_unmerge_are_idempotent():
    layer = lora.Linear(6, 4, r=2)
    _random_B(layer)
    w0 = layer.weight.detach().clone()
    layer.merge()
    merged = layer.weight.detach().clone()
    layer.merge()  # twice: no-op
    torch.testing.assert_close(layer.weight, merged, rtol=0, atol=0)
    layer.unmerge()
    layer.unmerge()  # twice: no-op
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    layer.eval(); layer.eval()
    torch.testing.assert_close(layer.weight, merged, rtol=0, atol=0)


def test_merge_in_low_precision_is_done_in_fp32():
    """bf16 weights: the merged weight is round(W + B A s) computed in fp32, not bf16 arithmetic."""
    torch.manual_seed(3)
    layer = lora.Linear(64, 64, r=8, lora_alpha=16).to(torch.bfloat16)
    _random_B(layer)
    expected = (layer.weight.float() + (layer.lora_B.float() @ layer.lora_A.float()) * layer.scaling
                ).to(torch.bfloat16)
    layer.eval()
    assert torch.equal(layer.weight, expected)


def test_saved_merged_model_is_never_merged_twice(tmp_path):
    """0.1.2: eval() merges, state_dict() then holds W + BA, and eval() after a reload adds BA again."""
    torch.manual_seed(1)
    model = nn.Sequential(lora.Linear(6, 6, r=2, lora_alpha=2), nn.ReLU(), lora.Linear(6, 3, r=2))
    for m in (model[0], model[2]):
        _random_B(m)
    x = torch.randn(4, 6)
    expected = model(x).detach()
    model.eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")

    torch.manual_seed(2)
    fresh = nn.Sequential(lora.Linear(6, 6, r=2, lora_alpha=2), nn.ReLU(), lora.Linear(6, 3, r=2))
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
    # loading into an already-merged model re-merges with the loaded factors
    merged_target = nn.Sequential(lora.Linear(6, 6, r=2, lora_alpha=2), nn.ReLU(), lora.Linear(6, 3, r=2)).eval()
    merged_target.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert merged_target[0].merged
    torch.testing.assert_close(merged_target(x), expected, rtol=1e-5, atol=1e-5)


def test_merged_state_dict_is_for_the_plain_model():
    torch.manual_seed(4)
    model = nn.Sequential(lora.Linear(6, 5, r=2), nn.Tanh(), lora.Linear(5, 3, r=2, fan_in_fan_out=True))
    for m in (model[0], model[2]):
        _random_B(m)
    x = torch.randn(3, 6)
    expected = model(x)
    state = lora.merged_state_dict(model)
    assert not any("lora_" in k for k in state)
    plain = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    state["2.weight"] = state["2.weight"].T  # fan_in_fan_out stores (in, out)
    plain.load_state_dict(state)
    torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)
    assert not model[0].merged  # the model is left as it was


def test_mark_only_lora_as_trainable_reenables_lora_parameters():
    model = nn.Sequential(lora.Linear(4, 4, r=2), nn.Linear(4, 2))
    for p in model.parameters():
        p.requires_grad = False
    lora.mark_only_lora_as_trainable(model)
    assert model[0].lora_A.requires_grad and model[0].lora_B.requires_grad
    assert not model[0].weight.requires_grad and not model[1].weight.requires_grad
    with pytest.raises(ValueError, match="bias"):
        lora.mark_only_lora_as_trainable(model, bias="some")


@pytest.mark.parametrize("make", [
    lambda **kw: lora.Linear(8, 4, r=4, lora_alpha=8, **kw),
    lambda **kw: lora.MergedLinear(8, 12, r=4, lora_alpha=8, enable_lora=[True, False, True], **kw),
    lambda **kw: lora.Embedding(10, 8, r=4, lora_alpha=8, **kw),
    lambda **kw: lora.Conv2d(3, 4, 3, r=4, lora_alpha=8, **kw),
])
def test_rslora_scaling(make):
    assert make().scaling == 8 / 4
    assert make(use_rslora=True).scaling == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=-1), "r must be"),
    (dict(r=2.5), "r must be"),
    (dict(r=4, lora_alpha=0), "lora_alpha"),
    (dict(r=4, lora_alpha=float("nan")), "lora_alpha"),
    (dict(r=4, lora_dropout=1.5), "lora_dropout"),
])
def test_invalid_hyperparameters_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.Linear(4, 4, **kwargs)


def test_enable_lora_must_divide_out_features():
    with pytest.raises(ValueError, match="enable_lora.*out_features=10"):
        lora.MergedLinear(4, 10, r=2, enable_lora=[True, False, True])


@pytest.mark.parametrize("enable", [[True, False, True], [True, True, True], [False, True, False, True]])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_gradients_match_autograd_of_the_math(enable, fan_in_fan_out):
    """The hand-written backward of MergedLinear against autograd through the dense formula, in float64."""
    torch.manual_seed(0)
    layer = lora.MergedLinear(6, 4 * len(enable), r=2, lora_alpha=3, enable_lora=enable,
                              fan_in_fan_out=fan_in_fan_out).double()
    layer.weight.requires_grad = True  # exercise every gradient, the frozen weight's too
    _random_B(layer)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 5, 4 * len(enable), dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    ours = [t.grad.clone() for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)]

    x2 = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    W, b, A, B = params
    n = sum(enable)
    rows = [g for g, on in enumerate(enable) if on]
    per_chunk = [B[i * 4:(i + 1) * 4] @ A[i * 2:(i + 1) * 2] for i in range(n)]
    delta = torch.cat([per_chunk[rows.index(g)] if on else torch.zeros(4, 6, dtype=torch.float64)
                       for g, on in enumerate(enable)])
    W_eff = (W.T if fan_in_fan_out else W) + delta * layer.scaling
    ((x2 @ W_eff.T + b) * upstream).sum().backward()
    for got, want in zip(ours, [x2.grad] + [p.grad for p in params]):
        torch.testing.assert_close(got, want)


def test_merge_keeps_fp64_precision():
    layer = lora.Linear(16, 16, r=4).double()
    _random_B(layer)
    w0 = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.weight, w0 + layer.lora_B @ layer.lora_A * layer.scaling, rtol=0, atol=1e-14)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_linear_trains_under_bf16_autocast(fan_in_fan_out):
    """The hand-written backward receives bf16 gradients for fp32 weights under autocast."""
    torch.manual_seed(0)
    layer = lora.MergedLinear(32, 96, r=4, lora_alpha=8, enable_lora=[True, False, True],
                              fan_in_fan_out=fan_in_fan_out)
    _random_B(layer)
    x = torch.randn(4, 8, 32, requires_grad=True)
    upstream = torch.randn(4, 8, 96)
    (layer(x) * upstream).sum().backward()
    reference = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    (out.float() * upstream).sum().backward()
    for t, ref in zip((x, layer.lora_A, layer.lora_B), reference):
        assert t.grad.dtype == torch.float32
        torch.testing.assert_close(t.grad, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_factors_changed_while_merged_unmerge_exactly():
    """0.1.2 (and PEFT) subtract the *current* B A on unmerge: an optimizer step taken while merged
    leaves W0 + B_old A_old - B_new A_new in the weight. We subtract what was added."""
    layer = lora.Linear(8, 6, r=2)
    _random_B(layer)
    w0 = layer.weight.detach().clone()
    layer.eval()  # merged
    with torch.no_grad():
        layer.lora_B.add_(1.0)
        layer.lora_A.mul_(3.0)
    state = layer.state_dict()
    torch.testing.assert_close(state["weight"], w0, rtol=0, atol=1e-6)
    layer.train()  # unmerged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), x @ w0.T + layer.bias + x @ layer.lora_A.T @ layer.lora_B.T * layer.scaling)


def test_a_rank_above_the_layer_is_said_not_silent():
    """Issue 13 §6: r > min(in, out) was accepted silently; it is a warning naming the sizes (PEFT accepts it,
    and the layer still works), once per layer."""
    import warnings

    import loralib as lora

    with pytest.warns(UserWarning, match=r"r=6 exceeds min\(in_features=4, out_features=8\)"):
        lora.Linear(4, 8, r=6)
    with pytest.warns(UserWarning, match=r"r=3 exceeds min\(in_features=8, out_features=2\)"):
        lora.MergedLinear(8, 6, r=3, enable_lora=[True, False, True])  # chunks of 2 outputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.Linear(4, 8, r=4)
        lora.MergedLinear(8, 6, r=2, enable_lora=[True, False, True])
