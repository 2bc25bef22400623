"""A sweep of the public API with wrong argument types: every one is a VsemLensError, never a raw TypeError.

And NumPy integers, which people pass from ``np.arange`` or a DataFrame, are accepted wherever a
Python integer is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vsem_lens as vl
from vsem_lens.core.errors import VsemLensError

TEXTS = ["the cat sat on the mat", "a dog ran in the park"]
WRONG_INTEGERS = [2.5, "2", True, None, [2]]
CALLS = [
    "capture(layers=)", "capture(batch_size=)", "capture(max_length=)", "layerwise_affinity(k=)",
    "layerwise_affinity(layers=)", "iter_layer_readouts(batch_size=)", "iter_layer_readouts(k=)",
    "isotropy_by_layer(k_outliers=)", "isotropy_by_layer(batch_size=)", "isotropy_by_layer(layers=)",
    "build_report(max_tokens=)", "build_report(batch_size=)", "basis.project(layer=)", "basis.for_tokens()",
    "logit_lens(layer=)",
]


def _calls(model, basis):
    """name -> function of one value, each feeding that value to one integer argument of the public API."""
    h = torch.randn(3, model.d_model)
    return {
        "capture(layers=)": lambda v: vl.capture(model, TEXTS, layers=v),
        "capture(batch_size=)": lambda v: vl.capture(model, TEXTS, batch_size=v),
        "capture(max_length=)": lambda v: vl.capture(model, TEXTS, max_length=v),
        "layerwise_affinity(k=)": lambda v: vl.layerwise_affinity(model, TEXTS[0], k=v),
        "layerwise_affinity(layers=)": lambda v: vl.layerwise_affinity(model, TEXTS[0], layers=v),
        "iter_layer_readouts(batch_size=)": lambda v: list(vl.iter_layer_readouts(model, TEXTS, batch_size=v)),
        "iter_layer_readouts(k=)": lambda v: list(vl.iter_layer_readouts(model, TEXTS, k=v)),
        "isotropy_by_layer(k_outliers=)": lambda v: vl.isotropy_by_layer(model, TEXTS, k_outliers=v),
        "isotropy_by_layer(batch_size=)": lambda v: vl.isotropy_by_layer(model, TEXTS, batch_size=v),
        "isotropy_by_layer(layers=)": lambda v: vl.isotropy_by_layer(model, TEXTS, layers=v),
        "build_report(max_tokens=)": lambda v: vl.build_report(model, TEXTS, max_tokens=v, progress=False),
        "build_report(batch_size=)": lambda v: vl.build_report(model, TEXTS, batch_size=v, progress=False),
        "basis.project(layer=)": lambda v: basis.project(h, layer=v),
        "basis.for_tokens()": lambda v: basis.for_tokens([v]),
        "logit_lens(layer=)": lambda v: vl.logit_lens(h, model, layer=v),
    }


@pytest.fixture(scope="module")
def api(tiny_model):
    calls = _calls(tiny_model, vl.SemanticBasis.from_model(tiny_model, cache=False))
    assert sorted(calls) == sorted(CALLS)
    return calls


@pytest.mark.parametrize("value", WRONG_INTEGERS, ids=repr)
@pytest.mark.parametrize(
    "call",
    CALLS,
)
def test_wrong_integer_types_are_clear_errors(api, call, value):
    if value is None and call.split("(")[1] in ("layers=)", "max_length=)", "max_tokens=)", "layer=)"):
        pytest.skip("None is meaningful here (all layers / no limit)")
    if value == [2] and call.split("(")[1] == "layers=)":
        pytest.skip("a list of layers is the normal form")
    with pytest.raises(VsemLensError):
        api[call](value)


@pytest.mark.parametrize(
    "call",
    CALLS,
)
def test_numpy_integers_are_accepted(api, call):
    value = np.int64(2 if "max" not in call else 64)
    python = api[call](int(value))
    numpy = api[call](value)
    if isinstance(python, torch.Tensor):
        assert torch.equal(python, numpy)


@pytest.mark.parametrize("h", [[[0.0] * 4], "h", None])
def test_vocab_affinity_needs_a_tensor(api, tiny_model, h):
    with pytest.raises(VsemLensError, match="tensor"):
        vl.vocab_affinity(h, vl.SemanticBasis.from_model(tiny_model, cache=False))


def test_layer_lists_accept_numpy_integers(tiny_model):
    acts = vl.capture(tiny_model, TEXTS, layers=[np.int64(1)])
    assert acts.layers == [1]
