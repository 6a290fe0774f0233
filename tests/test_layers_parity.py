"""Our layers against microsoft's loralib 0.1.2: parameters, forward, merged forward, state dicts."""
import pytest
import torch
import torch.nn as nn

import loralib as lora

# (class name, constructor args, input shape) for every layer type 0.1.2 gets right.
CASES = [
    ("Linear", dict(in_features=12, out_features=10, r=4, lora_alpha=8), (3, 5, 12)),
    ("Linear", dict(in_features=12, out_features=10, r=4, lora_alpha=8, fan_in_fan_out=True), (3, 5, 12)),
    ("Linear", dict(in_features=12, out_features=10, r=0), (3, 12)),
    ("Embedding", dict(num_embeddings=30, embedding_dim=8, r=3, lora_alpha=6, padding_idx=0), None),
    ("MergedLinear", dict(in_features=16, out_features=48, r=4, lora_alpha=32,
                          enable_lora=[True, False, True]), (2, 7, 16)),
    ("MergedLinear", dict(in_features=16, out_features=48, r=4, lora_alpha=32,
                          enable_lora=[True, False, True], fan_in_fan_out=True), (2, 7, 16)),
    ("MergedLinear", dict(in_features=16, out_features=48, r=2, lora_alpha=4,
                          enable_lora=[True, True, True]), (2, 7, 16)),
    ("MergedLinear", dict(in_features=16, out_features=32, r=2, lora_alpha=4,
                          enable_lora=[False, True]), (4, 16)),
    ("Conv2d", dict(in_channels=3, out_channels=6, kernel_size=3, r=2, lora_alpha=4, padding=1), (2, 3, 8, 8)),
    ("Conv2d", dict(in_channels=4, out_channels=8, kernel_size=3, r=2, lora_alpha=4, groups=2), (2, 4, 8, 8)),
]


def _input(case_input, seed=1):
    g = torch.Generator().manual_seed(seed)
    if case_input is None:  # embedding ids
        return torch.randint(0, 30, (3, 6), generator=g)
    return torch.randn(*case_input, generator=g)


def _pair(ms_loralib, name, kwargs):
    torch.manual_seed(123)
    theirs = getattr(ms_loralib, name)(**kwargs)
    torch.manual_seed(123)
    ours = getattr(lora, name)(**kwargs)
    return ours, theirs


def _randomise_B(ours, theirs):
    if hasattr(ours, "lora_B"):
        b = torch.randn_like(ours.lora_B)
        with torch.no_grad():
            ours.lora_B.copy_(b)
            theirs.lora_B.copy_(b)


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_same_parameters_under_same_seed(ms_loralib, name, kwargs, shape):
    ours, theirs = _pair(ms_loralib, name, kwargs)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for key in theirs_sd:
        assert ours_sd[key].shape == theirs_sd[key].shape, key
        assert torch.equal(ours_sd[key], theirs_sd[key]), key
    assert ({n: p.requires_grad for n, p in ours.named_parameters()}
            == {n: p.requires_grad for n, p in theirs.named_parameters()})


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_same_forward_unmerged_and_merged(ms_loralib, name, kwargs, shape):
    ours, theirs = _pair(ms_loralib, name, kwargs)
    _randomise_B(ours, theirs)
    x = _input(shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours.eval(), theirs.eval()
    assert ours.merged == theirs.merged
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # merged weights themselves agree (0.1.2 folds B A in place too)
    w_ours = ours.conv.weight if hasattr(ours, "conv") else ours.weight
    w_theirs = theirs.conv.weight if hasattr(theirs, "conv") else theirs.weight
    torch.testing.assert_close(w_ours, w_theirs, rtol=1e-6, atol=1e-6)
    ours.train(), theirs.train()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
    """A small model written once against a loralib-like namespace."""

    def __init__(self, L):
        super().__init__()
        self.emb = L.Embedding(20, 12, r=2)
        self.qkv = L.MergedLinear(12, 36, r=2, lora_alpha=4, enable_lora=[True, False, True])
        self.proj = L.Linear(36, 12, r=2, lora_alpha=4)
        self.head = nn.Linear(12, 3)

    def forward(self, ids):
        return self.head(self.proj(self.qkv(self.emb(ids))))


def test_model_helpers_match(ms_loralib):
    torch.manual_seed(5)
    theirs = _Net(ms_loralib)
    torch.manual_seed(5)
    ours = _Net(lora)
    for bias in ("none", "all", "lora_only"):
        ms_loralib.mark_only_lora_as_trainable(theirs, bias=bias)
        lora.mark_only_lora_as_trainable(ours, bias=bias)
        assert ({n: p.requires_grad for n, p in ours.named_parameters()}
                == {n: p.requires_grad for n, p in theirs.named_parameters()}), bias
        assert list(lora.lora_state_dict(ours, bias=bias)) == list(ms_loralib.lora_state_dict(theirs, bias=bias))


def test_their_lora_checkpoint_loads_into_ours(ms_loralib, tmp_path):
    """The README recipe: pretrained checkpoint first, then the LoRA one, both strict=False."""
    torch.manual_seed(7)
    theirs = _Net(ms_loralib)
    for p in theirs.parameters():
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))  # trained: B is no longer zero
    torch.save(theirs.state_dict(), tmp_path / "pretrained.pt")
    torch.save(ms_loralib.lora_state_dict(theirs), tmp_path / "lora.pt")

    torch.manual_seed(99)
    ours = _Net(lora)
    ours.load_state_dict(torch.load(tmp_path / "pretrained.pt"), strict=False)
    ours.load_state_dict(torch.load(tmp_path / "lora.pt"), strict=False)
    ids = torch.randint(0, 20, (4, 9))
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=1e-5, atol=1e-5)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(ids), theirs(ids), rtol=1e-5, atol=1e-5)
