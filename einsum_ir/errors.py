"""Errors a user sees: located spec errors with a caret line, and shape-binding errors."""
from __future__ import annotations

from einsum_ir.ir import Loc


class SpecError(ValueError):
    """A spec that does not parse or does not validate.

    `str(err)` is `file:line:col: error: message`, then the source line and a caret under the
    offending token when the source text is known.
    """

    def __init__(self, message: str, loc: Loc | None = None, source: str | None = None):
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.source = source

    def with_source(self, source: str) -> "SpecError":
        self.source = source
        return self

    def __str__(self) -> str:
        if self.loc is None:
            return f"error: {self.message}"
        head = f"{self.loc.file}:{self.loc.line}:{self.loc.col}: error: {self.message}"
        if not self.source:
            return head
        lines = self.source.splitlines()
        if not 1 <= self.loc.line <= len(lines):
            return head
        text = lines[self.loc.line - 1]
        caret = " " * (self.loc.col - 1) + "^" * max(1, self.loc.length)
        return f"{head}\n    {text}\n    {caret}"


class BindError(ValueError):
    """Call-time arguments that do not fit the cascade (shapes, missing tensors or params)."""


class TensorValuesNeeded(BindError):
    """Shapes alone were given where the result depends on the values of input tensor
    `tensor` (a mask that reads it)."""

    def __init__(self, message: str, tensor: str):
        super().__init__(message)
        self.tensor = tensor


class LoweringError(Exception):
    """A cascade has no fused lowering for the requested backend; the message says why."""


def located(node, message: str) -> str:
    """`message`, prefixed with `file:line:col:` when `node` has a spec location."""
    loc = getattr(node, "loc", None)
    return f"{loc.file}:{loc.line}:{loc.col}: {message}" if loc is not None else message
