"""Stochastic interpolants: paths, the training objective and ODE / SDE samplers (SiT, section 2).

Convention, stated once for the whole package: t = 0 is Gaussian noise x0 ~ N(0, I), t = 1 is data x1.
    x_t = alpha_t x1 + sigma_t x0,        u_t = d x_t / dt = alpha'_t x1 + sigma'_t x0.
(The SiT paper writes time the other way round; its code, which produced the checkpoints, uses this one.)
"""

from disploss.transport.integrators import TIME_SCHEDULES
from disploss.transport.paths import DIFFUSION_FORMS, PATH_TYPES, GVPPath, LinearPath, VPPath, make_path
from disploss.transport.sampler import (
    BATCH_COUPLED_METHODS,
    LAST_STEPS,
    ODE_FIXED_METHODS,
    ODE_METHODS,
    PER_IMAGE_METHODS,
    SDE_METHODS,
    STEP_CONTROLS,
    Sampler,
    ode_likelihood,
    sample_ode,
    sample_sde,
)
from disploss.transport.transport import LOSS_WEIGHTS, PREDICTIONS, Transport, create_transport

__all__ = [
    "BATCH_COUPLED_METHODS",
    "DIFFUSION_FORMS",
    "GVPPath",
    "LAST_STEPS",
    "LOSS_WEIGHTS",
    "LinearPath",
    "ODE_FIXED_METHODS",
    "ODE_METHODS",
    "PER_IMAGE_METHODS",
    "PATH_TYPES",
    "PREDICTIONS",
    "SDE_METHODS",
    "STEP_CONTROLS",
    "TIME_SCHEDULES",
    "Sampler",
    "Transport",
    "VPPath",
    "create_transport",
    "make_path",
    "ode_likelihood",
    "sample_ode",
    "sample_sde",
]
