"""AdaLoRA: SVDLinear against the math and PEFT, the RankAllocator against PEFT's and the schedule by hand,
the rank pattern, resumption, and one regression test per released-code defect (methods.md §2)."""
import json
import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import loralib as lora
from loralib.adalora import (RankAllocator, SVDLinear, adalora_state, apply_rank_pattern, compute_orth_regu,
                             rank_pattern, trim_ranks)

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, get_peft_model  # noqa: E402

NAMES = ("fc1", "fc2", "fc3")
DIMS = {"fc1": (10, 12), "fc2": (12, 12), "fc3": (12, 4)}


class Tiny(nn.Module):
    """Three projections; returns an object with .loss so PEFT's AdaLoraModel adds its regularizer."""

    def __init__(self, make):
        super().__init__()
        for name in NAMES:
            setattr(self, name, make(*DIMS[name]))

    def forward(self, x, y):
        out = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return types.SimpleNamespace(logits=out, loss=F.mse_loss(out, y))


def _ours(r=4, alpha=8, **kw):
    return Tiny(lambda i, o: SVDLinear(i, o, r=r, lora_alpha=alpha, **kw))


def _randomize_E(model):
    with torch.no_grad():
        for name in NAMES:
            getattr(model, name).lora_E.normal_()


def _peft_pair(init_r=4, target_r=2, tinit=5, tfinal=9, deltaT=1, total_step=40, alpha=8, orth=0.5):
    """PEFT's AdaLoRA on Tiny and our Tiny with the same weights (base and adapter)."""
    base = Tiny(lambda i, o: nn.Linear(i, o))
    config = AdaLoraConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                           total_step=total_step, lora_alpha=alpha, target_modules=list(NAMES),
                           beta1=0.85, beta2=0.85, orth_reg_weight=orth)
    theirs = get_peft_model(base, config)
    ours = _ours(r=init_r, alpha=alpha)
    with torch.no_grad():
        for name in NAMES:
            t, o = _peft_layer(theirs, name), getattr(ours, name)
            o.weight.copy_(t.base_layer.weight)
            o.bias.copy_(t.base_layer.bias)
            for f in ("lora_A", "lora_E", "lora_B"):
                getattr(o, f).copy_(getattr(t, f)["default"])
    lora.mark_only_lora_as_trainable(ours)
    return theirs, ours


def _peft_layer(peft_model, name):
    return getattr(peft_model.base_model.model, name)


def _sync_to_peft(ours, theirs):
    """Our parameters and gradients into PEFT's model, so both allocators see the same state."""
    with torch.no_grad():
        for name in NAMES:
            t, o = _peft_layer(theirs, name), getattr(ours, name)
            for f in ("lora_A", "lora_E", "lora_B"):
                tp, op = getattr(t, f)["default"], getattr(o, f)
                tp.copy_(op)
                tp.grad = op.grad.clone()


# ---- SVDLinear --------------------------------------------------------------------------------

@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_svdlinear_forward_is_the_math(fan_in_fan_out):
    layer = SVDLinear(6, 5, r=3, lora_alpha=4, fan_in_fan_out=fan_in_fan_out)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(2, 7, 6)
    W = layer.weight.T if fan_in_fan_out else layer.weight
    A, E, B = layer.lora_A, layer.lora_E, layer.lora_B
    delta = B @ torch.diag(E.view(-1)) @ A * 4 / (3 + 1e-5)
    torch.testing.assert_close(layer(x), x @ (W + delta).T + layer.bias)
    torch.testing.assert_close(layer.delta_weight(), delta.T if fan_in_fan_out else delta)


def test_svdlinear_forward_and_delta_match_peft():
    theirs, ours = _peft_pair()
    _randomize_E(ours)
    _sync_to_peft_params(ours, theirs)
    x = torch.randn(5, 10)
    for name in NAMES:
        t, o = _peft_layer(theirs, name), getattr(ours, name)
        torch.testing.assert_close(o.delta_weight(), t.get_delta_weight("default"))
    y = torch.randn(5, 4)
    torch.testing.assert_close(ours(x, y).logits, theirs.base_model.model(x, y).logits)


def _sync_to_peft_params(ours, theirs):
    with torch.no_grad():
        for name in NAMES:
            for f in ("lora_A", "lora_E", "lora_B"):
                getattr(_peft_layer(theirs, name), f)["default"].copy_(getattr(getattr(ours, name), f))


def test_merged_equals_unmerged_and_parent_eval_merges():
    """The released SVDLinear merged only in its own eval(); a parent's eval() calls train(False)."""
    model = _ours()
    _randomize_E(model)
    x, y = torch.randn(4, 10), torch.randn(4, 4)
    unmerged = model(x, y).logits
    w0 = model.fc1.weight.detach().clone()
    model.eval()
    assert all(getattr(model, n).merged for n in NAMES)
    torch.testing.assert_close(model(x, y).logits, unmerged, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.state_dict()["fc1.weight"], w0, rtol=0, atol=1e-6)  # saved unmerged
    model.train()
    torch.testing.assert_close(model.fc1.weight, w0, rtol=0, atol=1e-6)


def test_E_starts_at_zero_whatever_the_entry_point():
    """Regression: E initialised non-zero by mistake (e.g. PEFT's init_lora_weights=False gives randn)."""
    layers = [SVDLinear(8, 6, r=4, lora_alpha=8),
              lora.LoRAConfig(r=4, method="adalora", target_modules=("q",)).make_linear("q", 8, 6)]
    reset = SVDLinear(8, 6, r=4)
    with torch.no_grad():
        reset.lora_E.fill_(1.0)
    reset.reset_parameters()
    layers.append(reset)
    x = torch.randn(3, 8)
    for layer in layers:
        assert isinstance(layer, SVDLinear)
        assert torch.count_nonzero(layer.lora_E) == 0
        assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()  # A, B random: E alone is zero
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


def test_factory_rejects_fused_projections_and_lora_only_options():
    config = lora.LoRAConfig(r=4, method="adalora", target_modules=("c_attn",))
    with pytest.raises(ValueError, match="fused"):
        config.make_linear("c_attn", 8, 24, chunks=3)
    with pytest.raises(ValueError, match="use_rslora"):
        config.replace(use_rslora=True).make_linear("c_attn", 8, 8)
    plain = config.make_linear("other", 8, 8)
    assert not isinstance(plain, SVDLinear)


def test_orth_regu_is_the_formula_and_matches_peft():
    theirs, ours = _peft_pair(orth=0.3)
    x, y = torch.randn(5, 10), torch.randn(5, 4)
    factors = [(getattr(ours, n).lora_A, "A") for n in NAMES] + [(getattr(ours, n).lora_B, "B") for n in NAMES]
    by_hand = sum(torch.linalg.norm((p @ p.T if s == "A" else p.T @ p) - torch.eye(4)) for p, s in factors) / 6
    regu = compute_orth_regu(ours, 0.3)
    torch.testing.assert_close(regu, 0.3 * by_hand)
    peft_extra = theirs.base_model(x, y).loss - ours(x, y).loss  # AdaLoraModel.forward adds its regularizer
    torch.testing.assert_close(regu, peft_extra)
    torch.testing.assert_close(compute_orth_regu(ours, 0.3, squared=True),
                               0.3 * sum(torch.linalg.norm((p @ p.T if s == "A" else p.T @ p) - torch.eye(4)) ** 2
                                         for p, s in factors) / 6)
    regu.backward()
    assert ours.fc1.lora_A.grad.abs().sum() > 0 and ours.fc3.lora_B.grad.abs().sum() > 0


# ---- the allocator against PEFT -----------------------------------------------------------------

@pytest.mark.parametrize("deltaT", [1, 3])
def test_allocator_matches_peft_budget_and_masks(deltaT):
    """Same tiny model, seed, schedule: identical budget at every step and identical masks.

    PEFT's schedule differs from the released one (ours) in one place: at step T - tfinal PEFT
    always masks (force_mask), ours masks only if the step is a multiple of deltaT. With
    T - tfinal = 31 and deltaT = 3 that step is skipped; from T - tfinal + 1 on both mask with the
    frozen scores to the target budget again, so they coincide.
    """
    T, tinit, tfinal = 40, 5, 9
    theirs, ours = _peft_pair(tinit=tinit, tfinal=tfinal, deltaT=deltaT, total_step=T)
    alloc = RankAllocator(ours, lora_r=4, target_rank=2, init_warmup=tinit, final_warmup=tfinal,
                          mask_interval=deltaT, beta1=0.85, beta2=0.85, total_step=T)
    peft_alloc = theirs.base_model.rankallocator
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    x, y = torch.randn(32, 10), torch.randn(32, 4)
    budgets, compared, masked_steps = [], 0, 0
    for step in range(1, T + 6):
        ours(x, y).loss.backward()
        opt.step()
        _sync_to_peft(ours, theirs)
        budget, threshold = alloc.update_and_mask(ours, step)
        assert budget == peft_alloc.budget_schedule(step)[0], step
        theirs.base_model.update_and_allocate(step)
        if step < T - tfinal:  # identical importance state, entry by entry (PEFT resets it at T - tfinal)
            for stat in ("exp_avg_ipt", "exp_avg_unc"):
                mine = alloc._per_factor(getattr(alloc, stat))
                for key, value in getattr(peft_alloc, stat).items():
                    assert torch.equal(mine[key.replace(".default", "")], value), (step, stat, key)
        budgets.append(budget)
        masked_steps += threshold is not None
        if step == T - tfinal and deltaT > 1 and step % deltaT:
            continue  # PEFT's forced mask; ours masks at the next step
        for name in NAMES:
            o, t = getattr(ours, name).lora_E, _peft_layer(theirs, name).lora_E["default"]
            assert torch.equal(o, t), (step, name)
        compared += 1
        opt.zero_grad()
    opt.zero_grad()
    assert budgets[0] == 12 and budgets[-1] == 6 and len(set(budgets)) > 3  # the schedule really moved
    assert masked_steps > 5 and compared >= T + 4
    # the final pattern: ours on the layers, PEFT's in its config
    peft_pattern = {k.split(".")[0]: v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert rank_pattern(ours) == peft_pattern
    assert sum(sum(v) for v in rank_pattern(ours).values()) == 6


# ---- schedule and threshold by hand ---------------------------------------------------------------

def _alloc(model=None, **kw):
    args = dict(lora_r=4, target_rank=1, init_warmup=10, final_warmup=20, mask_interval=5, beta1=0.85,
                beta2=0.85, total_step=100)
    args.update(kw)
    return RankAllocator(model if model is not None else _ours(), **args)


def test_budget_schedule_by_hand():
    alloc = _alloc()  # b0 = 3 x 4 = 12, bT = 3 x 1 = 3, budgeting over steps 11..80 (70 steps)
    assert (alloc.total_rank, alloc.target_rank) == (12, 3)
    expected = {0: (12, False), 10: (12, False),
                11: (int(3 + 9 * (69 / 70) ** 3), False),  # 11.62 -> 11
                15: (int(3 + 9 * (65 / 70) ** 3), True),  # 10.20 -> 10, a multiple of mask_interval
                45: (4, True),  # halfway: 3 + 9 / 8 = 4.125 -> 4
                79: (3, False), 80: (3, True), 81: (3, True), 100: (3, True), 150: (3, True)}
    assert expected[11][0] == 11 and expected[15][0] == 10
    for step, want in expected.items():
        assert alloc.schedule_threshold(step) == want, step
    assert _alloc(target_total_rank=5).schedule_threshold(45) == (int(5 + 7 / 8), True)


def _fill_scores(alloc, scores):
    """Give every scored entry of layer i, triplet j a chosen importance."""
    alloc.exp_avg_ipt = torch.zeros(alloc.num_scored)
    alloc.exp_avg_unc = torch.ones(alloc.num_scored)
    for (i, fname, off, shape) in alloc._layout:
        block = alloc.exp_avg_ipt[off:off + math.prod(shape)].view(shape)
        s = scores[i]
        block.copy_(s.view(-1, 1).expand(shape) if fname != "lora_B" else s.view(1, -1).expand(shape))


@pytest.mark.parametrize("budget", [0, 1, 5, 11, 12])
def test_threshold_keeps_exactly_the_budget(budget):
    model = _ours()
    _randomize_E(model)
    alloc = _alloc(model, target_rank=0)
    scores = torch.randperm(12).float().view(3, 4) + 1  # distinct: no ties
    _fill_scores(alloc, scores)
    alloc.mask_to_target_rank(model, budget)
    kept = torch.cat([getattr(model, n).lora_E.view(-1) != 0 for n in NAMES])
    assert int(kept.sum()) == budget
    # exactly the `budget` best triplets (triplet score = 3 x the entry score)
    assert torch.equal(kept, torch.isin(scores.view(-1), scores.view(-1).topk(budget).values))
    assert sum(sum(v) for v in rank_pattern(model).values()) == budget


def test_budget_equal_to_initial_masks_nothing():
    """Regression: kthvalue(k = b0 - budget = 0) is out of range in the released code."""
    model = _ours()
    _randomize_E(model)
    alloc = _alloc(model, target_rank=4, mask_interval=1)  # bT = b0: every mask step has k = 0
    E0 = [getattr(model, n).lora_E.detach().clone() for n in NAMES]
    x, y = torch.randn(8, 10), torch.randn(8, 4)
    for step in range(1, 101):
        model(x, y).loss.backward()
        budget, threshold = alloc.update_and_mask(model, step)
        model.zero_grad()
        assert budget == 12
    assert threshold == float("-inf")
    for n, e in zip(NAMES, E0):
        torch.testing.assert_close(getattr(model, n).lora_E, e)


# ---- errors -----------------------------------------------------------------------------------

def test_impossible_schedules_are_value_errors():
    with pytest.raises(ValueError, match="total_step=30 leaves no budgeting phase"):
        _alloc(total_step=30)  # == init_warmup + final_warmup
    with pytest.raises(ValueError, match="total_step"):
        _alloc(total_step=12)
    with pytest.raises(ValueError, match="exceeds the initial budget 12"):
        _alloc(target_rank=5)
    with pytest.raises(ValueError, match="exceeds the initial budget"):
        _alloc(target_total_rank=13)
    with pytest.raises(ValueError, match="no SVDLinear or LoRA2Linear layer"):
        _alloc(Tiny(lambda i, o: lora.Linear(i, o, r=4)))
    with pytest.raises(ValueError, match="beta1"):
        _alloc(beta1=1.0)
    with pytest.raises(ValueError, match="mask_interval"):
        _alloc(mask_interval=0)
    with pytest.raises(ValueError, match="lora_r=8 but layer 'fc1' has r=4"):
        _alloc(lora_r=8)
    alloc = _alloc(total_step=None)
    with pytest.raises(ValueError, match="total_step is not set"):
        alloc.update_and_mask(alloc.model, 1)
    with pytest.raises(ValueError, match="leaves no budgeting phase"):
        alloc.set_total_step(25)


def test_paper_settings_are_accepted():
    """Regression: the total-step assert fired with paper settings. Every GLUE row of recipes.md (batch 32)."""
    train_sizes = {"mnli": 392702, "sst2": 67349, "cola": 8551, "qqp": 363846, "qnli": 104743, "rte": 2490,
                   "mrpc": 3668, "stsb": 5749}
    rows = {"mnli": (8, 3, 8000, 50000, 100, 7), "sst2": (8, 2, 6000, 22000, 100, 24),
            "cola": (4, 3, 800, 3500, 10, 25), "qqp": (8, 3, 8000, 25000, 100, 20),
            "qnli": (8, 2, 2000, 8000, 100, 5), "rte": (4, 3, 600, 1800, 1, 50),
            "mrpc": (8, 1, 600, 1800, 1, 30), "stsb": (4, 1, 800, 2000, 10, 25)}
    for task, (r, target, t_i, t_f, interval, epochs) in rows.items():
        model = _ours(r=r)
        total = math.ceil(train_sizes[task] / 32) * epochs
        alloc = RankAllocator(model, lora_r=r, target_rank=target, init_warmup=t_i, final_warmup=t_f,
                              mask_interval=interval, beta1=0.85, beta2=0.85, total_step=total)
        assert alloc.schedule_threshold(total)[0] == 3 * target


def test_missing_gradient_is_a_clear_error():
    """Regression for calling the allocator after zero_grad (or before backward): scores silently wrong."""
    model = _ours()
    alloc = _alloc(model)
    with pytest.raises(RuntimeError, match=r"fc1.lora_E has no gradient.*before optimizer.zero_grad"):
        alloc.update_and_mask(model, 1)


def test_allocator_never_called_is_caught():
    """Regression: integrations that never call the allocator train with constant ranks, silently."""
    model = _ours()
    alloc = _alloc(model)
    with pytest.raises(RuntimeError, match="called never"):
        alloc.check_called(50)
    with pytest.raises(RuntimeError, match="no importance scores yet"):
        alloc.update_and_mask(model, 90)  # first call in the final phase: nothing was ever scored
    x, y = torch.randn(8, 10), torch.randn(8, 4)
    for step in (1, 2):
        model(x, y).loss.backward()
        alloc.update_and_mask(model, step)
        model.zero_grad()
    alloc.check_called(2)
    with pytest.raises(RuntimeError, match="last at step 2"):
        alloc.check_called(7)
    with pytest.raises(ValueError, match="does not hold the layers"):
        alloc.update_and_mask(_ours(), 3)


# ---- training, rank pattern, resumption -----------------------------------------------------------

def _train(model, alloc, steps, opt, x, y, start=1):
    for step in range(start, start + steps):
        out = model(x, y)
        (out.loss + compute_orth_regu(model, 0.1)).backward()
        opt.step()
        alloc.update_and_mask(model, step)
        opt.zero_grad()


def _setup(seed=0, T=30):
    torch.manual_seed(seed)
    model = _ours()
    lora.mark_only_lora_as_trainable(model)
    alloc = RankAllocator(model, lora_r=4, target_rank=2, init_warmup=3, final_warmup=8, mask_interval=2,
                          beta1=0.85, beta2=0.85, total_step=T)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, alloc, opt


def test_resume_is_exact():
    x, y = torch.randn(16, 10), torch.randn(16, 4)
    ref, ref_alloc, ref_opt = _setup()
    _train(ref, ref_alloc, 30, ref_opt, x, y)

    model, alloc, opt = _setup()
    _train(model, alloc, 14, opt, x, y)
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "alloc": alloc.state_dict()}
    model, alloc, opt = _setup(seed=123)  # fresh objects, other random init
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    alloc.load_state_dict(saved["alloc"])
    assert rank_pattern(model) == saved["alloc"]["rank_pattern"]
    _train(model, alloc, 16, opt, x, y, start=15)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert rank_pattern(model) == rank_pattern(ref)
    torch.testing.assert_close(alloc.exp_avg_ipt, ref_alloc.exp_avg_ipt, rtol=0, atol=0)


def test_allocator_state_dict_rejects_another_model():
    model, alloc, _ = _setup()
    state = alloc.state_dict()
    other = RankAllocator(model, lora_r=4, target_rank=1, init_warmup=3, final_warmup=8, mask_interval=2,
                          beta1=0.85, beta2=0.85, total_step=30)
    with pytest.raises(ValueError, match="target_rank"):
        other.load_state_dict(state)
    with pytest.raises(KeyError, match="missing keys"):
        alloc.load_state_dict({"last_step": 1})


def test_rank_pattern_saved_and_reapplied(tmp_path):
    """Regression: rank pattern missing when saving (a reload trains/evaluates with all ranks)."""
    x, y = torch.randn(16, 10), torch.randn(16, 4)
    model, alloc, opt = _setup()
    _train(model, alloc, 30, opt, x, y)
    pattern = rank_pattern(model)
    assert sum(sum(v) for v in pattern.values()) == 6 and any(not all(v) for v in pattern.values())
    (tmp_path / "adalora.json").write_text(json.dumps(adalora_state(model)))
    torch.save(lora.lora_state_dict(model), tmp_path / "adapter.pt")
    model.eval()
    expected = model(x, y).logits

    fresh = _ours()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    fresh.load_state_dict(torch.load(tmp_path / "adapter.pt"), strict=False)
    state = json.loads((tmp_path / "adalora.json").read_text())
    assert state["trimmed"] is False
    apply_rank_pattern(fresh, state["rank_pattern"])
    assert rank_pattern(fresh) == pattern
    fresh.eval()
    torch.testing.assert_close(fresh(x, y).logits, expected)
    with pytest.raises(KeyError, match="missing from the pattern"):
        apply_rank_pattern(fresh, {"fc1": pattern["fc1"]})
    with pytest.raises(ValueError, match="initial rank is 4"):
        apply_rank_pattern(fresh, {**pattern, "fc1": [True]})


def test_trimmed_adapter_round_trip(tmp_path):
    x, y = torch.randn(16, 10), torch.randn(16, 4)
    model, alloc, opt = _setup()
    _train(model, alloc, 30, opt, x, y)
    full_ranks = {n: sum(v) for n, v in rank_pattern(model).items()}
    expected = model(x, y).logits
    trim_ranks(model)
    assert {n: getattr(model, n).r for n in NAMES} == full_ranks
    assert all(getattr(model, n).lora_A.shape[0] == full_ranks[n] for n in NAMES if full_ranks[n])
    torch.testing.assert_close(model(x, y).logits, expected)  # ranknum kept: same output
    state = adalora_state(model)
    assert state["trimmed"] is True
    adapter = lora.lora_state_dict(model)
    assert sum(v.numel() for v in adapter.values()) == sum(full_ranks[n] * (DIMS[n][0] + DIMS[n][1] + 1)
                                                           for n in NAMES)
    with pytest.raises(ValueError, match="rank-trimmed"):
        RankAllocator(model, lora_r=4, target_rank=2, init_warmup=3, final_warmup=8, mask_interval=2,
                      beta1=0.85, beta2=0.85, total_step=30)

    fresh = _ours()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    trim_ranks(fresh, state["rank_pattern"])
    missing = fresh.load_state_dict(adapter, strict=False).missing_keys
    assert not [k for k in missing if "lora_" in k]
    torch.testing.assert_close(fresh(x, y).logits, expected)
    fresh.eval()
    torch.testing.assert_close(fresh(x, y).logits, expected, rtol=1e-5, atol=1e-6)


def test_masking_a_merged_layer_keeps_the_merged_weight_right():
    model = _ours()
    _randomize_E(model)
    alloc = _alloc(model, target_rank=0)
    _fill_scores(alloc, torch.arange(12.0).view(3, 4) + 1)
    model.eval()  # merged
    alloc.mask_to_target_rank(model, 6)
    x, y = torch.randn(4, 10), torch.randn(4, 4)
    merged_out = model(x, y).logits
    model.train()
    torch.testing.assert_close(model(x, y).logits, merged_out, rtol=1e-5, atol=1e-6)


def test_meta_device_build_then_materialise():
    with torch.device("meta"):
        layer = SVDLinear(16, 8, r=4, lora_alpha=8)
    layer = layer.to_empty(device="cpu")
    layer.rebuild_buffers()
    layer.reset_parameters()
    assert layer.ranknum.item() == 4 and layer.rank_mask.all() and torch.count_nonzero(layer.lora_E) == 0
