"""The docstring examples that can run without a model (those not marked ``+SKIP``) give what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import vsem_lens

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(vsem_lens.__path__, "vsem_lens.")
    if not info.name.endswith("__main__")  # running it would start the CLI
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=False, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} fail; run python -m doctest"
