"""The training recipe: distil the teacher (model WITH the memory in context) into a LoRA student (model
WITHOUT it), with a locality term that keeps the student close to the base model on generic prompts.

Linear, top to bottom: prepare examples (teacher top-k targets, computed once) → train → return the model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from memory_llm.adapters.routing import common_prefix
from memory_llm.consolidate.synth import Item
from memory_llm.generate import cache_kwargs, output_cache

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Recipe:
    """Hyper-parameters; the defaults are the measured ones (labs/sweep_consolidation.py, docs/consolidation.md)."""

    rank: int = 16
    alpha: int = 32
    lr: float = 1e-2
    later_lr_scale: float = 0.3  # lr × this in every round after the first (an adapter is current): on round 2's
    # documents lr 1e-2 diverged both continuing the adapter (loss 13 → 37) and in a fresh stacked one (16 → 47);
    # BENCHMARKS.md
    epochs: int = 5  # with one cut per sentence and no rewrites, on 10 FK documents: 5 epochs closed gen 1.11 × rag
    # in 20.5 min, 6 epochs 1.04 × in 21.4 min (8 epochs with rewrites: 0.96 × in 35.1 min; BENCHMARKS.md)
    batch_size: int = 8
    min_steps: int = 16  # a small round runs more epochs to train at least this many steps (one 3-sentence memory
    # makes one batch an epoch: 5 steps left the real-model e2e test's reliability at 0.4, under the 0.5 floor)
    temperature: float = 2.0
    ce_weight: float = 1.0
    locality_weight: float = 1.0
    top_k: int = 32
    replay_fraction: float = 0.25
    locality_tokens: int = 32
    locality_per_batch: int = 2  # locality examples in every batch
    locality_prompts: int = 40  # generic prompts for the locality term and the null space, of the 60 training
    # ones; the other 20 calibrate the router (60 others are held out for the gate)
    rewrites: int = 0  # model rewrites per memory, trained on (cloze items cut from them). Off: on 10 FK documents
    # dropping them raised closed mem / gen from 0.82 / 0.52 to 0.92 / 0.56 and cut synthesis from 642 s to 267 s
    held_out_rewrite: bool = False  # one more rewrite per memory, held out: paraphrased probes for the gate's
    # generalization figure only (no floor reads it); off, generalization is measured on the held-out questions
    questions: int = 4  # questions sampled per memory
    sentence_questions: int = 2  # questions asked about each sentence of a memory (synth.SENTENCE_QUESTION_PROMPT),
    # so every fact is asked about in chat form. With sentence_answers and route_similarity, on 10 held-out SQuAD
    # passages closed-book in chat form went from base 0.02 to 0.20 (rag 0.35; gain 0.56), general 80/80 kept
    # (BENCHMARKS.md, "Consolidated knowledge reaches `ask`"); 0: off
    sentence_answers: bool = True  # sentence questions are answered by their sentence itself (the memory's own
    # words) instead of the teacher's answer, which a 135M teacher often gets wrong; no teacher generation for them
    open_book: float = 0.0  # share of qa items that also train with retrieved sources in the student's prompt
    # (RAFT, arXiv 2403.10131): once with their memory and a distractor (the teacher reads the same prompt: the
    # adapter learns to leave reading alone) and once with the distractor only (the teacher has the memory: the
    # adapter answers from the weights when retrieval misses). For serving beside sources (adapter_with_sources)
    cloze_cuts: tuple = (0.4,)  # where sentences are cut into cloze items (fractions of their words); one cut
    # supervised to the sentence's end took closed gen from 0.52 to 0.82 on 10 FK documents (cuts at 0.4/0.6/0.8
    # with 8 answer words: the same budget spent on overlapping short answers; BENCHMARKS.md)
    cloze_answer_words: int = 32  # words of the sentence after a cut that a cloze item supervises
    max_items_per_memory: int = 8  # cap on trained cloze items per memory (0: all); qa items are always kept
    # (8 kept closed gen at 0.89 × rag on 3 FK documents and cuts training and teacher cost ~3×)
    null_space_energy: float = 0.99  # LoRA inputs kept off the generic-prompt directions holding this share of
    # their energy (null-space projection, see null_space_constraint); 0 turns it off
    route_margin: float = 1.25  # the adapter acts only on prompts scoring this many times the highest generic
    # prompt's score (activation routing, see adapters/routing.py); 0: the adapter is always on
    route_similarity: float = 0.1  # a prompt whose embedding is this much more similar to one of the adapter's
    # trained prompts than any generic prompt of the training half is gets the adapter whatever its activation
    # score (consolidate.calibrate.similarity_bar): users ask about a memory in other words than trained. On 5 SQuAD tuning
    # passages the activation router alone kept the adapter off 19 of 29 user questions (closed 0.14); with
    # 0.1 closed 0.31 and general 80/80 (BENCHMARKS.md). 0: off
    route_band: tuple = (0.4, 0.6)  # the decoder layers (fractions of depth) whose LoRA updates are scored
    route_pool: str = "mean"  # a prompt scores the mean of its tokens' scores ("max": the largest); mean routed 3-4×
    # more memory questions in ask's form at the same generic share (BENCHMARKS.md, router score variants)
    route_per_form: bool = False  # raw text (no chat head) gets a threshold of its own, calibrated on the generic
    # prompts as raw text. Off: nothing served is raw (ask and the server are chat), and on the gate's raw cloze
    # items and raw FK probes it left the adapter off nearly everywhere (BENCHMARKS.md)
    max_stack: int = 4  # adapters served side by side, one per round: a round trains a fresh adapter for its new
    # memories and leaves the earlier ones as they are (each acts only where its router passes, see
    # adapters.routing.RouterStack); a round beyond this many continues the newest adapter instead; 1: every round continues
    # one adapter. A full rebuild (--full, or after forgetting) starts one adapter again
    diverge_ratio: float = 1.5  # training stops as diverged when the mean loss over the last tenth of the steps
    # run exceeds the first tenth's by this factor (or a loss is not finite); run.py retries at half the lr. On
    # round 2's documents lr 1e-2 went 13 → 37 and 16 → 47 (BENCHMARKS.md); healthy runs fall 3-4×
    diverge_retries: int = 2  # retries at half the learning rate each after a diverged run; 0: none
    mixed_precision: bool = True  # training steps run under bf16 autocast (fp32 weights, LoRA and optimizer) where
    # the hardware computes bf16 natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16) and the model is
    # fp32; elsewhere, or off, fp32. A step took 2.6 s instead of 4.1 s on this machine's 2 cores (BENCHMARKS.md)
    seed: int = 0
    target_modules: tuple = field(default=LORA_TARGETS)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass
class Example:
    """One training sequence: ids, the positions whose next token is supervised, and the teacher's top-k."""

    ids: list[int]
    positions: list[int]  # index i: logits at i predict ids[i + 1]
    top_idx: object  # LongTensor (len(positions), k)
    top_p: object  # FloatTensor (len(positions), k), teacher probabilities at the temperature
    kind: str  # "item" | "locality"


def closed_prompt_ids(generator, question: str) -> list[int]:
    """The prompt `ask` builds for a question without retrieval (the closed-book system prompt): the form the
    adapter is trained, routed and measured on, so it is the form it serves."""
    from memory_llm.generate import build_messages

    return generator.chat_ids(build_messages(question))[0].tolist()


def student_prompt_ids(generator, item: Item) -> list[int]:
    """What the student sees: the bare prompt (cloze: raw text; qa: the question as `ask` closed-book puts it)."""
    if item.kind == "qa":
        return closed_prompt_ids(generator, item.prompt)
    return generator.tokenizer(item.prompt, add_special_tokens=False)["input_ids"]


def teacher_prompt_ids(generator, item: Item, context: str) -> list[int]:
    """What the teacher sees: the same prompt with the memory chunk in context."""
    from memory_llm.generate import build_messages

    if item.kind == "qa":
        return generator.chat_ids(build_messages(item.prompt, [context]))[0].tolist()
    return generator.tokenizer(context + "\n\n" + item.prompt, add_special_tokens=False)["input_ids"]


def answer_ids(generator, item: Item) -> list[int]:
    tok = generator.tokenizer
    ids = tok(" " + item.answer if item.kind == "cloze" else item.answer, add_special_tokens=False)["input_ids"]
    if item.kind == "qa" and tok.eos_token_id is not None:
        end = tok.convert_tokens_to_ids("<|im_end|>")
        ids = ids + [end if isinstance(end, int) and end != tok.unk_token_id else tok.eos_token_id]
    return ids


def _pad(sequences: list[list[int]]):
    """Right-padded ids and attention mask for token sequences."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for r, s in enumerate(sequences):
        ids[r, :len(s)] = torch.as_tensor(s)
        mask[r, :len(s)] = 1
    return ids, mask


def position_logits(model, sequences: list[list[int]], positions: list[list[int]], prefix: Sequence[int] = ()) -> list:
    """Logits at the given positions of each sequence, one forward for the batch. The vocabulary projection
    runs only at those positions (transformers' boolean `logits_to_keep`), not at every token: most of a
    training sequence is prompt, and the projection onto a 49k vocabulary is a large share of the work.

    prefix: tokens that come before every sequence (positions count from the sequence's start, after it); they
    run once, and their cache serves every row (the teacher's memory chunk is shared by all of its items)."""
    import torch

    # the mask yields positions in ascending order per row; callers pass ascending ranges, so a split suffices
    assert all(p == sorted(set(p)) for p in positions), "positions must be ascending and distinct"
    ids, mask = _pad(sequences)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for r, pos in enumerate(positions):
        keep[r, pos] = True
    device = next(model.parameters()).device
    cached = {}
    if len(prefix):
        past = output_cache(model(input_ids=torch.as_tensor([list(prefix)], device=device), use_cache=True))
        past.batch_repeat_interleave(len(sequences))
        mask = torch.cat([torch.ones((len(sequences), len(prefix)), dtype=mask.dtype), mask], dim=1)
        cached = {**cache_kwargs(model, past), "use_cache": True}
    flat = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device),
                 **cached).logits
    flat = flat.reshape(-1, flat.shape[-1])  # rows in order, positions ascending within a row
    return list(torch.split(flat, [len(p) for p in positions]))


def _top_k_targets(model, sequences: list[list[int]], spans: list[tuple[int, int]], k: int, temperature: float,
                   batch_size: int = 8, groups: Sequence | None = None):
    """Teacher top-k probabilities at the positions span=(start, end) of each sequence.

    groups: a key per sequence; sequences of one key are batched together and the tokens they share ahead of
    every span (the memory chunk in context) run once per batch. None: batches by length."""
    import torch

    if groups is None:
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    else:
        by_key: dict = {}
        for i, key in enumerate(groups):
            by_key.setdefault(key, []).append(i)
        batches = [idx[b:b + batch_size] for idx in by_key.values() for b in range(0, len(idx), batch_size)]
    results: dict[int, tuple] = {}
    for idx in batches:
        shared = 0 if groups is None else \
            min(len(common_prefix([sequences[i] for i in idx])), *(spans[i][0] for i in idx))
        with torch.inference_mode():
            logits = position_logits(model, [sequences[i][shared:] for i in idx],
                                     [list(range(spans[i][0] - shared, spans[i][1] - shared)) for i in idx],
                                     prefix=sequences[idx[0]][:shared])
        for i, lg in zip(idx, logits):
            probs = torch.softmax(lg.float() / temperature, dim=-1)
            p, j = probs.topk(k, dim=-1)
            results[i] = (j.cpu(), (p / p.sum(-1, keepdim=True)).cpu())
    return [results[i] for i in range(len(sequences))]


def prepare_items(generator, items: Sequence[Item], contexts: dict[int, str], recipe: Recipe,
                  progress: Callable[[int], None] | None = None) -> list[Example]:
    """Teacher targets for items: the base model with the memory chunk in context, teacher-forced on the answer.
    A memory's items of one kind share their prompt up to the item (the chunk), which runs once per batch."""
    students, teachers, spans, student_pos = [], [], [], []
    for item in items:
        s_prompt, t_prompt, ans = student_prompt_ids(generator, item), \
            teacher_prompt_ids(generator, item, contexts[item.memory_id]), answer_ids(generator, item)
        students.append(s_prompt + ans)
        student_pos.append(list(range(len(s_prompt) - 1, len(s_prompt) + len(ans) - 1)))
        teachers.append(t_prompt + ans)
        spans.append((len(t_prompt) - 1, len(t_prompt) + len(ans) - 1))
    targets = _top_k_targets(generator.model, teachers, spans, recipe.top_k, recipe.temperature,
                             groups=[(item.memory_id, item.kind) for item in items])
    if progress:
        progress(len(items))
    return [Example(s, pos, j, p, "item") for s, pos, (j, p) in zip(students, student_pos, targets)]


def open_book_items(items: Sequence[Item], contexts: dict[int, str], share: float, seed: int) -> list[tuple]:
    """(item, sources, teacher context) triples for open-book training (Recipe.open_book): a seeded `share` of the
    qa items, each once with its memory and a distractor (another memory) as sources, in random order, read by the
    teacher too, and once with the distractor alone while the teacher reads the memory."""
    rng = random.Random(seed)
    qa = [it for it in items if it.kind == "qa" and it.memory_id > 0 and it.memory_id in contexts]
    others = sorted(m for m in contexts if m > 0)  # memories (exemplars have negative ids)
    if share <= 0 or len(others) < 2 or not qa:
        return []
    out = []
    for it in rng.sample(qa, max(1, round(len(qa) * min(share, 1.0)))):
        distractor = contexts[rng.choice([m for m in others if m != it.memory_id])]
        both = [contexts[it.memory_id], distractor]
        rng.shuffle(both)
        out += [(it, both, None), (it, [distractor], contexts[it.memory_id])]
    return out


def prepare_open_book(generator, triples: Sequence[tuple], recipe: Recipe) -> list[Example]:
    """Teacher targets for open-book items (see open_book_items): the student's prompt carries the sources as `ask`
    puts them; the teacher reads that same prompt, or, where a teacher context is given, the memory alone."""
    from memory_llm.generate import build_messages

    students, teachers, spans, student_pos = [], [], [], []
    for item, sources, context in triples:
        s_prompt = generator.chat_ids(build_messages(item.prompt, sources))[0].tolist()
        t_prompt = s_prompt if context is None else teacher_prompt_ids(generator, item, context)
        ans = answer_ids(generator, item)
        students.append(s_prompt + ans)
        student_pos.append(list(range(len(s_prompt) - 1, len(s_prompt) + len(ans) - 1)))
        teachers.append(t_prompt + ans)
        spans.append((len(t_prompt) - 1, len(t_prompt) + len(ans) - 1))
    targets = _top_k_targets(generator.model, teachers, spans, recipe.top_k, recipe.temperature)
    return [Example(s, pos, j, p, "item") for s, pos, (j, p) in zip(students, student_pos, targets)]


def prepare_locality(generator, prompts: Sequence[str], recipe: Recipe) -> list[Example]:
    """Base-model targets on generic prompts: its greedy continuation, teacher-forced, top-k per position."""
    chats = [closed_prompt_ids(generator, p) for p in prompts]
    conts = generator.generate_batch(chats, recipe.locality_tokens, return_ids=True)
    sequences, spans = [], []
    for prompt, cont_ids in ((p, c) for p, c in zip(chats, conts) if c):  # (an immediate end teaches nothing)
        sequences.append(prompt + cont_ids)
        spans.append((len(prompt) - 1, len(prompt) + len(cont_ids) - 1))
    targets = _top_k_targets(generator.model, sequences, spans, recipe.top_k, recipe.temperature)
    return [Example(s, list(range(a, b)), j, p, "locality") for s, (a, b), (j, p) in zip(sequences, spans, targets)]


def attach_lora(model, recipe: Recipe, init_from: str | None = None):
    """A peft LoRA model on the base (fresh, or continuing from an adapter directory), trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_from:
        return PeftModel.from_pretrained(model, init_from, is_trainable=True)
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, bias="none",
                        target_modules=[t for t in recipe.target_modules if t in names], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def top_directions(cov, energy: float):
    """The fewest eigen-directions of a covariance (d×d) that hold `energy` of its energy, as columns (d×k)."""
    import torch

    w, v = torch.linalg.eigh(cov.double().cpu())  # ascending eigenvalues
    share = torch.cumsum(w.clamp_min(0).flip(0), 0) / w.clamp_min(0).sum().clamp_min(1e-12)
    k = int((share < energy).sum().item()) + 1
    return v[:, -k:].float()


def null_space_constraint(peft_model, sequences: Sequence[Sequence[int]], energy: float) -> Callable[[], None]:
    """Keep the LoRA update off the inputs that generic prompts produce (the null-space projection of
    AlphaEdit, Fang et al. 2025, applied to LoRA's input side): per LoRA layer, the eigen-directions of the base
    model's inputs on `sequences` that hold `energy` of their energy are found, and every LoRA A is projected
    onto the rest, so B·A·x ≈ 0 for generic x while inputs that differ from them (the new facts) still move.
    Returns the projection; call it after each optimizer step (it also runs once here). Layers that read the
    same tensor (q/k/v, gate/up) share one covariance."""
    import torch
    from peft.tuners.lora import LoraLayer

    if not 0.0 < energy < 1.0:
        raise ValueError(f"null_space_energy must be in (0, 1), not {energy}")
    name = peft_model.active_adapter
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
    first: dict = {}  # layer → the input tensor of its first call (kept alive, so ids are not reused)

    def note(mod, args):
        first.setdefault(mod, args[0])

    covs: dict = {}

    def accumulate(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        covs[mod] = covs.get(mod, 0) + x.T @ x

    device = next(peft_model.parameters()).device
    seqs = [list(s) for s in sequences if s]
    groups: dict = {}
    with torch.inference_mode(), peft_model.disable_adapter():
        hooks = [m.register_forward_pre_hook(note) for m in layers]
        try:
            peft_model(input_ids=torch.as_tensor([seqs[0]], device=device))
        finally:
            for h in hooks:
                h.remove()
        for m in layers:  # the same input tensor → one group
            groups.setdefault(id(first.get(m, m)), []).append(m)
        first.clear()
        hooks = [g[0].register_forward_pre_hook(accumulate) for g in groups.values()]
        try:
            for s in seqs:  # one at a time: no padding rows in the covariance
                peft_model(input_ids=torch.as_tensor([s], device=device))
        finally:
            for h in hooks:
                h.remove()
    bases = []
    for g in groups.values():
        u = top_directions(covs[g[0]], energy).to(device)
        bases += [(m.lora_A[name].weight, u) for m in g]

    def project() -> None:
        with torch.no_grad():
            for weight, u in bases:
                weight -= (weight @ u) @ u.T

    project()
    return project


def plan_batches(examples: list[Example], recipe: Recipe) -> list[list[int]]:
    """Every step's batch for all epochs (more for a round too small to make `min_steps`), fixed by the seed (so a
    resumed run continues the same plan).
    Per epoch, training examples sorted by length (random ties) are cut into batches and the batches shuffled;
    every batch also gets `locality_per_batch` locality examples (cycled), so each step is held to the base
    model on generic prompts, not only the steps that happen to draw one."""
    rng = random.Random(recipe.seed)
    train_idx = [i for i, e in enumerate(examples) if e.kind != "locality"]
    loc_idx = [i for i, e in enumerate(examples) if e.kind == "locality"]
    per = min(recipe.locality_per_batch, recipe.batch_size - 1) if loc_idx else 0
    size = recipe.batch_size - per
    plan, cursor = [], 0
    rng.shuffle(loc_idx)
    per_epoch = -(-len(train_idx) // size)  # batches an epoch (ceiling)
    epochs = max(recipe.epochs, -(-recipe.min_steps // per_epoch)) if per_epoch else 0
    for _ in range(epochs):
        order = sorted(train_idx, key=lambda i: (len(examples[i].ids), rng.random()))
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        rng.shuffle(batches)
        for batch in batches:
            plan.append(batch + [loc_idx[(cursor + j) % len(loc_idx)] for j in range(per)])
            cursor += per
    return plan


def train(peft_model, examples: list[Example], recipe: Recipe, *, deadline: float | None = None,
          progress: Callable[[int, int, dict], None] | None = None, checkpoint: Checkpoint | None = None,
          constrain: Callable[[], None] | None = None, lr: float | None = None) -> dict:
    """Distillation loop: batches of similar length; loss = KL(teacher‖student)·T² on answer tokens (+ CE on
    the answer) and KL(base‖student)·T² on locality tokens. Stops at the deadline (time.time()) if given.
    With a checkpoint, training state is saved every `checkpoint.every` seconds and at a deadline stop, and a
    run with the same plan resumes from it. `constrain` runs after every optimizer step (null_space_constraint).
    `lr` overrides recipe.lr (run.py scales it when continuing an adapter). A loss that is not finite, or a tenth
    of the steps whose mean loss is `recipe.diverge_ratio` × the first tenth's, stops the loop with
    `diverged` set (before the update). The stats include the loss curve: the mean loss over each tenth of the
    planned steps run here."""
    import torch

    torch.manual_seed(recipe.seed)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    lr = recipe.lr if lr is None else lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    plan = plan_batches(examples, recipe)
    total = len(plan)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 10))
                                              * max(0.0, 1 - s / max(1, total)))
    device = next(peft_model.parameters()).device
    autocast = training_autocast(peft_model) if recipe.mixed_precision else contextlib.nullcontext
    step = checkpoint.restore(peft_model, opt, sched) if checkpoint else 0
    resumed_at = step
    peft_model.train()
    tokens, started, stopped_early, diverged, saved_at = 0, time.perf_counter(), False, False, time.time()
    losses: list[float] = []
    window = max(4, total // 10)
    for batch in plan[step:]:
        if deadline is not None and time.time() > deadline:
            stopped_early = True
            break
        with autocast():
            loss = _batch_loss(peft_model, [examples[i] for i in batch], recipe, device)
        losses.append(loss.item())
        if _diverging(losses, window, recipe.diverge_ratio):
            diverged = True
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if constrain:
            constrain()
        sched.step()
        step += 1
        tokens += sum(len(examples[i].ids) for i in batch)
        if progress:
            progress(step, total, {"loss": losses[-1]})
        if checkpoint and step < total and time.time() - saved_at >= checkpoint.every:
            checkpoint.save(peft_model, opt, sched, step)
            saved_at = time.time()
    if checkpoint and stopped_early and step > resumed_at:
        checkpoint.save(peft_model, opt, sched, step)
    peft_model.eval()
    seconds = time.perf_counter() - started
    return {"steps": step, "planned_steps": total, "resumed_at": resumed_at, "tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
            "stopped_early": stopped_early, "diverged": diverged, "lr": lr,
            "precision": "bf16 autocast" if autocast is not contextlib.nullcontext else "as loaded",
            "loss_curve": loss_curve(losses, resumed_at, total),
            "loss_first": round(losses[0], 4) if losses else None,
            "loss_last": round(sum(losses[-5:]) / len(losses[-5:]), 4) if losses else None}


def training_autocast(model) -> Callable:
    """A bf16 autocast context factory for training steps when the model's weights are fp32 and its device
    computes bf16 natively (CPU: AVX512-BF16 or AMX, as oneDNN reports; CUDA: bf16 support); otherwise
    contextlib.nullcontext (a model loaded in bf16 or fp16 already computes in it)."""
    import torch

    param = next(model.parameters())
    if param.dtype != torch.float32:
        return contextlib.nullcontext
    kind = param.device.type
    if kind == "cpu":
        try:  # oneDNN's own check of the CPU (no public API says it)
            fast = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            fast = False
    elif kind == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        fast = False
    return (lambda: torch.autocast(kind, dtype=torch.bfloat16)) if fast else contextlib.nullcontext


def _diverging(losses: list[float], window: int, ratio: float) -> bool:
    """A loss that is not finite, or the last `window` losses' mean above `ratio` × the first window's."""
    if not math.isfinite(losses[-1]):
        return True
    if len(losses) < 2 * window:
        return False
    return sum(losses[-window:]) > ratio * sum(losses[:window])


def loss_curve(losses: list[float], first_step: int, total: int, points: int = 10) -> list[float]:
    """Mean loss per tenth (`points`) of the planned steps, for the steps run from `first_step` on."""
    width = max(1, -(-total // points))
    bins: dict[int, list[float]] = {}
    for step, value in enumerate(losses, start=first_step):
        bins.setdefault(step // width, []).append(value)
    return [round(sum(v) / len(v), 3) for _, v in sorted(bins.items())]


class Checkpoint:
    """Training state of one planned run in a directory (LoRA weights, optimizer, scheduler, step), written
    atomically. `key` names the plan (memories, items, recipe, parent adapter); a checkpoint with another key
    is ignored, so a resumed run always continues the same plan."""

    def __init__(self, path, key: str, every: float = 120.0):
        self.path, self.key, self.every = Path(path), key, every

    def restore(self, model, opt, sched) -> int:
        """Load the saved state into model/opt/sched; the step to continue from (0 if none or another plan)."""
        import torch
        from peft import set_peft_model_state_dict

        if not (self.path / "meta.json").exists():  # no checkpoint: a fresh run
            return 0
        try:
            meta = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
            if meta.get("key") != self.key:
                return 0
            state = torch.load(self.path / "state.pt", map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            logger.warning("ignoring an unreadable training checkpoint (%s); training from the start", exc)
            return 0
        set_peft_model_state_dict(model, state["lora"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        logger.info("resuming training at step %d from a checkpoint", state["step"])
        return int(state["step"])

    def save(self, model, opt, sched, step: int) -> None:
        import torch
        from peft import get_peft_model_state_dict

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".candidate-checkpoint-", dir=self.path.parent)  # swept like candidates
        lora = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}
        torch.save({"lora": lora, "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step},
                   os.path.join(tmp, "state.pt"))
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as fh:
            json.dump({"key": self.key, "step": step, "saved_at": time.time()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        old = self.path.with_name(self.path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.path.exists():
            os.replace(self.path, old)  # a kill between the two renames leaves .old; restore() then sees none
        os.replace(tmp, self.path)
        shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.path.with_name(self.path.name + ".old"), ignore_errors=True)


def _logits_by_kind(model, batch: list[Example]) -> list:
    """position_logits for a batch, one forward per kind of example: a batch's items are of similar length (the
    plan sorts them) but its locality examples are not, and one padded forward would compute every row to the
    longest of both. The rows do not interact, so the logits are the same."""
    out: list = [None] * len(batch)
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(batch):
        groups.setdefault(e.kind, []).append(i)
    for idx in groups.values():
        for i, lg in zip(idx, position_logits(model, [batch[i].ids for i in idx], [batch[i].positions for i in idx])):
            out[i] = lg
    return out


def _batch_loss(model, batch: list[Example], recipe: Recipe, device):
    import torch
    import torch.nn.functional as F

    logits = _logits_by_kind(model, batch)
    t = recipe.temperature
    item_loss, loc_loss, ce_loss = [], [], []
    for e, lg in zip(batch, logits):
        lg = lg.float()
        logp = F.log_softmax(lg / t, dim=-1).gather(-1, e.top_idx.to(device))
        p = e.top_p.to(device)
        kl = (p * (p.clamp_min(1e-9).log() - logp)).sum(-1).mean() * t * t
        if e.kind == "item":
            item_loss.append(kl)
            targets = torch.as_tensor([e.ids[i + 1] for i in e.positions], device=device)
            ce_loss.append(F.cross_entropy(lg, targets))
        else:
            loc_loss.append(kl)
    loss = logits[0].new_zeros(())
    if item_loss:
        loss = loss + torch.stack(item_loss).mean() + recipe.ce_weight * torch.stack(ce_loss).mean()
    if loc_loss:
        loss = loss + recipe.locality_weight * torch.stack(loc_loss).mean()
    return loss
