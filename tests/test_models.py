"""SiT backbone: equivalence with the reference fixtures, official checkpoint layout, registry, FLOPs,
init, label dropout, gradient checkpointing and input checks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from disploss.dispersive import dispersive_loss
from disploss.models import SiT, SiT_models, create_model, forward_flops, parse_model_name
from trainkit import tiny_sit

DATA = Path(__file__).parent / "data"


# -- equivalence with the reference fixtures --------------------------------------------------------------
def test_reference_state_dict_has_official_layout(reference, reference_config):
    state = {k[len("model.") :]: v for k, v in reference.items() if k.startswith("model.")}
    ours = SiT(**reference_config["model_config"]).state_dict()
    assert set(ours) == set(state)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in state.items()}
    # strict load (also done by the reference_model fixture) reports nothing missing or unexpected
    result = SiT(**reference_config["model_config"]).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_fixed_pos_embed_equals_reference(reference, reference_config):
    # The reference's 2-D sin-cos table is in its state dict; ours is computed at init.
    ours = SiT(**reference_config["model_config"]).pos_embed
    torch.testing.assert_close(ours, reference["model.pos_embed"], rtol=0, atol=1e-7)
    assert not ours.requires_grad


def test_eval_forward_matches_reference(reference, reference_model):
    with torch.no_grad():
        out = reference_model(reference["fwd_x"], reference["fwd_t"], reference["fwd_y"])
    assert (reference["fwd_y"] == reference_model.num_classes).any()  # the null class is exercised
    torch.testing.assert_close(out, reference["fwd_out"], rtol=0, atol=1e-5)


def test_block_activations_match_reference(reference, reference_model):
    with torch.no_grad():
        out, acts = reference_model(reference["fwd_x"], reference["fwd_t"], reference["fwd_y"], return_act=True)
    assert len(acts) == reference_model.depth
    torch.testing.assert_close(acts[0], reference["fwd_act_first"], rtol=0, atol=1e-5)
    torch.testing.assert_close(acts[-1], reference["fwd_act_last"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out, reference["fwd_out"], rtol=0, atol=1e-5)


def test_dispersive_loss_of_reference_activations(reference, reference_model):
    expected = reference["fwd_disp_act_last_f64"].reshape(())
    got = dispersive_loss(reference["fwd_act_last"].double(), "infonce_l2", tau=1.0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    with torch.no_grad():
        _, acts = reference_model(reference["fwd_x"], reference["fwd_t"], reference["fwd_y"], return_act=True)
    torch.testing.assert_close(dispersive_loss(acts[-1]).double(), expected, rtol=0, atol=1e-5)


def test_cfg_forward_matches_reference(reference, reference_model):
    x, t, y, scale = reference["cfg_x"], reference["cfg_t"], reference["cfg_y"], float(reference["cfg_scale"])
    with torch.no_grad():
        out = reference_model.forward_with_cfg(x, t, y, scale)  # guide_channels=3 is the default (reference)
    torch.testing.assert_close(out, reference["cfg_out"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("guide_channels", [None, 3])
def test_cfg_forward_from_two_plain_forwards(reference, reference_model, guide_channels):
    x, t, y, scale = reference["cfg_x"], reference["cfg_t"], reference["cfg_y"], float(reference["cfg_scale"])
    n = len(x) // 2
    null = torch.full((n,), reference_model.num_classes)
    assert torch.equal(y[n:], null)
    with torch.no_grad():
        cond = reference_model(x[:n], t[:n], y[:n])
        uncond = reference_model(x[:n], t[:n], null)
        out = reference_model.forward_with_cfg(x, t, y, scale, guide_channels=guide_channels)
    guided = uncond + scale * (cond - uncond)
    if guide_channels is None:  # the standard form: every channel guided, both halves identical
        expected = torch.cat([guided, guided])
    else:  # the reference: first 3 channels guided; channel 3 is the plain cond / uncond output
        expected = torch.cat([torch.cat([guided[:, :3], cond[:, 3:]], 1), torch.cat([guided[:, :3], uncond[:, 3:]], 1)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert out.shape == x.shape


# -- the official checkpoint layout -----------------------------------------------------------------------
def _official_keys() -> dict[str, dict[str, tuple[int, ...]]]:
    sections: dict[str, dict[str, tuple[int, ...]]] = {}
    current = None
    for line in (DATA / "sit_official_state_keys.txt").read_text().splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            current = line[1:].split()[0]  # '# SiT-XL/2 input_size=32 ...' -> 'SiT-XL/2'
            sections[current] = {}
            m = re.search(r"(\d+) keys, (\d+) elements", line)
            sections[current]["__counts__"] = (int(m.group(1)), int(m.group(2)))
            continue
        key, shape = line.split("\t")
        sections[current][key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return sections


OFFICIAL = _official_keys()


@pytest.mark.parametrize("name", ["SiT-XL/2", "SiT-B/2"])
def test_official_state_dict_keys_and_shapes(name):
    expected = dict(OFFICIAL[name])
    n_keys, n_elements = expected.pop("__counts__")
    assert len(expected) == n_keys
    with torch.device("meta"):  # XL/2 has 675M parameters: build without allocating them
        model = create_model(name, input_size=32, num_classes=1000, learn_sigma=True)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
    assert sum(v.numel() for v in model.state_dict().values()) == n_elements


def test_official_file_has_both_models():
    assert set(OFFICIAL) == {"SiT-XL/2", "SiT-B/2"}


# -- registry and FLOPs -----------------------------------------------------------------------------------
ARCH_TABLE = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # docs/reference.md


def test_registry_has_the_12_configs():
    expected = {f"SiT-{s}/{p}" for s in ARCH_TABLE for p in (2, 4, 8)}
    assert set(SiT_models) == expected
    for name in expected:
        size, patch = name[4:].split("/")
        assert parse_model_name(name) == (*ARCH_TABLE[size], int(patch))


@pytest.mark.parametrize("name", ["SiT-S/8", "SiT-B/4"])
def test_create_model_builds_the_named_architecture(name):
    with torch.device("meta"):
        model = create_model(name)
    depth, hidden, heads, patch = parse_model_name(name)
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (depth, hidden, heads, patch)
    assert len(model.blocks) == depth
    assert model.x_embedder.proj.kernel_size == (patch, patch)


PAPER_GMACS = {  # docs/paper.md: DiT/SiT "Gflops" (multiply-accumulates per forward, 256 px = 32x32 latents)
    "SiT-S/2": 6.06, "SiT-B/2": 23.0, "SiT-L/2": 80.7, "SiT-XL/2": 118.6,
    "SiT-S/4": 1.41, "SiT-B/4": 5.57, "SiT-XL/4": 29.0,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_forward_flops_match_the_paper(name):
    with torch.device("meta"):
        config = create_model(name).config()
    gmacs = forward_flops(config) / 1e9
    assert abs(gmacs - PAPER_GMACS[name]) / PAPER_GMACS[name] < 0.01


# -- init and shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_is_exactly_zero_at_init(learn_sigma):
    torch.manual_seed(0)
    model = SiT(
        input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5, learn_sigma=learn_sigma
    )
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.rand(3), torch.tensor([0, 4, 5]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0
    assert model.final_layer.linear.out_features == 2 * 2 * (8 if learn_sigma else 4)


@pytest.mark.parametrize("patch", [2, 4])
def test_return_act_shapes(patch):
    model = tiny_sit(patch_size=patch, depth=3)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out, acts = model(x, torch.rand(2), torch.tensor([0, 1]), return_act=True)
    assert out.shape == (2, 4, 8, 8)
    assert len(acts) == 3
    assert all(a.shape == (2, (8 // patch) ** 2, 32) for a in acts)


def test_label_dropout_only_in_train_mode():
    model = tiny_sit(class_dropout_prob=1.0)  # every label is dropped in training mode
    x, t = torch.randn(4, 4, 8, 8), torch.rand(4)
    y, null = torch.tensor([0, 1, 2, 3]), torch.full((4,), 5)
    with torch.no_grad():
        eval_y = model.eval()(x, t, y)
        eval_null = model(x, t, null)
        train_y = model.train()(x, t, y)
    torch.testing.assert_close(train_y, eval_null, rtol=0, atol=1e-6)
    assert (eval_y - eval_null).abs().amax() > 1e-3


def test_label_dropout_rate():
    from disploss.models import LabelEmbedder

    emb = LabelEmbedder(num_classes=10, hidden_size=4, dropout_prob=0.25)
    torch.manual_seed(0)
    dropped = emb.token_drop(torch.zeros(20000, dtype=torch.long)) == 10
    assert abs(dropped.float().mean().item() - 0.25) < 0.015  # 5 standard errors (sqrt(.25*.75/2e4) = 0.003)
    forced = emb.token_drop(torch.arange(4), force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert forced.tolist() == [10, 1, 10, 3]


def test_grad_checkpointing_gives_the_same_gradients():
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    grads, block_calls = [], []
    for ckpt in (False, True):
        model = tiny_sit(class_dropout_prob=0.0).train()
        model.grad_checkpointing = ckpt
        calls = []
        block_forward = model.blocks[0].forward
        model.blocks[0].forward = lambda *args, calls=calls, f=block_forward: calls.append(1) or f(*args)
        out, acts = model(x, t, y, return_act=True)
        (out.square().mean() + acts[-1].square().mean()).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
        block_calls.append(len(calls))
    assert block_calls == [1, 2]  # checkpointing really recomputes the block in backward
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


# -- bad input --------------------------------------------------------------------------------------------
def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="SiT-XL/2") as info:
        create_model("SiT-XXL/2")
    assert "SiT-XXL/2" in str(info.value) and "SiT-S/8" in str(info.value)
    with pytest.raises(ValueError, match="SiT-B/4"):
        parse_model_name("DiT-B/4")


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 4, 16, 16), (2, 4, 8), (2, 4, 8, 6)])
def test_wrong_input_size_is_a_clear_error(shape):
    model = tiny_sit()
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        model(torch.randn(shape), torch.rand(2), torch.tensor([0, 1]))


@pytest.mark.parametrize("labels", [[0, 6], [-1, 0]])
def test_labels_out_of_range_are_a_clear_error(labels):
    model = tiny_sit()  # 5 classes + the null class 5
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 4\]"):
        model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor(labels))


def test_t_and_y_batch_mismatch_is_a_clear_error():
    model = tiny_sit()
    with pytest.raises(ValueError, match="t and y must have shape"):
        model(torch.randn(2, 4, 8, 8), torch.rand(3), torch.tensor([0, 1]))


def test_input_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        SiT(input_size=10, patch_size=4, hidden_size=32, depth=1, num_heads=2)
