"""Each fast path that training and sampling use, checked against the plain path it replaces.

bf16 autocast vs fp32, torch.compile vs eager, the default SDPA kernel vs the math one, fused / foreach AdamW
vs the for-loop, the EMA's foreach lerp vs the reference's loop, gradient checkpointing vs none, our
fixed-step integrators vs torchdiffeq (and their exact number of model calls).

Not here: the cached-latent training path (LatentsDataset draws vs codec.encode); tests/test_extract_latents.py
already checks the cached moments against encoding each image and the draws' statistics.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time

import pytest
import torch
import torch.nn.functional as F

from disploss.dispersive import dispersive_loss
from disploss.regularizer import DispersiveRegularizer
from disploss.training.ema import EMA
from disploss.training.objective import Objective
from disploss.transport import Sampler, create_transport
from disploss.transport.transport import mean_flat
from trainkit import tiny_sit


def _batch(seed: int = 0, n: int = 8, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return (
        x,
        torch.randint(0, classes, (n,), generator=g),
        torch.rand(n, generator=g),
        torch.randn(n, 4, 8, 8, generator=g),
    )


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# -- bf16 autocast ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_autocast_losses_match_fp32_and_reduce_in_fp32(seed):
    model = tiny_sit(seed, class_dropout_prob=0.0).train()
    transport = create_transport()
    x, y, t, noise = _batch(seed)
    kw = dict(t=t, noise=noise)
    objective = Objective(transport, DispersiveRegularizer(model, layers="blocks.1", weight=0.25))
    plain = objective(model, x, y, **kw)
    plain["loss"].mean().backward()
    g32 = _grads(model)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = objective(model, x, y, **kw)
        with torch.no_grad():
            _, acts = model(transport.path.plan(t, noise, x)[1], t, y, return_act=True)
    fast["loss"].mean().backward()
    g16 = _grads(model)

    # The model runs in bf16, but the loss terms are float32 tensors ...
    assert fast["pred"].dtype == torch.bfloat16
    for key in ("flow", "disp", "loss"):
        assert fast[key].dtype == torch.float32, key
    # ... and are reduced in float32: the same reduction of the same bf16 prediction in float64 agrees to float32
    # round-off (a bf16 reduction would be off by ~1e-2 on values ~2).
    _, _, ut = transport.path.plan(t, noise, x)
    flow64 = mean_flat((fast["pred"].double() - ut.double()) ** 2)
    torch.testing.assert_close(fast["flow"].double(), flow64, rtol=1e-6, atol=1e-6)
    disp64 = dispersive_loss(acts[-1].detach().double())
    assert fast["disp"].item() == pytest.approx(disp64.item(), abs=1e-5)

    # bf16 keeps 8 significant bits (unit round-off 2^-8 = 3.9e-3). The per-sample losses average 256 squared
    # errors, so their relative error is about 1e-3 here; 1e-2 leaves a factor of ~10. Gradients sum fewer
    # rounded terms per entry and come out ~1e-2 relative (in norm, per parameter); 5e-2 bounds them.
    for key in ("flow", "disp", "loss"):
        torch.testing.assert_close(fast[key].detach(), plain[key].detach(), rtol=1e-2, atol=1e-3, msg=key)
    assert g16.keys() == g32.keys()
    for k in g32:
        rel = (g16[k] - g32[k]).norm() / g32[k].norm().clamp_min(1e-12)
        assert rel < 5e-2, (k, rel.item())


# -- torch.compile ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_wrapping_gives_the_same_losses_and_grads(backend):
    """The wrapping that `--compile` does (dynamo tracing, graph breaks, return_act, AOT autograd) on CPU.

    The inductor backend needs a C++ toolchain and takes minutes on a small CPU: see the slow test below.
    """
    torch._dynamo.reset()
    transport = create_transport()
    x, y, t, noise = _batch(2)
    results = []
    for compiled in (False, True):
        model = tiny_sit(3, class_dropout_prob=0.0).train()
        reg = DispersiveRegularizer(model, layers="blocks.1", weight=0.25)  # hooks first, then compile
        net = torch.compile(model, backend=backend) if compiled else model
        terms = Objective(transport, reg)(net, x, y, t=t, noise=noise)
        terms["loss"].mean().backward()
        results.append((terms, _grads(model)))
    (plain, g0), (fast, g1) = results
    for key in ("flow", "disp", "loss", "pred"):
        torch.testing.assert_close(fast[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_compile_inductor_matches_eager(request):
    """The real `--compile` backend. On the 2-core CI machine inductor takes ~90 s to compile this tiny model
    (C++ code generation, cold cache), hence it runs only when asked for: `pytest -m slow`."""
    if "slow" not in (request.config.getoption("markexpr") or "").replace("not slow", ""):
        pytest.skip("inductor compiles for ~90 s on a 2-core CPU; run with -m slow")
    torch._dynamo.reset()
    model = tiny_sit(4).eval()
    x, y, t, _ = _batch(4)
    start = time.time()
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            out = compiled(x, t, y)
    except Exception as err:  # noqa: BLE001 - a missing toolchain shows up as one of many error types
        pytest.skip(f"inductor is unavailable here: {type(err).__name__}: {str(err)[:200]}")
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, t, y), rtol=1e-4, atol=1e-5)
    print(f"inductor compile + first call: {time.time() - start:.0f} s")


# -- SDPA backends ----------------------------------------------------------------------------------------
def test_sdpa_default_kernel_matches_math_and_the_formula():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 4, 17, 16, generator=g) for _ in range(3))  # (B, heads, T, D/heads)
    default = F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        math_out = F.scaled_dot_product_attention(q, k, v)
    formula = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(16), dim=-1) @ v.double()
    torch.testing.assert_close(default, math_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(default.double(), formula, rtol=1e-5, atol=1e-6)

    # The whole model (forward and backward) under the math kernel and under the default one.
    x, y, t, _ = _batch(6)
    outs = []
    for backend in (None, SDPBackend.MATH):
        model = tiny_sit(6).train()
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            out, acts = model(x, t, y, return_act=True)
            (out.square().mean() + acts[-1].square().mean()).backward()
        outs.append((out.detach(), _grads(model)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for name in outs[0][1]:
        torch.testing.assert_close(outs[0][1][name], outs[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


# -- AdamW implementations --------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_adamw_fast_implementations_match_the_for_loop(impl):
    """`disploss train` uses fused AdamW on CUDA; the reference uses torch's default. Fused AdamW on the CPU
    exists since torch 2.4 (and is ~2.5x faster than the default for-loop there: BENCHMARKS.md).

    The same gradients are fed to both: real training gradients would make the comparison chaotic, since
    Adam normalises round-off-sized gradients (the key bias of attention has a zero gradient in exact
    arithmetic) into full-size steps.
    """
    base = tiny_sit(7).train()
    start = copy.deepcopy(base.state_dict())
    models = {"for-loop": base, impl: copy.deepcopy(base)}
    try:
        opts = {
            name: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01,
                                    **({"foreach": False} if name == "for-loop" else {impl: True}))
            for name, m in models.items()
        }  # fmt: skip
    except (RuntimeError, ValueError) as err:
        pytest.skip(f"{impl} AdamW is not available on the CPU in torch {torch.__version__}: {err}")
    g = torch.Generator().manual_seed(7)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=g) * 10.0**-step for p in base.parameters()]
        for name, m in models.items():
            for p, grad in zip(m.parameters(), grads):
                p.grad = grad.clone() if p.requires_grad else None
            opts[name].step()
    ref, fast = (dict(models[n].named_parameters()) for n in ("for-loop", impl))
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(ref["blocks.0.mlp.fc1.weight"], start["blocks.0.mlp.fc1.weight"])  # the steps moved it
    assert torch.equal(ref["pos_embed"], start["pos_embed"])  # and left the frozen table alone


# -- EMA ----------------------------------------------------------------------------------------------------
def test_ema_foreach_lerp_matches_the_reference_loop():
    model = tiny_sit(8)
    ema = EMA(model)
    plain = copy.deepcopy(model).requires_grad_(False)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        decay = 0.9 if step % 2 else 0.5
        ema.update(decay)
        # the reference's update_ema: every named parameter (pos_embed included), mul_ then add_
        mp = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in plain.named_parameters():
                p.mul_(decay).add_(mp[name].data, alpha=1 - decay)
    got, want = ema.model.state_dict(), plain.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
    assert not torch.equal(got["blocks.0.attn.qkv.weight"], model.state_dict()["blocks.0.attn.qkv.weight"])


# -- gradient checkpointing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("disp_block", [-1, 0])
def test_grad_checkpointing_training_losses_match(disp_block):
    """Through training_losses with the dispersive term on a checkpointed block's output (tests/test_models.py
    checks the model alone)."""
    transport = create_transport()
    x, y, t, noise = _batch(9)
    results = []
    for ckpt in (False, True):
        model = tiny_sit(9, class_dropout_prob=0.0).train()
        model.grad_checkpointing = ckpt
        reg = DispersiveRegularizer(model, layers=f"blocks.{disp_block % len(model.blocks)}", weight=0.5)
        terms = Objective(transport, reg)(model, x, y, t=t, noise=noise)
        terms["loss"].mean().backward()
        results.append((terms["loss"].detach(), _grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for k in results[0][1]:
        torch.testing.assert_close(results[1][1][k], results[0][1][k], rtol=1e-5, atol=1e-7, msg=k)


# -- fixed-step samplers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,calls_per_step", [("euler", 1), ("heun2", 2)])
@pytest.mark.parametrize("num_steps", [2, 5, 11])
def test_fixed_step_samplers_count_and_match_torchdiffeq(method, calls_per_step, num_steps):
    from torchdiffeq import odeint

    model = tiny_sit(11)
    x, y, _, _ = _batch(11, n=3)
    calls = []

    def model_fn(xx, tt, y):
        calls.append(len(xx))
        return model(xx, tt, y)

    fn = Sampler(create_transport()).sample_ode(sampling_method=method, num_steps=num_steps, keep_trajectory=False)
    out = fn(x, model_fn, y=y)
    assert len(calls) == (num_steps - 1) * calls_per_step  # exact, unlike the adaptive dopri5
    assert calls == [3] * len(calls)  # one batched call per evaluation
    # The plain path: torchdiffeq's own fixed-grid method on the same grid.
    ts = torch.linspace(0, 1, num_steps)
    with torch.no_grad():
        want = odeint(lambda tt, xx: model(xx, tt.expand(len(xx)), y), x, ts, method=method)[-1]
    torch.testing.assert_close(out[-1], want, rtol=1e-5, atol=1e-5)
