"""hqjax.alloc."""

__all__: list[str] = []
