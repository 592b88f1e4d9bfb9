"""The test helpers that the GPU tests lean on, checked where every session can run them."""
import pytest
import torch

from .helpers import assert_identical


def test_identical_outputs_pass_with_nan_where_nan():
    want = torch.randn(5, 4, 32)
    want[2, 1, 7] = float("nan")
    assert_identical(want.clone(), want, "y")


def test_a_difference_is_told_by_its_step_rows_and_units():
    """One failed GPU run should say which step, batch rows and units went wrong."""
    want = torch.randn(6, 8, 64, dtype=torch.float16)
    got = want.clone()
    got[3, 2:4, 16:32] += 1          # step 3, rows 2-3, one program's 16 units
    got[3, 6, 40] += 1
    got[5, 0, 0] = float("nan")
    with pytest.raises(AssertionError) as failure:
        assert_identical(got, want, "y")
    message = str(failure.value)
    assert message.startswith("y: 34 of 3072 elements differ, first at index [3, 2, 16]")
    assert "dim-1 indices 2-3, 6, last-dim indices 16-31, 40 of 64" in message
    assert "NaNs 1 against 0" in message


def test_a_shape_or_dtype_mismatch_is_told():
    with pytest.raises(AssertionError, match=r"c_n: torch.float32\[2, 3\] against torch.float16"):
        assert_identical(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float16), "c_n")
