"""Training in several processes, GPUs or machines: the main process writes a job (the training examples with
their teacher targets, the recipe, the base model, the LoRA to start from), starts the workers, waits, and loads
the trained LoRA back; evaluation, the gate and promotion stay in the main process (run.py).

Each worker (`python -m memory_llm.consolidate.distributed JOB`, started by torchrun or `accelerate launch`, which
set RANK, WORLD_SIZE and the rendezvous) loads the base model and the starting LoRA, and runs the same `train()`
with a `Group`: every step each worker runs its share of the batch and one all-reduce sums the gradients, so each
takes the step one process would take. Rank 0 writes checkpoints, progress and the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from memory_llm.consolidate.examples import Example
from memory_llm.consolidate.recipe import Recipe
from memory_llm.consolidate.train import Checkpoint, attach_lora, null_space_constraint, train
from memory_llm.errors import InputError, MemoryLLMError

logger = logging.getLogger(__name__)

MODULE = "memory_llm.consolidate.distributed"


class TrainingError(MemoryLLMError):
    """The training workers failed (their log's last lines say why)."""


class Group:
    """The worker processes of one job, over torch.distributed (accelerate's PartialState sets it up: gloo on
    CPU, nccl on CUDA). See memory_llm.consolidate.train.Group."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def share(self, batch: list[int]) -> list[int]:
        """Every size-th entry from this rank's: items and locality examples split evenly (a batch lists its
        items first), so each worker's forward is about as long."""
        return batch[self.rank::self.size]

    def sum_(self, flat) -> None:
        import torch.distributed as dist

        dist.all_reduce(flat, op=dist.ReduceOp.SUM)

    def broadcast(self, tensor):
        import torch
        import torch.distributed as dist

        device = tensor.device if dist.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())
        shape = torch.tensor(list(tensor.shape) + [0] * (4 - tensor.dim()), device=device)  # at most 4-d here
        dist.broadcast(shape, 0)
        dims = [int(d) for d in shape.tolist()][:tensor.dim()]
        out = tensor.to(device).contiguous() if self.rank == 0 else torch.empty(dims, dtype=tensor.dtype,
                                                                               device=device)
        dist.broadcast(out, 0)
        return out.to(tensor.device)


def local_command(processes: int, job: Path) -> list[str]:
    """The command that trains a job in `processes` local processes (torchrun, standalone rendezvous)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", MODULE, str(job)]


def launcher_command(template: str, job: Path) -> list[str]:
    """A user's launch line (for several machines) with {job} replaced by the job directory."""
    if "{job}" not in template:
        raise InputError("--launcher must contain {job}, where the job directory goes (docs/consolidation.md)")
    try:
        parts = shlex.split(template)
    except ValueError as exc:
        raise InputError(f"--launcher is not a command line: {exc}") from None
    return [part.replace("{job}", str(job)) for part in parts]


def train_in_processes(model, examples: list[Example], recipe: Recipe, job: Path, *, processes: int = 1,
                       launcher: str | None = None, lr: float | None = None, deadline: float | None = None,
                       checkpoint: Checkpoint | None = None, locality: list[list[int]] | None = None,
                       progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train `model` (a peft LoRA model) on `examples` in several processes, as `train()` would in one, and
    load the trained LoRA into it. The null-space constraint (if the recipe has one) is built by the workers from
    the `locality` sequences.

    Args:
        job: an empty directory for the job (on a filesystem every machine sees, for several machines); removed
            after a successful run.
        processes: local worker processes (torchrun); ignored when `launcher` is given.
        launcher: a command line with {job} that starts the workers itself (several machines).
        lr, deadline, checkpoint, progress: as train() takes them.

    Returns:
        train()'s statistics from rank 0, plus "processes" (how many trained) and "ranks_agree" (every worker
        ended with the same LoRA weights, bit for bit).
    """
    write_job(job, model, examples, recipe, lr=lr, deadline=deadline, checkpoint=checkpoint, locality=locality)
    command = launcher_command(launcher, job) if launcher else local_command(processes, job)
    run_workers(command, job, processes, progress)
    stats = read_result(job, model)
    shutil.rmtree(job, ignore_errors=True)  # a failed job stays for its log (the next round sweeps it)
    return stats


def write_job(job: Path, model, examples: list[Example], recipe: Recipe, *, lr: float | None,
              deadline: float | None, checkpoint: Checkpoint | None, locality: list[list[int]] | None) -> None:
    """Everything a worker needs in `job`: job.json, examples.pt, the starting LoRA (init/), and the base model's
    weights (base/) when it was not loaded from a directory the workers can load it from."""
    import torch

    job.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model()
    path = getattr(base.config, "_name_or_path", "") or ""
    if not (Path(path) / "config.json").is_file():
        path = ""
        write_base(model, job / "base")
    model.save_pretrained(job / "init", selected_adapters=[model.active_adapter])
    torch.save([{"ids": e.ids, "positions": e.positions, "top_idx": e.top_idx, "top_p": e.top_p, "kind": e.kind}
                for e in examples], job / "examples.pt")
    param = next(model.parameters())
    spec = {"recipe": recipe.as_dict(), "lr": lr, "deadline": deadline, "base": path,
            "dtype": str(param.dtype).removeprefix("torch."), "device": param.device.type,
            "adapter": model.active_adapter, "locality": locality or [],
            "checkpoint": None if checkpoint is None else {"path": str(checkpoint.path), "key": checkpoint.key,
                                                           "every": checkpoint.every}}
    (job / "job.json").write_text(json.dumps(spec), encoding="utf-8")


def write_base(peft_model, target: Path) -> None:
    """The base model's own weights (no LoRA) and config, for a model that was built in memory."""
    import torch

    target.mkdir(parents=True, exist_ok=True)
    base = peft_model.get_base_model()
    base.config.save_pretrained(target)
    state = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items() if "lora_" not in k}
    torch.save(state, target / "weights.pt")


def run_workers(command: list[str], job: Path, processes: int, progress: Callable | None) -> None:
    """Run the workers' launch command, relaying rank 0's progress; a failure is a TrainingError with the end of
    the workers' log."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # workers import this same memory_llm
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # torchrun sets 1 thread per worker when it starts several; a CPU worker gets its share of the cores instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, processes))))
    log = job / "workers.log"
    logger.info("training in workers: %s", shlex.join(command))
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            seen = None
            while proc.poll() is None:
                time.sleep(0.5)
                seen = relay_progress(job, progress, seen)
            relay_progress(job, progress, seen)
        except BaseException:
            proc.terminate()  # a kill of the main process ends its workers
            proc.wait()
            raise
    if proc.returncode != 0 or not (job / "result.json").exists():
        tail = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        why = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
        why = f": {why.strip()[:300]}" if why.strip() else ""
        raise TrainingError(f"training workers failed (exit {proc.returncode}){why} (log: {log})")


def relay_progress(job: Path, progress: Callable | None, seen):
    if progress is None:
        return seen
    try:
        step, total = json.loads((job / "progress.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return seen
    if (step, total) != seen:
        progress(step, total, {})
    return step, total


def read_result(job: Path, model) -> dict:
    """Load rank 0's trained LoRA into `model`; its statistics."""
    import torch
    from peft import set_peft_model_state_dict

    stats = json.loads((job / "result.json").read_text(encoding="utf-8"))
    state = torch.load(job / "result.pt", map_location="cpu", weights_only=True)
    set_peft_model_state_dict(model, state, adapter_name=model.active_adapter)
    if not stats["ranks_agree"]:
        logger.warning("the training workers ended with different LoRA weights; rank 0's are used")
    return stats


# ---- the worker ------------------------------------------------------------------------------------------------

def load_base(job: Path, spec: dict, device):
    """The base model a worker trains on: from its directory, or from the copy in the job."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, spec["dtype"])
    if spec["base"]:
        model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(job / "base"), dtype=dtype)
        model.load_state_dict(torch.load(job / "base" / "weights.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval()


def lora_digest(model) -> str:
    """sha256 of the LoRA weights' bytes, in name order."""
    from peft import get_peft_model_state_dict

    h = hashlib.sha256()
    for name, value in sorted(get_peft_model_state_dict(model).items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def work(job: Path) -> None:
    """One worker: train the job as this process's rank; rank 0 writes progress.json, result.pt, result.json."""
    import torch
    import torch.distributed as dist
    from accelerate import PartialState
    from peft import PeftModel

    spec = json.loads((job / "job.json").read_text(encoding="utf-8"))
    state = PartialState(cpu=spec["device"] != "cuda")
    group = Group(state.process_index, state.num_processes)
    recipe = Recipe.from_dict(spec["recipe"], str(job / "job.json"))
    model = PeftModel.from_pretrained(load_base(job, spec, state.device), job / "init",
                                      adapter_name=spec["adapter"], is_trainable=True)
    examples = [Example(**e) for e in torch.load(job / "examples.pt", map_location="cpu", weights_only=True)]
    constrain = null_space_constraint(model, spec["locality"], recipe.null_space_energy, share=group.broadcast) \
        if recipe.null_space_energy and spec["locality"] else None
    ck = spec["checkpoint"]
    checkpoint = Checkpoint(ck["path"], ck["key"], ck["every"]) if ck else None

    def note(step: int, total: int, _: dict) -> None:
        tmp = job / f".progress-{os.getpid()}"
        tmp.write_text(json.dumps([step, total]), encoding="utf-8")
        os.replace(tmp, job / "progress.json")

    stats = train(model, examples, recipe, deadline=spec["deadline"], checkpoint=checkpoint, constrain=constrain,
                  lr=spec["lr"], group=group, progress=note if group.rank == 0 else None)
    digests = [None] * group.size
    dist.all_gather_object(digests, lora_digest(model))
    if group.rank == 0:
        from peft import get_peft_model_state_dict

        stats.update(processes=group.size, ranks_agree=len(set(digests)) == 1, backend=dist.get_backend())
        torch.save({k: v.detach().cpu() for k, v in get_peft_model_state_dict(model).items()}, job / "result.pt")
        tmp = job / ".result.json"
        tmp.write_text(json.dumps(stats), encoding="utf-8")
        os.replace(tmp, job / "result.json")  # last: its presence says the result is whole
    state.wait_for_everyone()
    state.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / "job.json").is_file():
        print(f"usage: python -m {MODULE} JOB_DIR (a directory that `mllm consolidate` wrote)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    work(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
