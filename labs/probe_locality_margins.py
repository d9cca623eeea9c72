"""How fragile is the locality metric? For the gate's 60 held-out generic prompts, the base model's own greedy
continuation (32 tokens, as the gate makes it) is teacher-forced back through the base model, and at each
position the gap between its top-1 and top-2 logits is taken. A position with a small gap flips under almost
any change to the weights, so the share of such positions bounds the agreement a real update can keep.

    MLLM_CACHE=/tmp/mcache .venv/bin/python labs/probe_locality_margins.py
"""

from __future__ import annotations

import json


def main() -> None:
    import tempfile

    import torch

    from memory_llm import MemoryLLM
    from memory_llm.consolidate.steps import generic_prompts

    gen = MemoryLLM(tempfile.mkdtemp(prefix="margins-")).new_generator()  # the default base model, no adapter
    _, prompts = generic_prompts()
    chats = [gen.chat_ids([{"role": "user", "content": p}])[0].tolist() for p in prompts]
    gaps = []
    for i in range(0, len(chats), 8):
        for p, cont in zip(chats[i:i + 8], gen.generate_batch(chats[i:i + 8], 32, return_ids=True)):
            if not cont:
                continue
            with torch.inference_mode():
                logits = gen.model(input_ids=torch.as_tensor([p + cont])).logits[0, len(p) - 1:len(p) + len(cont) - 1]
            top = logits.float().topk(2, dim=-1).values
            gaps += (top[:, 0] - top[:, 1]).tolist()
    gaps_t = torch.tensor(gaps)
    print(json.dumps({"positions": len(gaps), "median_gap": round(gaps_t.median().item(), 3),
                      **{f"share_gap_below_{d}": round((gaps_t < d).float().mean().item(), 4)
                         for d in (0.05, 0.1, 0.25, 0.5, 1.0)}}))


if __name__ == "__main__":
    main()
