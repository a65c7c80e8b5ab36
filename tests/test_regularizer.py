"""DispersiveRegularizer: dispersive loss on any layers of any model, through forward hooks.

Values and gradients are checked against an independent float64 computation (pairwise distances by torch.cdist,
log of the mean of exponentials, autograd through both), on a diffusers UNet, a plain module and SiT."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from disploss.dispersive import dispersion_stats, dispersive_loss
from disploss.errors import ConfigError
from disploss.regularizer import DispersiveRegularizer, resolve_layers
from trainkit import tiny_sit


def independent_infonce_l2(z: torch.Tensor, tau: float) -> torch.Tensor:
    """log mean_ij exp(-||z_i - z_j||^2 / (M tau)) in float64, by direct pairwise distances."""
    z = z.double().flatten(1)
    d = torch.cdist(z, z) ** 2 / z.shape[1]
    return torch.log(torch.exp(-d / tau).mean())


def first_tensor(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    ).train()  # fmt: skip


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# -- values and gradients against an independent computation -------------------------------------------------------
def test_diffusers_unet_value_and_gradient_match_float64():
    pytest.importorskip("diffusers")
    model = tiny_unet().double()
    x, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 5, 9, 20])
    reg = DispersiveRegularizer(model, layers=["down_blocks.*", "mid_block"], weight=0.3, tau=2.0)
    assert reg.layer_names == ["down_blocks.0", "down_blocks.1", "mid_block"]
    model(x, t)
    ours = reg.loss()
    ours.backward()
    g_ours = grads_of(model)
    reg.remove()

    # The same layers' outputs captured by hand (first tensor of the down blocks' tuples), the loss by cdist.
    model.zero_grad(set_to_none=True)
    outs = []
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, a, o: outs.append(first_tensor(o)))
        for n in ("down_blocks.0", "down_blocks.1", "mid_block")
    ]
    model(x, t)
    for h in handles:
        h.remove()
    expected = 0.3 * torch.stack([independent_infonce_l2(z, 2.0) for z in outs]).mean()
    expected.backward()
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.detach(), expected.detach(), rtol=1e-12, atol=1e-12)
    g_exp = grads_of(model)
    assert g_ours.keys() == g_exp.keys() and len(g_exp) > 0
    for k in g_exp:
        torch.testing.assert_close(g_ours[k], g_exp[k], rtol=1e-9, atol=1e-12, msg=k)
    assert any(g.abs().sum() > 0 for g in g_ours.values())


@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_cosine", "hinge", "covariance"])
def test_plain_module_every_variant(variant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    reg = DispersiveRegularizer(model, layers=["1", "3"], weight=0.5, tau=0.7, variant=variant, margin=0.9)
    model(x)
    got = reg.loss()
    h1 = model[1](model[0](x))
    h3 = model[3](model[2](h1))
    if variant == "infonce_l2":
        per_layer = [independent_infonce_l2(h, 0.7) for h in (h1, h3)]
    else:
        per_layer = [dispersive_loss(h, variant, tau=0.7, margin=0.9) for h in (h1, h3)]
    torch.testing.assert_close(got, 0.5 * torch.stack(per_layer).mean(), rtol=1e-12, atol=1e-12)
    assert set(reg.last_values) == {"1", "3"}
    torch.testing.assert_close(reg.last_values["1"], per_layer[0].detach(), rtol=1e-12, atol=1e-12)


def test_sit_multi_block_equals_the_sum_of_single_block_terms():
    model = tiny_sit(depth=4, class_dropout_prob=0.0).train()
    x, t, y = torch.randn(6, 4, 8, 8), torch.rand(6), torch.randint(0, 5, (6,))
    multi = DispersiveRegularizer(model, layers=["blocks.0", "blocks.2", "blocks.3"], weight=0.6)
    singles = [DispersiveRegularizer(model, layers=f"blocks.{i}", weight=0.6 / 3) for i in (0, 2, 3)]
    model(x, t, y)
    total = multi.loss()
    parts = [reg.loss() for reg in singles]
    torch.testing.assert_close(total, torch.stack(parts).sum(), rtol=1e-6, atol=1e-7)
    # ... and each single-block term is the dispersive loss of that block's output (return_act: the reference's)
    with torch.no_grad():
        _, acts = model(x, t, y, return_act=True)
    for i, part in zip((0, 2, 3), parts):
        torch.testing.assert_close(part.detach(), 0.2 * dispersive_loss(acts[i]), rtol=1e-6, atol=1e-7)


# -- capture rules ------------------------------------------------------------------------------------------------
def test_patterns_match_one_component_and_all():
    model = tiny_sit(depth=3)
    assert resolve_layers(model, "blocks.*") == ["blocks.0", "blocks.1", "blocks.2"]
    assert resolve_layers(model, "all") == ["blocks.0", "blocks.1", "blocks.2"]
    assert resolve_layers(model, "blocks.*.attn") == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]
    assert resolve_layers(model, ["blocks.2", "blocks.0", "blocks.2"]) == ["blocks.0", "blocks.2"]  # model order
    wrapped = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(wrapped)
    wrapped.module = model  # a DDP wrapper's names are the wrapped model's
    assert resolve_layers(wrapped, "blocks.1") == ["blocks.1"]


def test_nothing_captured_in_eval_or_without_grad():
    model = tiny_sit()
    reg = DispersiveRegularizer(model, layers="all")
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    model.eval()
    model(x, t, y)
    model.train()
    with torch.no_grad():
        model(x, t, y)
    with torch.inference_mode():
        model(x, t, y)
    assert reg._captured == []
    with pytest.raises(RuntimeError, match="nothing captured"):
        reg.loss()
    reg.enabled = False
    model(x, t, y)
    assert reg._captured == []


def test_remove_detaches_every_hook():
    model = tiny_sit(depth=3).train()
    before = sum(len(m._forward_hooks) for m in model.modules())
    reg = DispersiveRegularizer(model, layers="all")
    assert sum(len(m._forward_hooks) for m in model.modules()) == before + 3 + 1  # + the model's own: a forward's end
    reg.remove()
    reg.remove()  # twice is fine
    assert sum(len(m._forward_hooks) for m in model.modules()) == before
    model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="nothing captured"):
        reg.loss()
    with DispersiveRegularizer(model, layers="blocks.0"):
        assert sum(len(m._forward_hooks) for m in model.modules()) == before + 1 + 1
    assert sum(len(m._forward_hooks) for m in model.modules()) == before


@pytest.mark.parametrize("layers", ["all", "blocks.*.attn"])
def test_no_double_capture_under_activation_checkpointing(layers):
    """SiT checkpoints whole blocks: the recomputation in backward runs a block's attention again (its hook would
    fire a second time); a block's own hook is not reached there (torch stops recomputing early)."""
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.randint(0, 5, (4,))
    runs = []
    for ckpt in (False, True):
        model = tiny_sit(2, class_dropout_prob=0.0).train()
        model.grad_checkpointing = ckpt
        reg = DispersiveRegularizer(model, layers=layers, weight=0.5)
        values = []
        for _ in range(2):  # the second step would see the first backward's recomputed captures, if any
            out = model(x, t, y)
            loss = out.square().mean() + reg.loss()
            assert reg._captured == []
            loss.backward()
            assert reg._captured == [], "the recomputation in backward captured"
            values.append(loss.detach())
        runs.append((values, grads_of(model)))
    (v0, g0), (v1, g1) = runs
    torch.testing.assert_close(torch.stack(v1), torch.stack(v0), rtol=0, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_diffusers_gradient_checkpointing_does_not_capture_twice():
    pytest.importorskip("diffusers")
    model = tiny_unet(1)
    model.enable_gradient_checkpointing()
    reg = DispersiveRegularizer(model, layers=["down_blocks.*", "mid_block"])
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    for _ in range(2):
        out = model(x, t).sample
        (out.square().mean() + reg.loss()).backward()
        assert reg._captured == []


def test_a_layer_inside_a_reentrant_checkpoint_is_named_in_a_warning():
    """A reentrant checkpoint runs its first forward under no_grad: the layer inside captures nothing, and loss()
    says so (once) instead of silently averaging over the other layers; non-reentrant checkpointing captures all."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, reentrant: bool):
            super().__init__()
            self.blocks, self.reentrant = nn.ModuleList(nn.Linear(6, 6) for _ in range(3)), reentrant

        def forward(self, x):
            x = self.blocks[0](x)
            x = checkpoint(self.blocks[1], x, use_reentrant=self.reentrant)
            return self.blocks[2](x)

    torch.manual_seed(0)
    x = torch.randn(4, 6)
    for reentrant in (False, True):
        model = Net(reentrant).train()
        reg = DispersiveRegularizer(model, layers="all")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                model(x).sum().add(reg.loss()).backward()
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if reentrant:
            assert sorted(reg.last_values) == ["blocks.0", "blocks.2"]
            assert len(messages) == 1 and messages[0].startswith("DispersiveRegularizer: blocks.1 captured nothing")
            assert "use_reentrant=False" in messages[0]
        else:
            assert sorted(reg.last_values) == ["blocks.0", "blocks.1", "blocks.2"] and messages == []


def test_bf16_autocast_computes_in_float32():
    model = tiny_sit(4, class_dropout_prob=0.0).train()
    reg = DispersiveRegularizer(model, layers="all")
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.randint(0, 5, (4,))
    model(x, t, y)
    plain = reg.loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y)
        fast = reg.loss()
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=2e-3)  # bf16 activations: ~3 significant digits


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_keeps_the_values_and_gradients(backend):
    torch._dynamo.reset()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.randint(0, 5, (4,))
    results = []
    for compiled in (False, True):
        model = tiny_sit(5, class_dropout_prob=0.0).train()
        reg = DispersiveRegularizer(model, layers=["blocks.0", "blocks.1"], weight=0.4)  # hooks before compile
        net = torch.compile(model, backend=backend) if compiled else model
        loss = net(x, t, y).square().mean() + reg.loss()
        loss.backward()
        results.append((loss.detach(), dict(reg.last_values), grads_of(model)))
    (l0, v0, g0), (l1, v1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    assert v0.keys() == v1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_hooks_added_after_the_compiled_model_ran_are_an_error_not_silence():
    torch._dynamo.reset()
    model = tiny_sit(4).train()
    net = torch.compile(model, backend="eager")
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.randint(0, 5, (4,))
    net(x, t, y)
    reg = DispersiveRegularizer(net, layers="all")
    net(x, t, y)  # the cached graph has no hooks: nothing is captured
    with pytest.raises(RuntimeError, match="nothing captured .* build the regulariser before the compiled model"):
        reg.loss()
    reg.remove()


def test_compile_traces_captures_inside_checkpointed_blocks(monkeypatch):
    """Under activation checkpointing a capture is a side effect inside the checkpoint: dynamo breaks the graph there
    (fullgraph=True refuses) unless told not to replay it in backward. SiT training's build_regularizer sets that
    with --compile --grad-checkpointing; the compiled step then equals the eager one."""
    from disploss.training import TrainConfig
    from disploss.training.objective import build_regularizer

    config = torch._dynamo.config
    if not hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        pytest.skip("this torch has no skip_fwd_side_effects_in_bwd_under_checkpoint")
    monkeypatch.setattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint", False)  # restored after the test
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.randint(0, 5, (4,))
    cfg = TrainConfig(model="SiT-T/2", disp=True, disp_block="all", disp_weight=0.4, compile=True,
                      grad_checkpointing=True)  # fmt: skip
    model = tiny_sit(3, class_dropout_prob=0.0).train()
    model.grad_checkpointing = True
    with DispersiveRegularizer(model, layers="all"):
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported, match="side effect"):
            torch.compile(model, backend="eager", fullgraph=True)(x, t, y)

    results = []
    for compiled in (False, True):
        model = tiny_sit(3, class_dropout_prob=0.0).train()
        model.grad_checkpointing = True
        reg = build_regularizer(model, cfg)
        assert config.skip_fwd_side_effects_in_bwd_under_checkpoint
        torch._dynamo.reset()
        net = torch.compile(model, backend="eager", fullgraph=True) if compiled else model
        loss = net(x, t, y).square().mean() + reg.loss()
        loss.backward()
        assert reg._captured == [] and list(reg.last_values) == ["blocks.0", "blocks.1"]
        results.append((loss.detach(), grads_of(model)))
        reg.remove()
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_arguments_are_one_line_errors_and_leave_no_hook():
    model = tiny_sit(depth=2)
    n_hooks = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    cases = [
        (dict(layers=["blocks.0", "blokcs.1"]), "'blokcs.1' matches no module of SiT; nearest names: blocks.1"),
        (dict(layers="blocks.0", tau=0.0), "tau must be positive"),
        (dict(layers="blocks.0", tau=-1.0), "tau must be positive"),
        (dict(layers="blocks.0", variant="infonce"), "valid choices: infonce_l2, infonce_cosine, hinge, covariance"),
        (dict(layers="blocks.0", weight=float("nan")), "weight must be a finite number"),
        (dict(layers=[]), "at least one layer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            DispersiveRegularizer(model, **kwargs)
        assert "\n" not in str(info.value)
        assert n_hooks() == 0


def test_a_batch_of_one_is_an_error():
    model = tiny_sit().train()
    reg = DispersiveRegularizer(model, layers="blocks.0")
    model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ConfigError, match="a batch of 1 makes the dispersive loss constant"):
        reg.loss()


def test_an_output_without_a_tensor_names_the_layer():
    class NoTensor(nn.Module):
        def forward(self, x):
            return {"shape": x.shape}

    model = nn.Sequential(nn.Linear(3, 3), NoTensor()).train()
    DispersiveRegularizer(model, layers="1")
    with pytest.raises(ConfigError, match="layer '1' returned dict, which holds no tensor"):
        model(torch.randn(4, 3))


# -- distributed: two gloo processes ------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    reg = DispersiveRegularizer(model, layers="2", weight=0.5, gather=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    x = torch.randn(2 * world, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ddp(x[2 * rank : 2 * rank + 2])
    loss = reg.loss()
    loss.backward()
    # numpy, not tensors: torch would share the tensors' memory, which is gone once this process exits
    queue.put((rank, loss.item(), {k: p.grad.numpy().copy() for k, p in model.named_parameters()}))
    dist.destroy_process_group()


def test_gather_under_ddp_gives_the_global_batch_gradient(tmp_path):
    """With gather=True, after DDP averages the gradients over 2 processes, every process holds the gradient of
    weight * L_disp(global batch of 4), as one process computing it on the whole batch would."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = 0.5 * independent_infonce_l2(model(x), 1.0)
    expected.backward()
    for _, value, grads in results:
        assert value == pytest.approx(expected.item(), abs=1e-12)
        for k, p in model.named_parameters():
            torch.testing.assert_close(torch.from_numpy(grads[k]), p.grad, rtol=1e-9, atol=1e-12, msg=k)


# -- diagnostics ----------------------------------------------------------------------------------------------------
def test_dispersion_stats_against_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 5, 3)) * np.linspace(0.2, 3.0, 7)[:, None, None]
    tau = 0.8
    stats = dispersion_stats(torch.from_numpy(z), tau)
    flat = z.reshape(7, -1)
    d = ((flat[:, None] - flat[None]) ** 2).sum(-1) / flat.shape[1]
    off = ~np.eye(7, dtype=bool)
    w = np.exp(-d / tau)
    s = np.linalg.svd(flat - flat.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    expected = {
        "rms": math.sqrt((flat**2).mean()),
        "median_d": np.median(d[np.triu(off, 1)]),
        "unsaturated": (w[off] >= 0.01).mean(),
        "offdiag_weight": w[off].sum() / w.sum(),
        "effective_rank": math.exp(-(p * np.log(p)).sum()),
    }
    assert set(stats) == set(expected)
    for k, v in expected.items():
        assert stats[k].item() == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_diagnostics_on_request():
    model = tiny_sit(6, class_dropout_prob=0.0).train()
    reg = DispersiveRegularizer(model, layers="all", tau=0.5)
    x, t, y = torch.randn(5, 4, 8, 8), torch.rand(5), torch.randint(0, 5, (5,))
    model(x, t, y)
    reg.loss()
    assert reg.last_diagnostics == {}
    reg.request_diagnostics()
    model(x, t, y)
    reg.loss()
    with torch.no_grad():
        _, acts = model(x, t, y, return_act=True)
    assert list(reg.last_diagnostics) == ["blocks.0", "blocks.1"]
    for i, name in enumerate(reg.last_diagnostics):
        expected = dispersion_stats(acts[i], 0.5)
        for k, v in expected.items():
            torch.testing.assert_close(reg.last_diagnostics[name][k], v, rtol=1e-5, atol=1e-6)
    model(x, t, y)
    reg.loss()
    assert list(reg.last_diagnostics) == ["blocks.0", "blocks.1"]  # kept until read; recomputed only on request


def test_layer_normalised_infonce_l2_against_float64():
    torch.manual_seed(3)
    z = (torch.randn(6, 4, 5) * torch.linspace(0.5, 4.0, 6)[:, None, None]).double().requires_grad_(True)
    got = dispersive_loss(z, "infonce_l2_ln", tau=0.5)
    flat = z.flatten(1)
    standardised = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-6)
    expected = independent_infonce_l2(standardised, 0.5)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, z)
    (g_exp,) = torch.autograd.grad(expected, z)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-8, atol=1e-12)
    # scaling a representation does not change it: the term cannot be lowered by inflating norms
    scaled = z.detach().clone()
    scaled[0] *= 10
    assert dispersive_loss(scaled, "infonce_l2_ln", tau=0.5).item() == pytest.approx(got.item(), abs=1e-6)
