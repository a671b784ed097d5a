"""numlab: a JAX laboratory for the numerics of quantized Mixture-of-Experts inference."""
