"""Keep the loss arithmetic in fp32 even inside a mixed-precision autocast region.

Sorting-based Wasserstein terms, characteristic functions (cos/sin of large arguments) and covariance sums
lose their signal in bf16/fp16. LeJEPA's code computes SIGReg in fp32. The Rectified LpJEPA reference does NOT:
it draws the target sample in the features' dtype (`sample_lp_distribution(..., dtype=features.dtype)`), which is
fp16 under its `precision: 16-mixed`, and sorts in that dtype too. We deliberately differ: features are cast to
fp32 and the target is drawn in fp32 (models.rgg samples in fp32/fp64 whatever dtype is asked), because an fp16
Laplace draw quantises the sparse tail (at mu = -3 the positives that set the rate are a 0.7% tail).
"""

from __future__ import annotations

import contextlib

import torch


def fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled for the device type of ``x`` (the inputs must be cast to fp32 by the caller)."""
    return torch.autocast(device_type=x.device.type, enabled=False)
