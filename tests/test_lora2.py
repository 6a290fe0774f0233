"""LoRA²: the layer against the math, its merge, DeBERTaV3-base counts, the cheaper scoring, the
orthogonality regularizer, and one regression test per released-code defect (methods.md §3)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib as lora
from loralib.adalora import RankAllocator, SVDLinear, compute_orth_regu, rank_pattern, trim_ranks
from loralib.lora2 import LoRA2Linear, LoRA2RankAllocator, compute_lora2_orth_regu, sensitivity_counts


def _layer(d_in=12, d_out=10, r=4, k=3, **kw):
    layer = LoRA2Linear(d_in, d_out, r=r, lora_alpha=8, k=k, **kw)
    with torch.no_grad():
        layer.lora_E.normal_()
    return layer


def _delta_by_hand(layer):
    P = layer.lora_bb @ layer.lora_aa  # (out, r)
    Q = layer.lora_B @ layer.lora_A  # (r, in)
    return P @ torch.diag(layer.lora_E.view(-1)) @ Q * layer.lora_alpha / (layer.r + 1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_forward_is_the_math(fan_in_fan_out):
    layer = _layer(fan_in_fan_out=fan_in_fan_out)
    assert [tuple(getattr(layer, n).shape) for n in ("lora_A", "lora_B", "lora_E", "lora_aa", "lora_bb")] == \
        [(3, 12), (4, 3), (4, 1), (3, 4), (10, 3)]
    x = torch.randn(2, 5, 12)
    W = layer.weight.T if fan_in_fan_out else layer.weight
    delta = _delta_by_hand(layer)
    torch.testing.assert_close(layer(x), x @ (W + delta).T + layer.bias)
    torch.testing.assert_close(layer.delta_weight(), delta.T if fan_in_fan_out else delta)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_equals_unmerged(fan_in_fan_out):
    """Regression: the released merge multiplied (BA)^T * E * (bb aa)^T elementwise: it could not run."""
    model = nn.Sequential(_layer(fan_in_fan_out=fan_in_fan_out), nn.Tanh(), _layer(10, 10))
    x = torch.randn(6, 12)
    unmerged = model(x)
    w0 = model[0].weight.detach().clone()
    model.eval()
    assert model[0].merged and model[2].merged
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.state_dict()["0.weight"], w0, rtol=0, atol=1e-6)
    model.train()
    torch.testing.assert_close(model[0].weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)


def test_init_E_zero_others_normal():
    torch.manual_seed(0)
    layer = LoRA2Linear(64, 48, r=8, lora_alpha=16, k=8)
    assert torch.count_nonzero(layer.lora_E) == 0
    for name in ("lora_A", "lora_B", "lora_aa", "lora_bb"):
        assert abs(getattr(layer, name).std().item() - 0.02) < 0.005, name
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def _deberta_v3_base(k=8, r=8):
    """72 LoRA² matrices shaped like DeBERTaV3-base's q, k, v, attention.output, intermediate, output."""
    shapes = [(768, 768)] * 4 + [(768, 3072), (3072, 768)]
    with torch.device("meta"):
        model = nn.ModuleList(LoRA2Linear(i, o, r=r, lora_alpha=16, k=k) for _ in range(12) for i, o in shapes)
    lora.mark_only_lora_as_trainable(model)
    return model


def test_deberta_v3_base_counts():
    model = _deberta_v3_base()
    assert len(model) == 72
    trainable, _ = lora.count_parameters(model)
    assert trainable == 1_336_896  # the paper's 0.72% of DeBERTaV3-base's 184M
    assert round(100 * trainable / 184e6, 2) == 0.73
    counts = sensitivity_counts(model)
    assert counts["matrices"] == 72 and counts["trainable"] == counts["lora2_params"] == 1_336_896
    assert counts["lora2_scored"] == 72 * (2 * 8 * 8 + 8) == 9_792
    per_layer_adalora = 4 * 8 * (768 + 768 + 1) + 2 * 8 * (768 + 3072 + 1)
    assert counts["adalora_scored"] == counts["adalora_params"] == 12 * per_layer_adalora == 1_327_680
    assert counts["scored_ratio"] == pytest.approx(9_792 / 1_327_680)
    assert counts["reduction"] == pytest.approx(0.99262, abs=1e-5)  # the paper says "about 98.5%"
    # the 0.17M variant is k = 1
    assert sensitivity_counts(_deberta_v3_base(k=1))["lora2_params"] == 72 * 8 * 3 + 12 * (4 * 1536 + 2 * 3840)


def test_allocator_scores_only_the_small_factors():
    model = nn.ModuleList([_layer(12, 10), _layer(10, 10)])
    alloc = LoRA2RankAllocator(model, lora_r=4, target_rank=2, init_warmup=0, final_warmup=0, mask_interval=1,
                               beta1=0.85, beta2=0.85, total_step=10)
    assert alloc.num_scored == 2 * (2 * 4 * 3 + 4)
    assert [f for (_, f, _, _) in alloc._layout] == ["lora_E", "lora_aa", "lora_B"] * 2
    x = torch.randn(5, 12)
    model[1](torch.tanh(model[0](x))).pow(2).sum().backward()
    for layer in model:  # the large factors' gradients are never read
        layer.lora_A.grad = None
        layer.lora_bb.grad = None
    alloc.update_and_mask(model, 1)
    assert sum(sum(v) for v in rank_pattern(model).values()) == int(2 + 6 * (1 - 1 / 10) ** 3)


def test_triplet_score_formula():
    layer = _layer()
    model = nn.ModuleList([layer])
    alloc = LoRA2RankAllocator(model, lora_r=4, target_rank=1, init_warmup=0, final_warmup=0, mask_interval=1,
                               beta1=0.85, beta2=0.85, total_step=10)
    alloc.exp_avg_ipt = torch.rand(alloc.num_scored)
    alloc.exp_avg_unc = torch.rand(alloc.num_scored)
    s = alloc.exp_avg_ipt * alloc.exp_avg_unc
    s_E, s_aa, s_B = s[:4], s[4:16].view(3, 4), s[16:].view(4, 3)
    by_hand = torch.stack([s_E[i] + s_aa[:, i].mean() + s_B[i, :].mean() for i in range(4)])
    torch.testing.assert_close(alloc.triplet_scores()[0], by_hand)


def test_training_reaches_the_budget_and_trims():
    torch.manual_seed(0)
    model = nn.Sequential(_layer(12, 16, r=6, k=4), nn.Tanh(), _layer(16, 16, r=6, k=4), nn.Tanh(),
                          _layer(16, 3, r=6, k=4))
    lora.mark_only_lora_as_trainable(model)
    alloc = LoRA2RankAllocator(model, lora_r=6, target_rank=2, init_warmup=5, final_warmup=10, mask_interval=2,
                               beta1=0.85, beta2=0.85, total_step=40)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(32, 12), torch.randn(32, 3)
    for step in range(1, 41):
        loss = F.mse_loss(model(x), y) + compute_lora2_orth_regu(model, 0.1)
        loss.backward()
        opt.step()
        budget, _ = alloc.update_and_mask(model, step)
        opt.zero_grad()
    assert budget == 6
    pattern = rank_pattern(model)
    assert sum(sum(v) for v in pattern.values()) == 6
    expected = model(x)
    trim_ranks(model)
    kept = {n: sum(v) for n, v in pattern.items()}
    for name, layer in (("0", model[0]), ("2", model[2]), ("4", model[4])):
        assert layer.r == kept[name]
        if kept[name]:
            assert layer.lora_B.shape == (kept[name], 4) and layer.lora_aa.shape == (4, kept[name])
            assert layer.lora_A.shape == (4, layer.in_features)  # the large factors do not depend on r
    torch.testing.assert_close(model(x), expected)


# ---- the orthogonality regularizer -------------------------------------------------------------

def _orthonormal_layer(d=16, r=4, k=4, same_plane=False):
    """Factors with orthonormal rows/columns; Q~'s rows and P~'s columns orthogonal unless same_plane."""
    layer = LoRA2Linear(d, d, r=r, lora_alpha=8, k=k)
    basis = torch.linalg.qr(torch.randn(d, d))[0]
    small_r = torch.linalg.qr(torch.randn(max(r, k), max(r, k)))[0]
    with torch.no_grad():
        layer.lora_A.copy_(basis[:, :k].T)  # rows in span(e_1..e_k)
        layer.lora_bb.copy_(basis[:, :k] if same_plane else basis[:, k:2 * k])
        layer.lora_B.copy_(small_r[:r, :k])  # orthonormal on its smaller side
        layer.lora_aa.copy_(small_r[:k, :r])
        layer.lora_E.normal_()
    return layer


@pytest.mark.parametrize("r,k", [(4, 4), (6, 4), (3, 5)])
def test_regularizer_zero_for_orthonormal_factors_in_orthogonal_planes(r, k):
    layer = _orthonormal_layer(r=r, k=k)
    regu = compute_lora2_orth_regu(nn.ModuleList([layer]), 1.0)
    assert regu.item() < 1e-5
    P, Q = layer.planes()
    torch.testing.assert_close(Q @ P, torch.zeros(r, r), atol=1e-5, rtol=0)
    # the same factors with both planes on the same directions: only the cross term is positive
    same = _orthonormal_layer(r=r, k=k, same_plane=True)
    terms = same.orth_penalties()
    assert max(t.item() for t in terms[:4]) < 1e-5 and terms[4].item() > 0.5


def test_regularizer_is_the_formula_and_positive_otherwise():
    square, rect = _layer(10, 10), _layer(12, 10)
    model = nn.ModuleList([square, rect])

    def gap(m):
        g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        return torch.linalg.norm(g - torch.eye(g.shape[0]))

    terms = [gap(getattr(lay, n)) for lay in (square, rect) for n in ("lora_A", "lora_B", "lora_aa", "lora_bb")]
    terms.append(torch.linalg.norm(square.lora_B @ square.lora_A @ square.lora_bb @ square.lora_aa))
    torch.testing.assert_close(compute_lora2_orth_regu(model, 0.3), 0.3 * sum(terms) / 9)
    torch.testing.assert_close(compute_lora2_orth_regu(model, 0.3, squared=True),
                               0.3 * sum(t ** 2 for t in terms) / 9)
    assert compute_lora2_orth_regu(model, 1.0).item() > 0.1
    torch.testing.assert_close(compute_orth_regu(model, 0.3), compute_lora2_orth_regu(model, 0.3))


def test_regularizer_gradient_reaches_every_factor():
    """Regression: the released regularizer raised, read `.data` (no gradient), was never added to the
    loss, dropped its cross-plane term, and never regularized lora_aa / lora_bb."""
    layer = _orthonormal_layer(same_plane=True)  # only the cross-plane term is non-zero here
    regu = compute_lora2_orth_regu(nn.ModuleList([layer]), 0.1)
    assert regu.requires_grad
    regu.backward()
    for name in ("lora_A", "lora_B", "lora_aa", "lora_bb"):
        assert getattr(layer, name).grad.abs().sum() > 0, name
    layer = _layer(10, 10)
    compute_lora2_orth_regu(nn.ModuleList([layer]), 0.1).backward()
    for name in ("lora_A", "lora_B", "lora_aa", "lora_bb"):
        assert getattr(layer, name).grad.abs().sum() > 0, name


def test_regularizer_descent_orthogonalises_the_planes():
    torch.manual_seed(1)
    layer = _layer(16, 16, r=4, k=4)
    params = [layer.lora_A, layer.lora_B, layer.lora_aa, layer.lora_bb]
    opt = torch.optim.Adam(params, lr=1e-2)
    start = compute_lora2_orth_regu(nn.ModuleList([layer]), 1.0, squared=True).item()
    for _ in range(400):
        opt.zero_grad()
        compute_lora2_orth_regu(nn.ModuleList([layer]), 1.0, squared=True).backward()
        opt.step()
    P, Q = layer.planes()
    assert compute_lora2_orth_regu(nn.ModuleList([layer]), 1.0, squared=True).item() < 1e-3 * start
    torch.testing.assert_close(Q @ Q.T, torch.eye(4), atol=0.05, rtol=0)
    torch.testing.assert_close(P.T @ P, torch.eye(4), atol=0.05, rtol=0)
    assert (Q @ P).abs().max() < 0.05


# ---- registration, errors, released defects ---------------------------------------------------------

def test_config_builds_lora2_with_its_k():
    """Regression: the released layer hard-coded k = 8."""
    config = lora.LoRAConfig(r=6, lora_alpha=12, method="lora2", lora2_k=2, target_modules=("query",))
    layer = config.make_linear("encoder.query", 20, 20)
    assert isinstance(layer, LoRA2Linear) and layer.k == 2 and layer.lora_A.shape == (2, 20)
    assert layer.lora_aa.shape == (2, 6) and layer.scaling == 12
    with pytest.raises(ValueError, match="fused"):
        config.make_linear("query", 8, 24, chunks=3)
    with pytest.raises(ValueError, match="k \\(LoRA²'s inner rank\\)"):
        LoRA2Linear(8, 8, r=4, lora_alpha=8, k=0)


def test_allocator_errors():
    """Regression: the released LoRA² allocator had its beta checks commented out."""
    model = nn.ModuleList([_layer()])
    common = dict(lora_r=4, target_rank=1, init_warmup=2, final_warmup=2, mask_interval=1, total_step=10)
    with pytest.raises(ValueError, match="beta2"):
        LoRA2RankAllocator(model, beta1=0.85, beta2=1.5, **common)
    with pytest.raises(ValueError, match="no LoRA2Linear layer"):
        LoRA2RankAllocator(nn.ModuleList([SVDLinear(8, 8, r=4)]), beta1=0.85, beta2=0.85, **common)
    with pytest.raises(ValueError, match="sensitivity_counts"):
        sensitivity_counts(nn.ModuleList([SVDLinear(8, 8, r=4)]))
    with pytest.raises(ValueError, match="compute_lora2_orth_regu"):
        compute_lora2_orth_regu(nn.ModuleList([SVDLinear(8, 8, r=4)]))
    # the generic allocator takes LoRA² layers too, scoring them the same way
    generic = RankAllocator(model, beta1=0.85, beta2=0.85, **common)
    assert generic.num_scored == 2 * 4 * 3 + 4


def test_schedule_prints_nothing(capsys):
    """Regression: the released LoRA² schedule printed a line every step."""
    alloc = LoRA2RankAllocator(nn.ModuleList([_layer()]), lora_r=4, target_rank=1, init_warmup=2,
                               final_warmup=2, mask_interval=1, beta1=0.85, beta2=0.85, total_step=10)
    for step in range(12):
        alloc.schedule_threshold(step)
    assert capsys.readouterr().out == ""
    assert math.isclose(alloc.schedule_threshold(4)[0], int(1 + 3 * (1 - 2 / 6) ** 3))
