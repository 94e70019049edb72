"""The test helpers themselves must be able to fail."""

import pytest
import torch

from tests._helpers import assert_close, poison_allocations, rel_error


def test_poison_allocations_fills_nan_and_restores():
    with poison_allocations():
        a = torch.empty(5)
        b = torch.empty_like(a)
        c = a.new_empty(3)
        i = torch.empty(4, dtype=torch.int64)  # integer tensors are left alone
    assert bool(a.isnan().all() and b.isnan().all() and c.isnan().all())
    assert i.dtype == torch.int64
    assert torch.empty.__name__ == "empty"


def test_assert_close_detects_errors():
    e = torch.randn(100, dtype=torch.float64)
    assert_close(e.float(), e, torch.float32)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(e.float() * 1.001, e, torch.float32)
    with pytest.raises(AssertionError, match="NaN pattern"):
        rel_error(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0]))
    with pytest.raises(AssertionError, match="shape"):
        rel_error(torch.zeros(2), torch.zeros(3))
