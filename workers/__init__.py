"""Workers: the runtime that pulls and runs tasks, and the LLM backends."""
