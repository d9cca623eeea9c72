"""memory_llm: a language model with a memory that grows.

    from memory_llm import MemoryLLM
    m = MemoryLLM()
    m.learn(["notes.md"])
    print(m.ask("What did I write about X?").text)
"""

import logging

from memory_llm.errors import EvalFormatError, InputError, MemoryLLMError, ModelError, StoreError

# imported on first use (PEP 562): a CLI call that a resident server answers loads neither numpy nor the store
_LAZY = {"Answer": "memory_llm.assistant", "AnswerStream": "memory_llm.assistant",
         "LearnReport": "memory_llm.assistant", "MemoryLLM": "memory_llm.assistant", "Settings": "memory_llm.config"}

__version__ = "0.1.0"
__all__ = ["Answer", "AnswerStream", "EvalFormatError", "InputError", "LearnReport", "MemoryLLM", "MemoryLLMError",
           "ModelError", "Settings", "StoreError", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)
        return value
    raise AttributeError(f"module 'memory_llm' has no attribute {name!r}")
