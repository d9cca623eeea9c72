"""An OpenAI-compatible HTTP server over a MemoryLLM: /v1/models, /v1/chat/completions (JSON or server-sent
events), and /v1/memories, /v1/search, /v1/forget, /v1/feedback (docs/server.md). Errors have OpenAI's shape:
{"error": {"message", "type", "param", "code"}}.

Generation is serialized on one worker thread (worker.py); search, learn and forget run concurrently on the
server's thread pool. FastAPI is imported only when this package is (`mllm serve`, not `mllm ask`)."""

from memory_llm.server.app import MODEL_ID, create_app, run

__all__ = ["MODEL_ID", "create_app", "run"]
