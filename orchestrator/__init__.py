"""The orchestrator: owns the topology, submits tasks, watches workers, serves HTTP."""
