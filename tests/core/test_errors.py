"""The shared validators: NumPy integers are integers, booleans and floats are not."""

from __future__ import annotations

import numpy as np
import pytest

from vsem_lens.core.capture import check_layers
from vsem_lens.core.errors import InputError, check_int, check_layer_index, check_positive_int


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3)])
def test_integers_of_any_kind_are_accepted(value):
    assert check_positive_int(value, "k") == 3 and type(check_positive_int(value, "k")) is int
    assert check_int(value, "k", minimum=0) == 3
    assert check_layer_index(value, 5) == 3


@pytest.mark.parametrize("value", [True, 2.5, "2", None, 0, -1])
def test_non_positive_or_non_integers_are_refused(value):
    with pytest.raises(InputError, match="k must be a positive integer"):
        check_positive_int(value, "k")


def test_check_int_minimum_and_type():
    assert check_int(0, "ddof", minimum=0) == 0
    with pytest.raises(InputError, match="at least 0"):
        check_int(-1, "ddof", minimum=0)
    with pytest.raises(InputError, match="must be an integer"):
        check_int(1.0, "ddof")


def test_layer_indices_count_from_the_end_and_name_the_range():
    assert check_layers([np.int64(1), -1], 4) == [1, 3]
    assert check_layers(np.int64(2), 4) == [2]
    with pytest.raises(InputError, match="layer 4 is out of range: the model has layers 0..3"):
        check_layer_index(4, 4)
    with pytest.raises(InputError, match="must be an integer"):
        check_layers([1.7], 4)
