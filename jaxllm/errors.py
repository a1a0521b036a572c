"""Exceptions callers catch by type, importable without JAX (the server's front ends)."""


class EngineSleepingError(RuntimeError):
    """The engine is asleep (``LLMEngine.sleep``): ``wake_up()`` first."""
