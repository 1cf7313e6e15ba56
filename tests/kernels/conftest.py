"""Fixtures of the kernel tests; kernel_env.py sets TRITON_INTERPRET before any kernel import."""

from __future__ import annotations

import pytest
import torch
from kernel_env import DEVICE


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
