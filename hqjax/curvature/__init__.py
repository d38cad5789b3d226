"""hqjax.curvature."""

__all__: list[str] = []
