"""A small OpenAI-compatible engine in a thread, speaking the part of vLLM's API that generate_openai uses
(/v1/models, /v1/completions with token-id prompts, streaming, logprobs, return_token_ids, and the runtime LoRA
routes), over a real in-process model: a tiny Llama with peft adapters loaded from their directories. Tests
compare what it serves through HTTP with the same model in-process."""

from __future__ import annotations

import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeEngine:
    """Serves `generator` (a TransformersGenerator; copied, so adapters loaded here stay here) as `model_id`.
    `requests` records (path, body) of every POST; `api_key` makes every route need it."""

    def __init__(self, generator, model_id: str = "base-model", api_key: str | None = None,
                 max_model_len: int = 4096, delay: float = 0.0):
        from memory_llm.generate import TransformersGenerator

        self.gen = TransformersGenerator(copy.deepcopy(generator.model), generator.tokenizer, generator.name)
        self.base_model, self.model_id, self.api_key, self.max_model_len = self.gen.model, model_id, api_key, max_model_len
        self.adapters: dict[str, str] = {}  # name → path
        self.requests: list[tuple[str, dict]] = []
        self.delay = delay  # seconds each completion takes at least (outside the model lock: they overlap)
        self.inflight = self.max_inflight = 0  # completions being answered at once, now and at most
        self.lock = threading.Lock()
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body, content_type="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if engine.api_key and self.headers.get("Authorization") != f"Bearer {engine.api_key}":
                    self._send(401, {"error": {"message": "Unauthorized", "type": "auth"}})
                    return False
                return True

            def do_GET(self):
                if not self._authorized():
                    return
                if self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "Not Found"}})
                data = [{"id": engine.model_id, "object": "model", "root": "/models/base", "parent": None,
                         "max_model_len": engine.max_model_len}]
                data += [{"id": n, "object": "model", "root": p, "parent": engine.model_id}
                         for n, p in engine.adapters.items()]
                self._send(200, {"object": "list", "data": data})

            def do_POST(self):
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                engine.requests.append((self.path, body))
                if self.path == "/v1/load_lora_adapter":
                    if body["lora_name"] in engine.adapters:
                        return self._send(400, {"error": {"message": "already loaded"}})
                    engine.load(body["lora_name"], body["lora_path"])
                    return self._send(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.",
                                      "text/plain")
                if self.path == "/v1/unload_lora_adapter":
                    if engine.adapters.pop(body["lora_name"], None) is None:
                        return self._send(404, {"error": {"message": "cannot be found"}})
                    return self._send(200, "Success", "text/plain")
                if self.path != "/v1/completions":
                    return self._send(404, {"error": {"message": "Not Found"}})
                model = body.get("model")
                if model != engine.model_id and model not in engine.adapters:
                    return self._send(404, {"error": {"message": f"The model `{model}` does not exist."}})
                prompts = body["prompt"] if body["prompt"] and isinstance(body["prompt"][0], list) else [body["prompt"]]
                with engine.lock:
                    engine.inflight += 1
                    engine.max_inflight = max(engine.max_inflight, engine.inflight)
                try:
                    time.sleep(engine.delay)
                    outs = [engine.complete(model, p, body) for p in prompts]
                finally:
                    with engine.lock:
                        engine.inflight -= 1
                if not body.get("stream"):
                    choices = [{"index": i, "text": text, "finish_reason": "stop", "logprobs": lp,
                                **({"token_ids": ids} if body.get("return_token_ids") else {})}
                               for i, (text, ids, lp) in enumerate(outs)]
                    return self._send(200, {"id": "cmpl-1", "object": "text_completion", "model": model,
                                            "choices": choices})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                text, ids, _ = outs[0]
                tok = engine.gen.tokenizer
                done = ""
                for i in range(len(ids)):
                    now = tok.decode(ids[:i + 1], skip_special_tokens=True)
                    event = {"choices": [{"index": 0, "text": now[len(done):], "finish_reason": None}]}
                    done = now
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def load(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self.lock:
            if not hasattr(self.gen.model, "load_adapter") or not hasattr(self.gen.model, "peft_config"):
                self.gen.model = PeftModel.from_pretrained(self.base_model, path, adapter_name=name).eval()
            else:
                self.gen.model.load_adapter(path, adapter_name=name)
            self.adapters[name] = path

    def complete(self, model: str, prompt: list[int], body: dict):
        """(text, generated ids, logprobs) of one greedy continuation with `model`'s adapter (or none)."""
        import torch
        from contextlib import nullcontext

        with self.lock:
            peft = self.gen.model if hasattr(self.gen.model, "peft_config") else None
            if peft is not None and model in self.adapters:
                peft.set_adapter(model)
            ctx = peft.disable_adapter() if peft is not None and model not in self.adapters else nullcontext()
            with ctx, torch.inference_mode():  # like vLLM: greedy, stops at the end token only
                tok = self.gen.tokenizer
                out = self.gen.model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(
                    1, len(prompt), dtype=torch.long), max_new_tokens=body.get("max_tokens", 16), do_sample=False,
                    temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id)
                ids = out[0, len(prompt):].tolist()
                ids = ids[:ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids
                logprobs = None
                if body.get("logprobs"):
                    full = torch.tensor([list(prompt) + ids])
                    with torch.inference_mode():
                        logits = self.gen.model(input_ids=full).logits[0].float().log_softmax(-1)
                    logprobs = {"token_logprobs": [logits[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids)]}
        return self.gen.tokenizer.decode(ids, skip_special_tokens=True), ids, logprobs

    def models_used(self) -> list[str]:
        """The model named by each completion request so far."""
        return [b["model"] for p, b in self.requests if p == "/v1/completions"]

    def __enter__(self) -> "FakeEngine":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
