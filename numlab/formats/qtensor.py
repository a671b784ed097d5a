"""QTensor: a quantized matrix as a JAX pytree (bytes are the leaf; format and shape are static)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import numlab.formats as formats


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A [rows, cols] matrix stored as ggml rows: `data` uint8 [..., rows, row_bytes].

    Leading axes of `data` beyond the two of `shape` stack several matrices (experts, layers).
    """

    data: jax.Array
    fmt: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def from_bytes(cls, data, fmt: str, shape) -> "QTensor":
        """Wrap ggml row bytes data [..., rows, row_bytes] of a (rows, cols) matrix, checking sizes."""
        rows, cols = (int(s) for s in shape)
        rb = formats.row_bytes(fmt, cols)
        if tuple(data.shape[-2:]) != (rows, rb):
            raise ValueError(f"QTensor {fmt} ({rows}, {cols}): data shape {tuple(data.shape)} "
                             f"does not end in ({rows}, {rb})")
        return cls(data, fmt, (rows, cols))

    @classmethod
    def from_float(cls, w, fmt: str) -> "QTensor":
        """Quantize float32 w [..., rows, cols] to `fmt`."""
        w = jnp.asarray(w, jnp.float32)
        return cls(formats.quantize(w, fmt), fmt, tuple(int(s) for s in w.shape[-2:]))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.data.shape))

    def dequantize(self) -> jax.Array:
        """float32 [..., rows, cols], exactly ggml's dequantization."""
        return formats.dequantize(self.data, self.fmt)
