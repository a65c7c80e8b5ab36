"""The regulariser's captures are bounded and exact (issue 20, item 4): a capture belongs to one forward; a new
forward with gradient (or an exception) starts clean; forwards without a loss() never pile up; a layer called k
times in one forward is one term, the mean of its k values; an in-place change after the hook is refused, naming
the layer; forwards without gradient (MeanFlow's JVP and guidance passes) before or after the pass with gradient
leave its captures alone; torch.compile still traces one graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disploss import DispersiveRegularizer, dispersive_loss
from disploss.errors import ConfigError
from trainkit import tiny_sit


def batch(seed: int = 0, b: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.rand(b, generator=g), torch.randint(0, 5, (b,), generator=g)


def block_outputs(model, x, t, y) -> list[torch.Tensor]:
    """The blocks' outputs of one forward, taken independently of the regulariser (SiT's return_act)."""
    with torch.no_grad():
        _, acts = model(x, t, y, return_act=True)
    return acts


class Fails(nn.Module):
    def forward(self, *args):
        raise RuntimeError("out of memory (simulated)")


def test_an_exception_mid_forward_drops_that_forward_s_captures():
    model = tiny_sit(depth=3, class_dropout_prob=0.0).train()
    reg = DispersiveRegularizer(model, layers="all", weight=1.0)
    x, t, y = batch()
    real_block = model.blocks[2]
    model.blocks[2] = Fails()  # blocks 0 and 1 capture, then the forward raises
    with pytest.raises(RuntimeError, match="simulated"):
        model(x, t, y)
    assert reg._captured == []  # dropped at once: no partial term, no graph kept alive
    with pytest.raises(RuntimeError, match="nothing captured"):
        reg.loss()
    model.blocks[2] = real_block
    model(x, t, y)  # a complete forward, then one that fails in its second block
    model.blocks[1].forward = Fails().forward
    with pytest.raises(RuntimeError, match="simulated"):
        model(x, t, y)
    assert reg._captured == []  # neither the complete forward's (it started clean) nor its own partial ones
    del model.blocks[1].forward
    model(x, t, y)
    acts = block_outputs(model, x, t, y)
    expected = torch.stack([dispersive_loss(a) for a in acts]).mean()
    torch.testing.assert_close(reg.loss().detach(), expected, rtol=1e-6, atol=1e-7)  # exactly one forward's term


def test_forwards_without_loss_keep_one_forward_of_captures():
    model = tiny_sit(depth=2, class_dropout_prob=0.0).train()
    reg = DispersiveRegularizer(model, layers="all", weight=0.5)
    for seed in range(100):  # an eval loop that forgot model.eval(): no loss() for 100 forwards
        model(*batch(seed))
        assert len(reg._captured) == 2  # never more than one forward's worth
    x, t, y = batch(99)
    expected = 0.5 * torch.stack([dispersive_loss(a) for a in block_outputs(model, x, t, y)]).mean()
    torch.testing.assert_close(reg.loss().detach(), expected, rtol=1e-6, atol=1e-7)  # the last forward only


@pytest.mark.parametrize("where", ["before", "after"])
def test_forwards_without_gradient_leave_the_captures_of_the_pass_with_gradient(where):
    model = tiny_sit(depth=2, class_dropout_prob=0.0).train()
    reg = DispersiveRegularizer(model, layers="all", weight=1.0)
    x, t, y = batch(1)
    other = batch(2)
    if where == "before":
        with torch.no_grad():
            model(*other)
    model(x, t, y)
    if where == "after":  # a no-grad pass, an inference pass and an eval-mode pass after it: none captures
        with torch.no_grad():
            model(*other)
        with torch.inference_mode():
            model(*other)
        model.eval()
        model(*other)
        model.train()
    expected = torch.stack([dispersive_loss(a) for a in block_outputs(model, x, t, y)]).mean()
    torch.testing.assert_close(reg.loss().detach(), expected, rtol=1e-6, atol=1e-7)


def test_meanflow_jvp_after_the_pass_with_gradient_keeps_its_capture():
    """MeanFlow's no-grad passes run on the unwrapped model before the pass with gradient (meanflow_losses; its
    test in test_meanflow.py); the same passes after it (forward-AD JVP and guidance under no_grad) drop nothing."""
    from disploss.meanflow import meanflow_target
    from disploss.models import SiT

    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                meanflow=True).train()  # fmt: skip
    reg = DispersiveRegularizer(model, layers="all", weight=1.0)
    x, t, y = batch(3)
    r, keep = (t + 0.2).clamp(max=1.0), torch.zeros_like(y)
    model(x, t, y, r=r, force_drop_ids=keep)
    with torch.no_grad():
        _, acts = model(x, t, y, r=r, force_drop_ids=keep, return_act=True)
    meanflow_target(
        model, x, t, r, torch.randn_like(x), y=y, force_drop_ids=keep
    )  # the JVP pass, on dual tensors without gradient
    with torch.no_grad():
        model(x, t, y, r=t, force_drop_ids=torch.ones_like(y))  # a guidance pass
    assert [name for name, _ in reg._captured] == ["blocks.0", "blocks.1"]
    expected = torch.stack([dispersive_loss(a) for a in acts]).mean()
    torch.testing.assert_close(reg.loss().detach(), expected, rtol=1e-6, atol=1e-7)


class Shared(nn.Module):
    """One layer run twice per forward (a shared block), then another layer once."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.shared(torch.tanh(self.shared(x))))


def test_a_layer_called_twice_is_one_term_the_mean_of_its_calls():
    model = Shared().train()
    reg = DispersiveRegularizer(model, layers=["shared", "head"], weight=0.3, tau=0.7)
    x = torch.randn(5, 6, dtype=torch.float64)
    model.double()
    model(x)
    assert [name for name, _ in reg._captured] == ["shared", "shared", "head"]
    total = reg.loss()
    with torch.no_grad():  # independently: the two calls' outputs, written out
        first = model.shared(x)
        second = model.shared(torch.tanh(first))
        head = model.head(second)
    shared_term = (dispersive_loss(first, tau=0.7) + dispersive_loss(second, tau=0.7)) / 2
    head_term = dispersive_loss(head, tau=0.7)
    torch.testing.assert_close(reg.last_values["shared"], shared_term, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reg.last_values["head"], head_term, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total.detach(), 0.3 * (shared_term + head_term) / 2, rtol=1e-12, atol=1e-12)
    reg.request_diagnostics()
    model(x)
    reg.loss()
    assert set(reg.last_diagnostics) == {"shared", "head"}


class InPlaceAfter(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inplace = inplace
        self.layer = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = self.layer(x)
        if self.inplace:
            h += 1.0  # changes what the hook captured
        else:
            h = h + 1.0
        return self.out(h)


def test_an_in_place_change_after_the_hook_is_refused_naming_the_layer():
    x = torch.randn(4, 6)
    model = InPlaceAfter(inplace=True).train()
    reg = DispersiveRegularizer(model, layers=["layer"])
    model(x)
    with pytest.raises(ConfigError, match="output of layer 'layer' was changed in place after its hook"):
        reg.loss()
    assert reg._captured == []  # the refused captures are gone too
    relu = nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)).train()
    reg2 = DispersiveRegularizer(relu, layers=["0"])
    relu(x)
    with pytest.raises(ConfigError, match="layer '0'"):
        reg2.loss()
    model = InPlaceAfter(inplace=False).train()
    reg3 = DispersiveRegularizer(model, layers=["layer"], weight=1.0)
    model(x)
    torch.testing.assert_close(reg3.loss().detach(), dispersive_loss(model.layer(x)).detach())


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_compile_still_traces_one_graph_with_the_forward_hooks(grad_checkpointing):
    """The root's pre- and post-hooks are traced with the layers' hooks: one graph, no break (explain), and the
    compiled forward keeps one forward of captures."""
    from disploss.regularizer import compile_checkpointed_captures

    if grad_checkpointing and not compile_checkpointed_captures():
        pytest.skip("this torch has no skip_fwd_side_effects_in_bwd_under_checkpoint")
    model = tiny_sit(depth=2, class_dropout_prob=0.0).train()
    model.grad_checkpointing = grad_checkpointing
    reg = DispersiveRegularizer(model, layers="all", weight=0.4)
    x, t, y = batch(4)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x, t, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    net = torch.compile(model, backend="eager", fullgraph=True)
    for seed in range(3):
        net(*batch(seed))
    assert [name for name, _ in reg._captured] == ["blocks.0", "blocks.1"]
    x, t, y = batch(2)
    expected = 0.4 * torch.stack([dispersive_loss(a) for a in block_outputs(model, x, t, y)]).mean()
    torch.testing.assert_close(reg.loss().detach(), expected, rtol=1e-6, atol=1e-7)
    reg.remove()
