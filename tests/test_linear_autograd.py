"""loralib.Linear's hand-written backward (the fused function with one full-width run) against autograd.

Reference: LoRALayer._linear_forward, the plain-autograd path Linear used before (x W^T + b plus
dropout(x) A^T B^T s, added in place), which AdaLoRA and LoRA² still use.
"""
import pytest
import torch

import loralib as lora
from loralib.layers import LoRALayer


def _layer(dtype=torch.float32, fan_in_fan_out=False, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = lora.Linear(6, 5, r=3, lora_alpha=6, lora_dropout=dropout, fan_in_fan_out=fan_in_fan_out,
                        bias=bias).to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 would hide errors in A's gradient and the low-rank output
    return layer.train()


def _seeded(fn, seed=1):
    """fn with the dropout mask fixed: every call draws the same one."""
    def call(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return call


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_float64(fan_in_fan_out, dropout):
    layer = _layer(torch.float64, fan_in_fan_out, dropout)
    layer.weight.requires_grad_(True)  # also check the frozen weight's and the bias's gradient formulas
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias, A, B):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias, "lora_A": A, "lora_B": B},
                                          (x,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in
                   (layer.weight, layer.bias, layer.lora_A, layer.lora_B)))
    assert torch.autograd.gradcheck(_seeded(fn), inputs)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_autograd_path_fp32(fan_in_fan_out, dropout, bias):
    """Output and every gradient (x, A, B, and W when it trains) equal the autograd path's to 1e-6."""
    results = []
    for forward in (lora.Linear.forward, LoRALayer._linear_forward):
        layer = _layer(torch.float32, fan_in_fan_out, dropout, bias)
        layer.weight.requires_grad_(True)
        torch.manual_seed(2)
        x = torch.randn(3, 7, 6, requires_grad=True)
        upstream = torch.randn(3, 7, 5)
        y = _seeded(forward)(layer, x)
        (y * upstream).sum().backward()
        results.append([y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.weight.grad]
                       + ([layer.bias.grad] if bias else []))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_frozen_weight_keeps_only_input_and_rank_r_activations():
    """With W frozen and no dropout the function saves x once plus x A^T (N, r): no second copy of x."""
    layer = _layer()
    x = torch.randn(4, 16, 6, requires_grad=True)
    saved = []
    params = {p.data_ptr() for p in layer.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    activations = {t.untyped_storage().data_ptr(): t.numel() for t in saved if t.data_ptr() not in params}
    assert sum(activations.values()) <= x.numel() + 4 * 16 * 3 + 3 * 5  # x, x A^T, and B^T s (r, out)
    assert layer.weight.grad is None and layer.lora_A.grad is not None


def test_bf16_autocast_matches_autograd_path():
    """Under CPU bf16 autocast the output and gradients keep their dtypes and agree with the autograd path."""
    results = []
    for forward in (lora.Linear.forward, LoRALayer._linear_forward):
        layer = _layer()
        torch.manual_seed(2)
        x = torch.randn(2, 8, 6, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(layer, x)
        y.float().sum().backward()
        results.append((y.dtype, x.grad, layer.lora_A.grad, layer.lora_B.grad))
    (dt_o, *ours), (dt_r, *ref) = results
    assert dt_o == dt_r == torch.bfloat16
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_merged_and_r0_are_plain_linear():
    layer = _layer()
    x = torch.randn(2, 6)
    expected = layer(x).detach()
    layer.eval()  # merges
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    plain = lora.Linear(6, 5, r=0)
    torch.testing.assert_close(plain(x), torch.nn.functional.linear(x, plain.weight, plain.bias))
