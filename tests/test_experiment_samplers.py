"""`disploss experiment samplers`: the quick mode end to end (NFE counted exactly, FID paired with dopri5, the solver
error against the accurate solution), the setting grammar, and a rerun that reuses the cached samples."""

from __future__ import annotations

import json

import pytest

from disploss.commands.main import main
from disploss.errors import ConfigError
from experiments.digits import samplers as ex


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("samplers-quick")
    cache = tmp_path_factory.mktemp("cache")
    argv = ["experiment", "samplers", "--quick", "--out", str(out), "--cache-dir", str(cache),
            "--samplers", "ode:dopri5,ode:heun2:3,ode:ab2:4,ode:ab3:4:power1.5,sde:Euler:5"]  # fmt: skip
    return main(argv), out, argv


def test_quick_run_counts_model_calls_and_pairs_with_dopri5(quick):
    code, out, _ = quick
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["setting"]: r for r in results["summary"]}
    assert list(rows) == [
        ex.REFERENCE_SETTING,
        *"ode:dopri5,ode:heun2:3,ode:ab2:4,ode:ab3:4:power1.5,sde:Euler:5".split(","),
    ]
    # exact model calls of the fixed-step methods; the SDE: (n - 1) steps + the last step
    assert [rows[s]["nfe"]["mean"] for s in ("ode:heun2:3", "ode:ab2:4", "ode:ab3:4:power1.5", "sde:Euler:5")] == [
        4.0,
        3.0,
        4.0,
        5.0,
    ]
    assert rows["ode:dopri5"]["nfe"]["mean"] > 5  # adaptive: at least the 2 initial calls and one 6-call step
    assert rows["ode:dopri5"]["fid_minus_default"]["mean"] == 0.0
    assert rows[ex.REFERENCE_SETTING]["solver_rms_error"]["mean"] == 0.0
    assert rows["ode:ab2:4"]["solver_rms_error"]["mean"] > rows["ode:dopri5"]["solver_rms_error"]["mean"] > 0
    assert rows["sde:Euler:5"]["solver_rms_error"] is None  # another process: no solver error
    for r in rows.values():
        assert r["fid"]["mean"] > 0 and r["fid"]["n"] == 1
    md = (out / "results.md").read_text()
    assert "| `ode:ab2:4` | 3.0 |" in md and (out / "fid_vs_nfe.png").stat().st_size > 1000
    assert not results["runs"][0]["run_dir"].startswith("/")  # relative to --out: no machine's path


def test_rerun_reuses_the_samples(quick, monkeypatch):
    _, out, argv = quick
    before = json.loads((out / "results.json").read_text())["summary"]

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(ex, "sample_setting", no_sampling)
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["summary"] == before


@pytest.mark.parametrize(
    "text,fields",
    [
        ("ode:dopri5", {"mode": "ODE", "sampling_method": "dopri5"}),
        (
            "ode:ab2:11:power1.5",
            {
                "mode": "ODE",
                "sampling_method": "ab2",
                "num_sampling_steps": 11,
                "time_schedule": "power",
                "time_rho": 1.5,
            },
        ),  # fmt: skip
        (
            "ode:dopri5:batch:tol1e-5",
            {"mode": "ODE", "sampling_method": "dopri5", "step_control": "batch", "atol": 1e-5, "rtol": 1e-5},
        ),  # fmt: skip
        ("sde:Euler:50", {"mode": "SDE", "sampling_method": "Euler", "num_sampling_steps": 50}),
    ],
)
def test_setting_grammar(text, fields):
    assert ex.parse_setting(text)["sampler"] == fields


@pytest.mark.parametrize("text", ["dopri5", "ode:ab2:11:fast", "pde:euler"])
def test_bad_settings_name_the_grammar(text):
    with pytest.raises(ConfigError, match="MODE:METHOD|modifiers"):
        ex.parse_setting(text)
