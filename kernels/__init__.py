"""Integer matmul kernels (Pallas GPU/TPU, XLA reference), imported as ``hqjax.kernels``."""

__all__: list[str] = []
