"""Precision-parameterised ops: each computes one piece of the model's math in a precision the caller picks."""
from numlab.ops.precision import ACCS, ACTS, DTYPES, EXPS, ORDERS, jdtype

__all__ = ["DTYPES", "ACTS", "ACCS", "ORDERS", "EXPS", "jdtype"]
