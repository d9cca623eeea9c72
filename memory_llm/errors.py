"""Errors raised by memory_llm. The CLI turns each into a one-line message and exit code 1."""


class MemoryLLMError(Exception):
    """Base class for every error this library raises on purpose."""


class InputError(MemoryLLMError):
    """Something the user gave us (a path, a file, a question, an option) cannot be used."""


class ModelError(MemoryLLMError):
    """A model could not be found or loaded."""


class StoreError(MemoryLLMError):
    """The memory home is unusable: corrupted, locked or written by a newer version."""


class EvalFormatError(InputError):
    """An eval file does not follow the probe format of docs/eval-format.md."""
