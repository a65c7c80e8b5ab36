"""Shared fixtures: the reference fixture file (tests/data/sit_reference_small.*), one thread per session, a closed-form
Gaussian target, a recorder of SiT.forward calls and an image folder. Helpers are in trainkit.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def reference() -> dict[str, torch.Tensor]:
    """Every tensor of sit_reference_small.safetensors (produced by the reference code; fixtures/README.md)."""
    from safetensors.torch import load_file

    return load_file(str(DATA / "sit_reference_small.safetensors"))


@pytest.fixture(scope="session")
def reference_config() -> dict:
    """The .json beside it: model_config and the ODE sampler settings ('ode' list)."""
    return json.loads((DATA / "sit_reference_small.json").read_text())


@pytest.fixture(scope="session")
def reference_model(reference, reference_config):
    """The reference SiT (official key names, strict load), in eval mode. Tests must not modify it."""
    from disploss.models import SiT

    model = SiT(**reference_config["model_config"])
    state = {k[len("model.") :]: v for k, v in reference.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One intra-op thread for the whole session, module fixtures included: the CPUs are shared, and on small tensors
    torch's thread pool only adds contention (an SDE test ran 20x slower with 2 threads on a loaded machine). A test
    that changes the thread count restores it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class GaussianTarget:
    """Data x1 ~ N(mean, std^2) per coordinate, noise x0 ~ N(0, I), x_t = alpha_t x1 + sigma_t x0.

    Everything is closed form (x_t | t is Gaussian with mean alpha m and variance V = alpha^2 s^2 + sigma^2):
    score = -(x - alpha m) / V, E[x0 | x_t] = sigma (x - alpha m) / V, E[x1 | x_t] = m + alpha s^2 (x - alpha m) / V,
    velocity = alpha' E[x1 | x_t] + sigma' E[x0 | x_t]; the ODE flow maps x_a to alpha_b m + sqrt(V_b / V_a)
    (x_a - alpha_a m). alpha and sigma^2 are written here from docs/reference.md, their derivatives come from
    autograd, so nothing depends on disploss.transport.paths. The velocity and score use sigma^2 and
    sigma sigma' = (sigma^2)' / 2 only, so they stay finite a little past t = 1 where VP's sigma is NaN
    (adaptive solvers evaluate there). mean and std broadcast against x[0].
    """

    def __init__(self, path_type: str, mean, std):
        self.path_type = path_type
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)

    def alpha_sigma2(self, t: torch.Tensor):
        if self.path_type == "Linear":
            return t, (1 - t) ** 2
        if self.path_type == "GVP":
            return torch.sin(torch.pi * t / 2), torch.cos(torch.pi * t / 2) ** 2
        m = -0.25 * (1 - t) ** 2 * (20.0 - 0.1) - 0.5 * (1 - t) * 0.1
        return torch.exp(m), 1 - torch.exp(2 * m)

    def coefficients(self, t: torch.Tensor, x: torch.Tensor):
        """alpha, sigma, alpha', sigma' at t (B,), shaped (B, 1, ...) like x; float64."""
        a, s2, da, ds2 = self._coefficients2(t, x)
        s = torch.sqrt(s2)
        return a, s, da, ds2 / (2 * s)

    def _coefficients2(self, t, x):
        t = t.detach().double().reshape(-1, *([1] * (x.dim() - 1)))
        (a, s2), (da, ds2) = torch.func.jvp(self.alpha_sigma2, (t,), (torch.ones_like(t),))
        return a, s2, da, ds2

    def _parts(self, x, t):
        a, s2, da, ds2 = self._coefficients2(t, x)
        var = a**2 * self.std**2 + s2
        return a, s2, da, ds2, var, x.double() - a * self.mean

    def score(self, x, t):
        a, s2, da, ds2, var, r = self._parts(x, t)
        return (-r / var).to(x.dtype)

    def noise(self, x, t):
        a, s2, da, ds2, var, r = self._parts(x, t)
        return (torch.sqrt(s2) * r / var).to(x.dtype)

    def velocity(self, x, t):
        a, s2, da, ds2, var, r = self._parts(x, t)
        return (da * (self.mean + a * self.std**2 * r / var) + ds2 / 2 * r / var).to(x.dtype)

    def flow(self, x, ta: float, tb: float):
        """Exact ODE map of x from time ta to time tb."""
        (aa, sa2), (ab, sb2) = (self.alpha_sigma2(torch.tensor(t, dtype=torch.float64)) for t in (ta, tb))
        va, vb = aa**2 * self.std**2 + sa2, ab**2 * self.std**2 + sb2
        return (ab * self.mean + torch.sqrt(vb / va) * (x.double() - aa * self.mean)).to(x.dtype)

    def log_density(self, x):
        """log N(x; mean, std^2) summed over the non-batch dims: the data density at t = 1."""
        z = (x.double() - self.mean) / self.std
        per = -0.5 * z**2 - torch.log(self.std) - 0.5 * math.log(2 * math.pi)
        return per.flatten(1).sum(1)


@pytest.fixture
def gaussian():
    """GaussianTarget(path_type, mean, std): closed-form fields of a Gaussian data distribution."""
    return GaussianTarget


class ForwardCalls(list):
    """The batch size of every SiT.forward call, in order; `times` holds each call's (t, r) (r None without it)."""

    def __init__(self):
        super().__init__()
        self.times: list[tuple[float, float | None]] = []

    def clear(self):
        super().clear()
        self.times.clear()


@pytest.fixture
def sit_forward_calls(monkeypatch) -> ForwardCalls:
    """Records every call of SiT.forward (the model calls a sampler makes) for the test's duration."""
    from disploss.models import SiT

    calls, forward = ForwardCalls(), SiT.forward

    def counting(self, x, t, *args, **kwargs):
        r = kwargs.get("r")
        calls.append(len(x))
        calls.times.append((float(t[0]), None if r is None else float(r[0])))
        return forward(self, x, t, *args, **kwargs)

    monkeypatch.setattr(SiT, "forward", counting)
    return calls


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An image folder per test module (trainkit.make_image_folder): 3 classes x 8 images, so at batch 8 an epoch is
    3 steps (4 steps cross an epoch, step 2 is mid-epoch)."""
    from trainkit import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("images"))
