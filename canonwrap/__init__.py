"""canonwrap: generative modelling of symmetric data through learned canonicalization.

A G-equivariant canonicalizer maps every sample to a canonical pose; any plain,
non-equivariant denoiser then learns the distribution of canonical poses.
"""

from canonwrap._version import __version__
from canonwrap.canonicalizers import (
    Canonicalizer,
    CanonOutput,
    CenterOfMass,
    Identity,
    PCACanonicalizer,
    frozen,
)
from canonwrap.diffusion import CanonicalizedDiffusion, LossOutput, NLLOutput
from canonwrap.flow import CanonicalizedFlowMatching, FlowNLLOutput
from canonwrap.molecules import MoleculeSpace, NodeCountDistribution
from canonwrap.samplers import AncestralSampler, DDIMSampler, DPMSolverSampler, Sampler
from canonwrap.schedules import CosineSchedule, NoiseSchedule, PolynomialSchedule
from canonwrap.spaces import PointCloudSpace, Space, TensorSpace

__all__ = [
    "__version__",
    "CanonicalizedDiffusion",
    "LossOutput",
    "NLLOutput",
    "CanonicalizedFlowMatching",
    "FlowNLLOutput",
    "Canonicalizer",
    "CanonOutput",
    "Identity",
    "CenterOfMass",
    "PCACanonicalizer",
    "frozen",
    "NoiseSchedule",
    "PolynomialSchedule",
    "CosineSchedule",
    "Sampler",
    "AncestralSampler",
    "DDIMSampler",
    "DPMSolverSampler",
    "Space",
    "TensorSpace",
    "PointCloudSpace",
    "MoleculeSpace",
    "NodeCountDistribution",
]
