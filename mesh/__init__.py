"""d8-mesh: a NATS JetStream worker mesh for LLM tasks.

`mesh` holds what every node shares: the wire contract, the topology, the connection and
the embedded server.
"""

__version__ = "0.1.0"
