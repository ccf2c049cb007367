"""Self-compressing networks: quantiser, size loss, dependency analysis, channel surgery, export."""

__all__: list[str] = []
