"""Precision-parameterised ops: each computes one piece of the model's math in a precision the caller picks."""
from numlab.ops.activation import silu, swiglu
from numlab.ops.attention import attention
from numlab.ops.experts import expert_qmatvec
from numlab.ops.norm import rmsnorm
from numlab.ops.precision import ACCS, ACTS, DTYPES, EXPS, ORDERS, jdtype
from numlab.ops.qmatvec import acts_for, qmatvec
from numlab.ops.reduce import rsum
from numlab.ops.rope import rope
from numlab.ops.routing import moe_sum, route, router_margin, topk_route
from numlab.ops.softmax import softmax

__all__ = ["DTYPES", "ACTS", "ACCS", "ORDERS", "EXPS", "jdtype", "qmatvec", "acts_for", "rmsnorm",
           "softmax", "silu", "swiglu", "rope", "attention", "topk_route", "router_margin", "route",
           "moe_sum", "rsum", "expert_qmatvec"]
