"""The prompt library: named templates, rated exemplars, selection at ask time, TOML/YAML files."""

from memory_llm.prompts.library import DEFAULT_TEMPLATE, PromptChoice, PromptLibrary
from memory_llm.store.prompts import Exemplar, LoggedAnswer, Template

__all__ = ["DEFAULT_TEMPLATE", "Exemplar", "LoggedAnswer", "PromptChoice", "PromptLibrary", "Template"]
