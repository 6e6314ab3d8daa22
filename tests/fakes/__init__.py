"""Local HTTP servers speaking each LLM provider's wire protocol, for the real clients."""
