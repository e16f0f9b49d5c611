"""functions.LIMITS: the values of the one-argument functions at 0 and +-inf, written down so the
lowering's absence analysis (and so `einsum-ir analyze`) needs no torch, must be what torch
computes."""
import math

import pytest
import torch

from einsum_ir.functions import FUNCTIONS, LIMITS, torch_function


@pytest.mark.parametrize("name, point", sorted(LIMITS, key=str))
def test_each_limit_is_torch_semantics(name, point):
    f = FUNCTIONS[name]
    v = float(torch_function(name)(*[torch.tensor(point, dtype=torch.float64)] * f.min_args))
    assert LIMITS[name, point] == (None if math.isnan(v) else v)
