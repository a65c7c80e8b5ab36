"""The examples of the docs and examples/: they run, at a toy budget, and say what they claim.

Import-safe: nothing heavy is imported at collection; each test skips without diffusers (or scikit-learn)."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from trainkit import load_example

ROOT = Path(__file__).resolve().parents[1]


def docs_snippet(marker: str) -> str:
    """The ```python block that follows `<!-- marker -->` in docs/regularizer.md."""
    text = (ROOT / "docs" / "regularizer.md").read_text()
    found = re.search(rf"<!-- {re.escape(marker)} -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"docs/regularizer.md has no python block after <!-- {marker} -->"
    return found.group(1)


def independent_infonce_l2(z: torch.Tensor, tau: float) -> torch.Tensor:
    """log mean_ij exp(-||z_i - z_j||^2 / (M tau)) in float64, by direct pairwise distances."""
    z = z.detach().double().flatten(1)
    return torch.log(torch.exp(-(torch.cdist(z, z) ** 2) / z.shape[1] / tau).mean())


def test_unet_example_uses_only_the_public_api():
    tree = ast.parse((ROOT / "examples" / "diffusers_unet.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    ours = {m for m in imported if m.split(".")[0] == "disploss"}
    assert ours == {"disploss", "disploss.data", "disploss.imageio"}, ours


def test_unet_example_trains_both_arms_and_writes_grids(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("sklearn")
    from PIL import Image

    example = load_example("diffusers_unet")
    out = tmp_path / "run"
    argv = ["--steps", "3", "--batch", "4", "--log-every", "1", "--num-samples", "4", "--sample-steps", "2",
            "--layers", "mid_block,down_blocks.*", "--weight", "0.5", "--out", str(out)]  # fmt: skip
    summary = example.main(argv)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))

    for arm in ("baseline", "disp"):  # 4 samples of 16x16 zoomed 2x, a row of 8: 1 x 8 cells of 32 + 2 padding
        grid = np.asarray(Image.open(out / arm / "samples.png"))
        assert grid.shape == (2 + 34, 2 + 8 * 34, 3) and grid[2:34, 2:34].std() > 0

    layers = ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block"]  # in model order
    assert summary["layers"] == layers
    base, disp = summary["arms"]["baseline"]["log"], summary["arms"]["disp"]["log"]
    assert [e["step"] for e in base] == [e["step"] for e in disp] == [1, 2, 3]
    # Same initial weights, batch, timesteps and noise: the first step's MSE and dispersive values are the same in
    # both arms; after one update with the dispersive gradient the arms differ.
    assert base[0]["mse"] == disp[0]["mse"] and base[0]["disp/mid_block"] == disp[0]["disp/mid_block"]
    assert base[1]["mse"] != disp[1]["mse"]
    for entry in base + disp:  # the term is logged in both arms: per layer, their mean, and the diagnostics
        values = [entry[f"disp/{layer}"] for layer in layers]
        assert all(-math.log(4) - 1e-6 <= v <= 0 for v in values)
        assert entry["disp"] == pytest.approx(sum(values) / len(values))
        assert 0 <= entry["diag/mid_block/unsaturated"] <= 1 and entry["diag/mid_block/rms"] > 0
    for arm in ("baseline", "disp"):
        assert len(summary["arms"][arm]["step_ms_all"]) == 3
    assert all(v > 0 for v in summary["step_time_ratio"].values())


def test_docs_dit_snippet_runs_and_its_term_is_the_dispersive_loss():
    """Executes the DiTTransformer2DModel snippet as written, recording every module's output on the side
    (a global forward hook), and checks its dispersive values and total loss against an independent float64
    computation on the recorded block outputs."""
    pytest.importorskip("diffusers")
    code = docs_snippet("snippet: dit")
    outputs: dict[int, object] = {}
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: outputs.setdefault(id(m), o))
    try:
        torch.manual_seed(0)
        namespace: dict = {}
        exec(compile(code, "docs/regularizer.md (DiT snippet)", "exec"), namespace)  # noqa: S102 - our own docs
    finally:
        handle.remove()
    model, reg = namespace["model"], namespace["reg"]
    blocks = [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    assert reg.layer_names == blocks and len(blocks) >= 2
    expected = {name: independent_infonce_l2(outputs[id(model.get_submodule(name))], reg.tau) for name in blocks}
    for name in blocks:
        torch.testing.assert_close(reg.last_values[name].double(), expected[name], rtol=1e-5, atol=1e-6)
    mse = torch.nn.functional.mse_loss(namespace["pred"], namespace["noise"]).double()
    total = mse + reg.weight * torch.stack(list(expected.values())).mean()
    torch.testing.assert_close(namespace["loss"].detach().double(), total, rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in model.transformer_blocks.parameters() if p.requires_grad)


def test_every_test_the_docs_name_exists():
    """A test the docs cite as evidence (`tests/test_x.py` or `test_x.py::test_name`) is a file of tests/ that
    defines that test: a renamed or merged test module cannot leave a page pointing at nothing."""
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md"), *ROOT.glob("*/**/*.md")]
    pages = [p for p in pages if ".venv" not in p.parts and "results" not in p.name]
    cited = re.compile(r"\b(test_[a-z0-9_]+\.py)(?:::([A-Za-z0-9_]+))?")
    defined = {f.name: {n.name for n in ast.parse(f.read_text()).body if hasattr(n, "name")}
               for f in (ROOT / "tests").glob("test_*.py")}  # fmt: skip
    missing, count = [], 0
    for page in pages:
        for match in cited.finditer(page.read_text()):
            count += 1
            module, name = match.groups()
            if module not in defined or (name and name not in defined[module]):
                missing.append(f"{page.relative_to(ROOT)}: {match.group(0)}")
    assert count > 50 and not missing, missing
