"""LoRA-Pro: the projection against least squares, the Sylvester X, first-order steps, Adam by hand, and a
regression test for each defect of the released code (methods.md §5)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib
from loralib.optim import (LoRAProAdamW, LoRAProSGD, adjust_lora_gradients, equivalent_gradient, lora_pairs,
                           lorapro_gradients)
from loralib.optim.lorapro import adjusted_gradients

D = torch.float64


# -- independent references -----------------------------------------------------------------

def lstsq_projection(A, B, g):
    """Orthogonal projection of g onto {B Y + Z A}, by least squares over an explicit spanning set."""
    m, r = B.shape
    n = A.shape[1]
    columns = []
    for i in range(r):
        for j in range(n):
            Y = torch.zeros(r, n, dtype=D)
            Y[i, j] = 1
            columns.append((B.to(D) @ Y).flatten())
    for i in range(m):
        for j in range(r):
            Z = torch.zeros(m, r, dtype=D)
            Z[i, j] = 1
            columns.append((Z @ A.to(D)).flatten())
    M = torch.stack(columns, 1)
    coef = torch.linalg.lstsq(M, g.to(D).flatten()[:, None], driver="gelsd").solution
    return (M @ coef).reshape(m, n)


def closed_projection(A, B, g):
    """P_B g + (I - P_B) g P_A with pseudo-inverses (fp64)."""
    A, B, g = A.to(D), B.to(D), g.to(D)
    PB = B @ torch.linalg.pinv(B)
    PA = torch.linalg.pinv(A) @ A
    return PB @ g + (torch.eye(B.shape[0], dtype=D) - PB) @ g @ PA


def lora_grads(A, B, g, s):
    return s * B.T @ g, s * g @ A.T


def random_factors(m=7, n=6, r=3, dtype=D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(r, n, generator=gen, dtype=dtype), torch.randn(m, r, generator=gen, dtype=dtype),
            torch.randn(m, n, generator=gen, dtype=dtype))


# -- the projection -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 6, 3), (5, 9, 2), (4, 4, 4)])
def test_equivalent_gradient_is_least_squares_projection(dtype, shape):
    m, n, r = shape
    A, B, g = random_factors(m, n, r, dtype)
    s = 2.5
    new_gA, new_gB = lorapro_gradients(A, B, *lora_grads(A, B, g, s), s)
    g_equiv = equivalent_gradient(A.to(new_gA.dtype), B.to(new_gA.dtype), new_gA, new_gB, s)
    reference = lstsq_projection(A, B, g)
    assert (g_equiv.to(D) - reference).abs().max() <= 1e-5 * reference.abs().max()
    # ... and it is not simply LoRA's own equivalent gradient.
    lora_equiv = equivalent_gradient(A, B, *lora_grads(A, B, g, s), s)
    assert (lora_equiv.to(D) - reference).abs().max() > 1e-2


def test_projection_with_singular_factors():
    """B = 0 (step 0) and A = 0 (LoRA+'s swapped init): still the exact projection, no NaN."""
    A, B, g = random_factors()
    s = 2.0
    for A_, B_ in ((A, torch.zeros_like(B)), (torch.zeros_like(A), B)):
        new_gA, new_gB = lorapro_gradients(A_, B_, *lora_grads(A_, B_, g, s), s)
        assert torch.isfinite(new_gA).all() and torch.isfinite(new_gB).all()
        g_equiv = equivalent_gradient(A_, B_, new_gA, new_gB, s)
        assert torch.allclose(g_equiv, lstsq_projection(A_, B_, g), atol=1e-10)
    # The documented closed form at B = 0: g_A' = 0, g_B' = (1/s) g A^T (A A^T)^-1.
    B0 = torch.zeros_like(B)
    new_gA, new_gB = lorapro_gradients(A, B0, *lora_grads(A, B0, g, s), s)
    assert torch.count_nonzero(new_gA) == 0
    assert torch.allclose(new_gB, g @ A.T @ torch.linalg.inv(A @ A.T) / s)
    # Rank-deficient B (one column zero): the projection onto the span the factors really have.
    B1 = B.clone()
    B1[:, 0] = 0
    new_gA, new_gB = lorapro_gradients(A, B1, *lora_grads(A, B1, g, s), s)
    assert torch.allclose(equivalent_gradient(A, B1, new_gA, new_gB, s), lstsq_projection(A, B1, g), atol=1e-9)


def test_batched_adjustment_equals_per_pair():
    """Pairs of equal shapes are solved stacked; each must still get its own A, B and scaling."""
    torch.manual_seed(0)
    model = nn.ModuleList([loralib.Linear(6, 7, r=3, lora_alpha=a, use_rslora=rs) for a, rs in
                           ((3, False), (8, False), (8, True))] +
                          [loralib.MergedLinear(6, 9, r=2, lora_alpha=a, enable_lora=[True, False, True])
                           for a in (2, 5)]).double()
    for p in model.parameters():
        with torch.no_grad():
            p.normal_()
        p.grad = torch.randn_like(p)
    pairs = lora_pairs(model)
    batched = adjusted_gradients((pair, pair.A.grad, pair.B.grad) for pair in pairs)
    assert [pair for pair, _, _ in batched] == pairs
    for pair, new_gA, new_gB in batched:
        A, B = pair.stacked(pair.A, pair.B)
        ref_gA, ref_gB = lorapro_gradients(A, B, *pair.stacked(pair.A.grad, pair.B.grad), pair.scaling)
        assert torch.allclose(new_gA, ref_gA.reshape(pair.A.shape), atol=1e-12)
        assert torch.allclose(new_gB, ref_gB.reshape(pair.B.shape), atol=1e-12)


def _objective(X, A, B, gA, gB, s):
    """||g_A'(X) - g_A||^2 + ||g_B'(X) - g_B||^2 with g_A'(X), g_B'(X) from the paper's closed form."""
    BtB_inv = torch.linalg.inv(B.T @ B)
    AAt_inv = torch.linalg.inv(A @ A.T)
    PB = B @ BtB_inv @ B.T
    gA_X = BtB_inv @ gA / s ** 2 + X @ A
    gB_X = (torch.eye(B.shape[0], dtype=D) - PB) @ gB @ AAt_inv / s ** 2 - B @ X
    return (gA_X - gA).pow(2).sum() + (gB_X - gB).pow(2).sum()


def test_sylvester_X_minimises_its_objective():
    A, B, g = random_factors(9, 8, 3)
    s = 1.7
    gA, gB = lora_grads(A, B, g, s)
    new_gA, new_gB = lorapro_gradients(A, B, gA, gB, s)
    BtB_inv = torch.linalg.inv(B.T @ B)
    X = (new_gA - BtB_inv @ gA / s ** 2) @ torch.linalg.pinv(A)  # the X our g_A' used
    # g_B' used the same X,
    PB = B @ BtB_inv @ B.T
    assert torch.allclose(new_gB, (torch.eye(9, dtype=D) - PB) @ gB @ torch.linalg.inv(A @ A.T) / s ** 2 - B @ X)
    # X solves (B^T B) X + X (A A^T) = -(1/s^2) (B^T B)^-1 g_A A^T,
    residual = B.T @ B @ X + X @ A @ A.T + BtB_inv @ gA @ A.T / s ** 2
    assert residual.abs().max() < 1e-10
    # and every perturbation increases the objective (X = 0 included).
    best = _objective(X, A, B, gA, gB, s)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        dX = torch.randn(3, 3, generator=gen, dtype=D) * 1e-3
        assert _objective(X + dX, A, B, gA, gB, s) > best
    assert _objective(torch.zeros_like(X), A, B, gA, gB, s) > best


# -- layers ---------------------------------------------------------------------------------

def _layer(kind, use_rslora=False, dtype=D):
    torch.manual_seed(0)
    kw = dict(r=3, lora_alpha=6, use_rslora=use_rslora)
    if kind == "linear":
        layer = loralib.Linear(6, 7, **kw)
    elif kind == "linear_fifo":
        layer = loralib.Linear(6, 7, fan_in_fan_out=True, **kw)
    elif kind == "merged":
        layer = loralib.MergedLinear(6, 9, enable_lora=[True, False, True], **kw)
    elif kind == "embedding":
        layer = loralib.Embedding(10, 5, **kw)
    elif kind == "conv2d":
        layer = loralib.Conv2d(2, 4, 3, **kw)
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_()  # away from B = 0 so both factors matter
        layer.lora_A.normal_()
    return layer


def _input(kind, dtype=D):
    gen = torch.Generator().manual_seed(1)
    if kind == "embedding":
        return torch.randint(0, 10, (4, 6), generator=gen)
    if kind == "conv2d":
        return torch.randn(3, 2, 5, 5, generator=gen, dtype=dtype)
    return torch.randn(8, 6, generator=gen, dtype=dtype)


def _loss(model, x):
    out = model(x)
    return (out.sin() * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()


def _as_BA_layout(layer, w):
    """A tensor laid out like the layer's weight -> the chunks of B A it adapts, (chunks, m, n)."""
    if isinstance(layer, loralib.Embedding):
        return w.T.unsqueeze(0)
    if isinstance(layer, loralib.ConvLoRA):
        return w.reshape(1, layer.lora_B.shape[0], layer.lora_A.shape[1])
    if getattr(layer, "fan_in_fan_out", False):
        w = w.T
    if isinstance(layer, loralib.MergedLinear):
        return w[layer.lora_columns].reshape(layer.n_enabled, layer.chunk_size, -1)
    return w.unsqueeze(0)


def _full_gradient(layer, x):
    """dL/dW at W = W0 + s B A, in the B A layout, by autograd on the merged weight."""
    probe = copy.deepcopy(layer)
    probe.merge()
    weight = probe._base_weight()
    weight.requires_grad_(True)
    _loss(probe, x).backward()
    return _as_BA_layout(layer, weight.grad)


def _delta(layer):
    """s B A per chunk, (chunks, m, n), in fp64 (layer.delta_weight() works in fp32)."""
    pair = lora_pairs(layer)[0]
    A, B = pair.stacked(layer.lora_A.detach().to(D), layer.lora_B.detach().to(D))
    return pair.scaling * B @ A


def _projection(layer, g):
    pair = lora_pairs(layer)[0]
    A, B = pair.stacked(layer.lora_A.detach(), layer.lora_B.detach())
    return torch.stack([closed_projection(A[c], B[c], g[c]) for c in range(pair.chunks)])


@pytest.mark.parametrize("kind", ["linear", "linear_fifo", "merged", "embedding", "conv2d"])
def test_sgd_step_moves_W_by_projected_gradient(kind):
    layer, x = _layer(kind), _input(kind)
    g = _full_gradient(layer, x)
    expected = -_projection(layer, g)
    before = _delta(layer)
    w0 = layer._base_weight().detach().clone()
    opt = LoRAProSGD(layer, lr=1.0)
    _loss(layer, x).backward()
    errors = []
    for lr in (1e-3, 1e-4):
        snapshot = copy.deepcopy(layer.state_dict())
        opt.param_groups[0]["lr"] = lr
        opt.step()
        moved = (_delta(layer) - before) / lr
        errors.append((moved - expected).norm() / expected.norm())
        layer.load_state_dict(snapshot)
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 5  # first order: the error shrinks with lr
    assert torch.equal(layer._base_weight(), w0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scaling_read_from_layer(use_rslora):
    """Regression: the released code hard-coded s = 2, so rsLoRA-Pro ran with ~2.83x the learning rate."""
    layer, x = _layer("linear", use_rslora=use_rslora), _input("linear")
    assert lora_pairs(layer)[0].scaling == layer.scaling == (6 / 3 ** 0.5 if use_rslora else 2.0)
    g = _full_gradient(layer, x)
    expected = -1e-5 * _projection(layer, g)
    before = _delta(layer)
    _loss(layer, x).backward()
    LoRAProSGD(layer, lr=1e-5).step()
    assert torch.allclose(_delta(layer) - before, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_one_device_gets_lorapro_at_B_zero():
    """Regression: single-GPU runs silently fell back to plain LoRA. At B = 0 LoRA-Pro's B step is
    -(lr / s) g A^T (A A^T)^-1, not LoRA's -lr s g A^T."""
    torch.manual_seed(0)
    layer = loralib.Linear(6, 7, r=3, lora_alpha=12).double()
    x = _input("linear")
    A = layer.lora_A.detach().clone()
    g = _full_gradient(layer, x)[0]
    _loss(layer, x).backward()
    LoRAProSGD(layer, lr=0.1).step()
    assert torch.allclose(layer.lora_B, -0.1 / layer.scaling * g @ A.T @ torch.linalg.inv(A @ A.T))
    assert torch.equal(layer.lora_A, A)  # g_A' = 0 at B = 0


def _model(dtype=D):
    torch.manual_seed(0)
    model = nn.Sequential(loralib.Linear(6, 8, r=2, lora_alpha=4), nn.Tanh(),
                          loralib.Linear(8, 5, r=3, lora_alpha=3, use_rslora=True), nn.Tanh(), nn.Linear(5, 3))
    loralib.mark_only_lora_as_trainable(model)
    for p in model[4].parameters():
        p.requires_grad = True
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(std=0.3)
    return model.to(dtype)


def _batch(step, n=8, dtype=D):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=gen, dtype=dtype), torch.randn(n, 3, generator=gen, dtype=dtype)


def _mse(model, x, y):
    return F.mse_loss(model(x), y)


def test_full_mode_adam_state_equals_adam_by_hand():
    model = _model()
    opt = LoRAProAdamW(model, lr=1e-2, betas=(0.8, 0.95), eps=1e-8, mode="full")
    beta1, beta2 = 0.8, 0.95
    m = v = None
    for step in range(1, 4):
        x, y = _batch(step)
        layer = model[0]
        # Full-weight gradient at the current W, then its projection computed independently.
        probe = copy.deepcopy(model)
        probe[0].merge()
        probe[0].weight.requires_grad_(True)
        _mse(probe, x, y).backward()
        g = probe[0].weight.grad
        A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        g_equiv = closed_projection(A, B, g)
        m = (1 - beta1) * g_equiv if m is None else beta1 * m + (1 - beta1) * g_equiv
        v = (1 - beta2) * g_equiv ** 2 if v is None else beta2 * v + (1 - beta2) * g_equiv ** 2
        delta_before = _delta(layer)[0]
        opt.zero_grad()
        _mse(model, x, y).backward()
        opt.step()
        state = opt.state[layer.lora_A]
        assert state["step"] == step
        assert torch.allclose(state["exp_avg"][0], m, atol=1e-12)
        assert torch.allclose(state["exp_avg_sq"][0], v, atol=1e-12)
        # The step taken is, to first order, -lr times the projection of the Adam direction.
        direction = (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + 1e-8)
        expected = -1e-2 * closed_projection(A, B, direction)
        moved = _delta(layer)[0] - delta_before
        assert (moved - expected).norm() < 0.05 * expected.norm()
    assert opt.state[model[0].lora_B] == {}  # the pair's state lives under A only


def test_efficient_mode_is_adjusted_gradients_plus_adam():
    """Efficient mode == adjust_lora_gradients + torch's Adam; also checks Adam's bias correction
    (regression: the released code's step count was off by one)."""
    model, twin = _model(), _model()
    opt = LoRAProAdamW(model, lr=1e-2, mode="efficient")
    ref = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for step in range(1, 5):
        x, y = _batch(step)
        for net, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            _mse(net, x, y).backward()
        adjust_lora_gradients(twin)
        opt.step()
        ref.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.allclose(p, q, atol=1e-12, rtol=0), (step, name)
    assert opt.state[model[0].lora_A]["step"] == 4 and opt.state[model[0].lora_B]["exp_avg"].dtype == D


def test_efficient_mode_when_a_pair_skips_steps():
    """Equal-shaped pairs share stacked Adam buffers; a pair without gradient for a step must keep its
    own moments and step count, exactly as torch's AdamW skips a parameter whose grad is None."""
    def build():
        torch.manual_seed(0)
        model = nn.ModuleList([loralib.Linear(6, 6, r=2, lora_alpha=4) for _ in range(3)]).double()
        with torch.no_grad():
            for layer in model:
                layer.lora_B.normal_()
        return model

    def loss(model, step):
        x = _batch(step)[0]
        used = range(3) if step % 3 else (0, 2)  # layer 1 sits out steps 0 and 3
        return sum(model[i](x).sin().sum() for i in used)

    model, twin = build(), build()
    opt = LoRAProAdamW(model, lr=1e-2, mode="efficient")
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0)
    for net in (model, twin):
        for layer in net:
            layer.weight.requires_grad = layer.bias.requires_grad = False
    for step in range(5):
        for net, o in ((model, opt), (twin, ref)):
            o.zero_grad(set_to_none=True)
            loss(net, step).backward()
        adjust_lora_gradients(twin)
        opt.step()
        ref.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.allclose(p, q, atol=1e-12, rtol=0), step
    assert opt.state[model[1].lora_A]["step"] == 3 and opt.state[model[0].lora_A]["step"] == 5


def test_first_update_has_step_one_bias_correction():
    """With correct bias correction the first Adam update is lr * g / (|g| + eps), i.e. ~lr * sign(g)."""
    model = _model()
    opt = LoRAProAdamW(model, lr=1e-3, mode="full")
    head = model[4].weight
    before = head.detach().clone()
    x, y = _batch(0)
    _mse(model, x, y).backward()
    g = head.grad.clone()
    opt.step()
    assert torch.allclose(before - head, 1e-3 * g / (g.abs() + 1e-8), atol=1e-12)


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_head_gets_plain_adamw(mode):
    model = _model()
    head = model[4]
    twin = copy.deepcopy(head)
    opt = LoRAProAdamW(model, lr=1e-2, weight_decay=0.1, mode=mode)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        x, y = _batch(step)
        opt.zero_grad()
        _mse(model, x, y).backward()
        for p, q in zip(head.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for p, q in zip(head.parameters(), twin.parameters()):
            assert torch.allclose(p, q, atol=1e-12, rtol=0)
    assert [g["name"] for g in opt.param_groups] == ["lora", "other"]


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_fp32_state_with_bf16_params(mode):
    """Regression: the released code kept the moments in bf16, where the second moment cannot decay."""
    model = _model(torch.bfloat16)
    opt = LoRAProAdamW(model, lr=1e-3, mode=mode)
    x, y = _batch(0, dtype=torch.bfloat16)
    _mse(model, x, y).backward()
    opt.step()
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
    states = [s for s in opt.state.values() if s]
    assert states and all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32
                          for s in states)
    v_before = [s["exp_avg_sq"].clone() for s in states]
    for p in model.parameters():  # a zero gradient: v must shrink by beta2 = 0.999
        if p.grad is not None:
            p.grad.zero_()
    opt.step()
    for s, v in zip(states, v_before):
        nonzero = v > 0
        assert torch.allclose(s["exp_avg_sq"][nonzero], 0.999 * v[nonzero])
    # The fp32 state survives a state_dict round trip (torch's default would cast it to bf16).
    fresh = LoRAProAdamW(model, lr=1e-3, mode=mode)
    fresh.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[p][key], value) if torch.is_tensor(value) else fresh.state[p][key] == value
            if torch.is_tensor(value):
                assert fresh.state[p][key].dtype == value.dtype


@pytest.mark.parametrize("make", [lambda m: LoRAProAdamW(m, lr=1e-2, mode="full"),
                                  lambda m: LoRAProAdamW(m, lr=1e-2, mode="efficient", weight_decay=0.01),
                                  lambda m: LoRAProSGD(m, lr=1e-1)])
def test_gradient_accumulation_equivalence(make):
    whole, accumulated = _model(), _model()
    opt_whole, opt_acc = make(whole), make(accumulated)
    for step in range(3):
        x, y = _batch(step)
        opt_whole.zero_grad()
        _mse(whole, x, y).backward()
        opt_whole.step()
        opt_acc.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (_mse(accumulated, xs, ys) / 2).backward()
        opt_acc.step()
    for p, q in zip(whole.parameters(), accumulated.parameters()):
        assert torch.allclose(p, q, atol=1e-12)


@pytest.mark.parametrize("mode", ["full", "efficient"])
def test_state_dict_round_trip_resumes_exactly(mode, tmp_path):
    model = _model()
    opt = LoRAProAdamW(model, lr=1e-2, mode=mode, weight_decay=0.01)
    for step in range(4):
        if step == 2:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
        x, y = _batch(step)
        opt.zero_grad()
        _mse(model, x, y).backward()
        opt.step()
    resumed = _model()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt2 = LoRAProAdamW(resumed, lr=1e-2, mode=mode, weight_decay=0.01)
    opt2.load_state_dict(ckpt["opt"])
    for step in range(2, 4):
        x, y = _batch(step)
        opt2.zero_grad()
        _mse(resumed, x, y).backward()
        opt2.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    other = "efficient" if mode == "full" else "full"
    with pytest.raises(ValueError, match="mode"):
        LoRAProAdamW(resumed, lr=1e-2, mode=other).load_state_dict(ckpt["opt"])


@pytest.mark.parametrize("decay_base_weight", [True, False])
def test_weight_decay_on_W(decay_base_weight):
    layer, x = _layer("linear"), _input("linear")
    lr, wd = 1e-4, 0.5
    W_before = layer.weight.detach().clone() + _delta(layer)[0]
    delta_before = _delta(layer)[0]
    w0 = layer.weight.detach().clone()
    g = _full_gradient(layer, x)[0]
    _loss(layer, x).backward()
    LoRAProSGD(layer, lr=lr, weight_decay=wd, decay_base_weight=decay_base_weight).step()
    W_after = layer.weight.detach() + _delta(layer)[0]
    decayed = W_before if decay_base_weight else delta_before
    expected = -lr * wd * decayed - lr * closed_projection(layer.lora_A, layer.lora_B, g)
    assert torch.allclose(W_after - W_before, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    if decay_base_weight:
        assert torch.allclose(layer.weight, (1 - lr * wd) * w0)
    else:
        assert torch.equal(layer.weight, w0)


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="takes the model"):
        LoRAProAdamW(model.named_parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="mode"):
        LoRAProAdamW(model, lr=1e-3, mode="fast")
    model[0].lora_B.requires_grad = False
    with pytest.raises(ValueError, match="both factors"):
        LoRAProSGD(model, lr=1e-3)

    class SVDLike(nn.Module):  # a LoRA parameter LoRA-Pro cannot pair
        def __init__(self):
            super().__init__()
            self.lora_E = nn.Parameter(torch.zeros(3, 1))

    with pytest.raises(ValueError, match="lora_E"):
        LoRAProSGD(nn.Sequential(_model(), SVDLike()), lr=1e-3)


def test_flattened_parameters_detected():
    """ZeRO replaces a client optimizer's params by flat partitions; LoRA-Pro must not silently skip."""
    model = _model()
    opt = LoRAProAdamW(model, lr=1e-3)
    opt.param_groups[0]["params"] = [torch.zeros(10, requires_grad=True)]
    with pytest.raises(RuntimeError, match="ZeRO"):
        opt.step()


def test_full_mode_state_is_dealt_to_ranks_largest_first_to_the_least_loaded():
    from loralib.optim.deepspeed_lorapro import deal_by_size

    assert deal_by_size([5, 3, 3, 1], 2) == [0, 1, 1, 0]       # loads 6 and 6
    assert deal_by_size([4, 4, 4, 4], 4) == [0, 1, 2, 3]
    assert deal_by_size([2, 7], 1) == [0, 0]
    sizes = [16, 45, 16, 45, 16, 45, 16] * 8                   # Llama-like blocks over 8 ranks: even shares
    owners = deal_by_size(sizes, 8)
    assert len({sum(s for s, o in zip(sizes, owners) if o == r) for r in range(8)}) == 1
