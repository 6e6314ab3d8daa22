"""Benchmarks of d8-mesh against raw nats-py JetStream and its peers; `python -m bench`."""

__all__: list[str] = []
