"""Union forms in the cost model and the backward: counted as the k - 1 combines they are, and
refused with a located reason where a derivative point by point would be wrong."""
import pytest

import einsum_ir as ei
from einsum_ir.ir import Access, Index, Num
from einsum_ir.lowering.grad import diff

SPEC = """dims P M
input A[p,m], B[p,m], C[p,m]
X[p,m] = A[p,m] where m <= p
Y[p,m] = B[p,m] where m > p
U[p,m] = {form}
output U
"""


@pytest.mark.parametrize("form, ops", [("union_sum(X[p,m], Y[p,m])", 1), ("union_max(X[p,m], Y[p,m], C[p,m])", 2)])
def test_a_union_form_costs_one_vector_op_per_combine(form, ops):
    c = ei.parse(SPEC.format(form=form))
    counts = ei.counts(c, {"P": 8, "M": 8}, as_written=True)
    assert counts.einsum("U").vector_ops == ops * counts.einsum("U").points


def test_the_derivative_of_a_union_form_is_a_located_error():
    c = ei.parse(SPEC.format(form="union_sum(X[p,m], Y[p,m])"), file="u.ein")
    u = c.einsum("U").expr
    with pytest.raises(ei.LoweringError, match=r"u\.ein:5:\d+: union_sum\(\.\.\.\) has no derivative point by point"):
        diff(u, Access("X", (Index("p"), Index("m"))))
    assert diff(u, Access("A", (Index("p"), Index("m")))) == Num(0)  # a union that does not read the target
