"""`python -m memory_llm` is `mllm`."""

from memory_llm.cli import main

main()
