"""The training loop: distil the teacher's targets into a LoRA student (peft), with a locality term that keeps
the student close to the base model on generic prompts, a null-space projection, checkpoints that let a killed
or out-of-time run resume, and a divergence check.

Linear, top to bottom: attach LoRA → plan batches → train (checkpointed) → return statistics.
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
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from memory_llm.consolidate.examples import Example, position_logits

if TYPE_CHECKING:
    from memory_llm.consolidate.recipe import Recipe

logger = logging.getLogger(__name__)


class Group(Protocol):
    """The processes that train one adapter together (memory_llm.consolidate.distributed makes one): each step
    every process runs its share of the batch, and the sums over all of them make one process's step."""

    rank: int
    size: int

    def share(self, batch: list[int]) -> list[int]:
        """This process's part of a step's batch (the parts of all processes make the batch, without overlap)."""

    def sum_(self, flat) -> None:
        """Sum a 1-d tensor over the processes, in place (every process gets the same bits)."""

    def broadcast(self, tensor):
        """The first process's tensor (any shape), on every process."""


def attach_lora(model, recipe: Recipe, init_from: str | None = None):
    """A peft LoRA model on the base (fresh, or continuing from an adapter directory), trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_from:
        return PeftModel.from_pretrained(model, init_from, is_trainable=True)
    import torch

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, bias="none",
                        target_modules=[t for t in recipe.target_modules if t in names], task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):  # the recipe's seed draws the starting LoRA, whatever ran before
        torch.manual_seed(recipe.seed)
        return get_peft_model(model, config)


def top_directions(cov, energy: float):
    """The fewest eigen-directions of a covariance (d×d) that hold `energy` of its energy, as columns (d×k)."""
    import torch

    w, v = torch.linalg.eigh(cov.double().cpu())  # ascending eigenvalues
    share = torch.cumsum(w.clamp_min(0).flip(0), 0) / w.clamp_min(0).sum().clamp_min(1e-12)
    k = int((share < energy).sum().item()) + 1
    return v[:, -k:].float()


def null_space_constraint(peft_model, sequences: Sequence[Sequence[int]], energy: float,
                          share: Callable | None = None) -> Callable[[], None]:
    """Keep the LoRA update off the inputs that generic prompts produce (the null-space projection of
    AlphaEdit, Fang et al. 2025, applied to LoRA's input side): per LoRA layer, the eigen-directions of the base
    model's inputs on `sequences` that hold `energy` of their energy are found, and every LoRA A is projected
    onto the rest, so B·A·x ≈ 0 for generic x while inputs that differ from them (the new facts) still move.
    Returns the projection; call it after each optimizer step (it also runs once here). Layers that read the
    same tensor (q/k/v, gate/up) share one covariance. `share` (several processes: Group.broadcast) makes every
    process use the first one's directions, so their projections, and so their weights, stay identical."""
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
        u = top_directions(covs[g[0]], energy)
        u = (share(u) if share else u).to(device)
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
          constrain: Callable[[], None] | None = None, lr: float | None = None, group: Group | None = None) -> dict:
    """Distillation loop: batches of similar length; loss = KL(teacher‖student)·T² on answer tokens (+ CE on
    the answer) and KL(base‖student)·T² on locality tokens. Stops at the deadline (time.time()) if given.
    With a checkpoint, training state is saved every `checkpoint.every` seconds and at a deadline stop, and a
    run with the same plan resumes from it. `constrain` runs after every optimizer step (null_space_constraint).
    `lr` overrides recipe.lr (run.py scales it when continuing an adapter). A loss that is not finite, or a tenth
    of the steps whose mean loss is `recipe.diverge_ratio` × the first tenth's, stops the loop with
    `diverged` set (before the update). The stats include the loss curve: the mean loss over each tenth of the
    planned steps run here.

    group: the processes training together (memory_llm.consolidate.distributed). Each runs its share of every
    step's batch, its loss scaled to the whole batch's counts, and the gradients, the loss and the deadline are
    summed over the processes in one all-reduce; so every process takes the step one process would take, and
    they end with identical weights. Only the first (rank 0) writes checkpoints."""
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
    writes = group is None or group.rank == 0
    for batch in plan[step:]:
        late = deadline is not None and time.time() > deadline
        if group is None and late:
            stopped_early = True
            break
        if group is None:
            with autocast():
                loss = batch_loss(peft_model, [examples[i] for i in batch], recipe, device)
            value = loss.item()
        else:  # the update waits for the divergence check below, as one process's does
            value, late = group_step(group, peft_model, params, opt, [examples[i] for i in batch], recipe, device,
                                     autocast, late)
            if late:
                stopped_early = True
                break
        losses.append(value)
        if diverging(losses, window, recipe.diverge_ratio):
            diverged = True
            break
        if group is None:
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
        if checkpoint and writes and step < total and time.time() - saved_at >= checkpoint.every:
            checkpoint.save(peft_model, opt, sched, step)
            saved_at = time.time()
    if checkpoint and writes and stopped_early and step > resumed_at:
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


def group_step(group: Group, model, params: list, opt, batch: list[Example], recipe: Recipe, device, autocast,
               late: bool) -> tuple[float, bool]:
    """One step's gradients over a group: this process's share of the batch, its loss divided by the whole
    batch's counts (so the shares' losses add up to the batch's loss), backward, then one all-reduce of the
    gradients, the loss and the deadline flag. Returns (the batch's loss, whether any process is past the
    deadline); the gradients in `params` are the batch's."""
    import torch

    counts = (sum(e.kind == "item" for e in batch), sum(e.kind != "item" for e in batch))
    mine = [batch[i] for i in group.share(list(range(len(batch))))]
    opt.zero_grad(set_to_none=True)
    value = 0.0
    if mine:
        with autocast():
            loss = batch_loss(model, mine, recipe, device, counts=counts)
        loss.backward()
        value = loss.item()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [torch.tensor([value, float(late)], device=params[0].device)])
    group.sum_(flat)
    at = 0
    for p in params:
        p.grad = flat[at:at + p.numel()].view_as(p).to(p.dtype)
        at += p.numel()
    return flat[-2].item(), bool(flat[-1].item())


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


def diverging(losses: list[float], window: int, ratio: float) -> bool:
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


def logits_by_kind(model, batch: list[Example]) -> list:
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


def batch_loss(model, batch: list[Example], recipe: Recipe, device, counts: tuple[int, int] | None = None):
    """The distillation loss of a batch: the items' mean KL and CE plus the locality examples' mean KL, weighted.
    counts: (items, locality examples) of the whole step when `batch` is one process's share of it; the share's
    terms are then divided by those, so the shares' losses add up to the whole batch's."""
    import torch
    import torch.nn.functional as F

    logits = logits_by_kind(model, batch)
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
    if counts is None:
        if item_loss:
            loss = loss + torch.stack(item_loss).mean() + recipe.ce_weight * torch.stack(ce_loss).mean()
        if loc_loss:
            loss = loss + recipe.locality_weight * torch.stack(loc_loss).mean()
        return loss
    if item_loss:
        loss = loss + (torch.stack(item_loss).sum() + recipe.ce_weight * torch.stack(ce_loss).sum()) / counts[0]
    if loc_loss:
        loss = loss + recipe.locality_weight * torch.stack(loc_loss).sum() / counts[1]
    return loss
