"""Keep the loss arithmetic in fp32 even inside a mixed-precision autocast region.

Sorting-based Wasserstein terms, characteristic functions (cos/sin of large arguments) and covariance sums
lose their signal in bf16/fp16; the paper and LeJEPA both compute the regulariser in fp32.
"""

from __future__ import annotations

import contextlib

import torch


def fp32_region(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled for the device type of ``x`` (the inputs must be cast to fp32 by the caller)."""
    return torch.autocast(device_type=x.device.type, enabled=False)
