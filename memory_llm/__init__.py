"""memory_llm: a language model with a memory that grows.

    from memory_llm import MemoryLLM
    m = MemoryLLM()
    m.learn(["notes.md"])
    print(m.ask("What did I write about X?").text)
"""

import logging

from memory_llm.assistant import Answer, AnswerStream, LearnReport, MemoryLLM
from memory_llm.config import Settings
from memory_llm.errors import EvalFormatError, InputError, MemoryLLMError, ModelError, StoreError

__version__ = "0.1.0"
__all__ = ["Answer", "AnswerStream", "EvalFormatError", "InputError", "LearnReport", "MemoryLLM", "MemoryLLMError",
           "ModelError", "Settings", "StoreError", "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
