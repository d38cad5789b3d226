"""hqjax.quant."""

__all__: list[str] = []
