"""Training in several processes (memory_llm.consolidate.distributed): two CPU processes over gloo on the tiny
model end with identical weights, and with the weights and losses of one process within float noise."""

import copy

import pytest

from memory_llm import InputError
from memory_llm.consolidate.recipe import Recipe

from conftest import tiny_model, tiny_tokenizer

# 11 items: batches of 4 items and 2 locality examples (2 + 1 per process), the last of each epoch 3 items (2 + 1)
RECIPE = Recipe(epochs=2, batch_size=6, locality_per_batch=2, rank=4, alpha=8, lr=1e-2, min_steps=0,
                null_space_energy=0.9, mixed_precision=False)


def _examples(n_items=11, n_loc=4):
    import torch

    from memory_llm.consolidate.examples import Example

    g = torch.Generator().manual_seed(0)
    out = []
    for n in range(n_items + n_loc):
        ids = torch.randint(5, 90, (10 + n % 5,), generator=g).tolist()
        top = torch.randint(5, 90, (4, 6), generator=g)
        p = torch.softmax(torch.randn(4, 6, generator=g), -1)
        out.append(Example(ids, [3, 4, 5, 6], top, p, "item" if n < n_items else "locality"))
    return out


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """The tiny model saved to a directory and loaded from it (as real models are: the workers reload it)."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    tiny_model(tiny_tokenizer()).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _lora(base):
    import torch

    from memory_llm.consolidate.train import attach_lora

    torch.manual_seed(1)
    return attach_lora(copy.deepcopy(base), RECIPE)


def _lora_weights(model):
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_two_processes_end_with_identical_weights_and_one_process_s_result(saved_tiny, tmp_path):
    from memory_llm.consolidate.distributed import train_in_processes
    from memory_llm.consolidate.train import null_space_constraint, train

    examples = _examples()
    loc = [e.ids for e in examples if e.kind == "locality"]
    one = _lora(saved_tiny)
    stats1 = train(one, examples, RECIPE, constrain=null_space_constraint(one, loc, RECIPE.null_space_energy))
    two = _lora(saved_tiny)
    start = _lora_weights(two)
    stats2 = train_in_processes(two, examples, RECIPE, tmp_path / "job", processes=2, locality=loc)
    assert stats2["processes"] == 2 and stats2["ranks_agree"] and stats2["backend"] == "gloo"
    assert stats2["steps"] == stats1["steps"] == stats1["planned_steps"] == 6
    assert not (tmp_path / "job").exists()  # removed after a good run
    # The same step as one process's, up to float rounding: the shares' gradients are summed in another order and
    # padded to other widths, and Adam's normalisation magnifies rounding where a gradient is near zero. Over 6 steps
    # that moved each tensor by > 0.01 it left at most 1.5e-4 of the move (measured, the recipe's seed-0 start;
    # 1.5e-5 from another start); 1e-3 allows for other CPUs' kernels. Summing means of unequal shares instead (the
    # last batch splits 2 + 1 items) would weigh items unequally: a difference of the order of the move itself.
    w1, w2 = _lora_weights(one), _lora_weights(two)
    worst = 0.0
    for name in w1:
        moved = (w1[name] - start[name]).norm()
        assert moved > 0.01, name
        worst = max(worst, float((w1[name] - w2[name]).norm() / moved))
    assert worst <= 1e-3, worst
    assert stats2["loss_curve"] == pytest.approx(stats1["loss_curve"], abs=2e-3)  # (rounded to 1e-3)
    assert stats2["loss_last"] == pytest.approx(stats1["loss_last"], rel=1e-4)


def test_a_round_in_two_processes_promotes_with_one_process_s_figures(mem, tmp_path, fake_embedder, tiny_generator):
    """The whole round (run.py) with --processes 2: the model built in memory travels as a copy in the job; the
    gate sees the figures a one-process round sees."""
    from memory_llm import MemoryLLM
    from memory_llm.consolidate.gate import Floors

    recipe = Recipe(epochs=1, batch_size=8, rank=4, alpha=8, locality_prompts=4, questions=2, min_steps=4)
    floors = Floors(reliability=0.0, locality=0.0, retention=0.0, tolerance=1.0)
    fact = "The lighthouse of Varn was built in 1820 by the engineer Lisbet Holm."
    one = MemoryLLM(tmp_path / "one", embedder=fake_embedder, generator=tiny_generator, max_new_tokens=8)
    try:
        for m in (mem, one):
            m.learn(text=fact, source="fact")
        two_summary = mem.consolidate(recipe=recipe, floors=floors, processes=2)
        one_summary = one.consolidate(recipe=recipe, floors=floors)
    finally:
        one.reload_adapter()
        one.close()
    assert two_summary.status == one_summary.status == "promoted"
    t2, t1 = two_summary.training, one_summary.training
    assert t2["processes"] == 2 and t2["ranks_agree"] and "processes" not in t1
    assert t2["steps"] == t1["steps"] >= 4 and t2["loss_last"] == pytest.approx(t1["loss_last"], rel=1e-3)
    # the weights agree to ~1e-5 of their move, so greedy answers agree but for near-ties (measured: equal)
    assert two_summary.metrics.keys() == one_summary.metrics.keys()
    for k, v in one_summary.metrics.items():
        assert two_summary.metrics[k] == (v if v is None else pytest.approx(v, abs=0.02)), k
    assert not list(mem.adapters.root.glob(".candidate-*"))  # the job is gone


def test_bad_processes_and_launchers_are_one_line_errors(mem, saved_tiny, tmp_path):
    from memory_llm.consolidate.distributed import TrainingError, launcher_command, train_in_processes

    mem.learn(text="A fact to train on.", source="fact")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="processes must be"):
            mem.consolidate(processes=bad)
    with pytest.raises(InputError, match="must contain {job}"):
        launcher_command("torchrun -m memory_llm.consolidate.distributed", tmp_path)
    assert launcher_command("torchrun --nnodes 2 -m x '{job}'", tmp_path / "a b")[-1] == str(tmp_path / "a b")
    with pytest.raises(TrainingError, match=r"training workers failed \(exit 1\)"):
        train_in_processes(_lora(saved_tiny), _examples(), RECIPE, tmp_path / "job", launcher="false {job}")
    assert (tmp_path / "job" / "workers.log").exists()  # a failed job is kept for its log


def test_the_worker_entry_says_how_to_call_it(tmp_path):
    from memory_llm.consolidate.distributed import main

    assert main([]) == 2 and main([str(tmp_path)]) == 2


def test_the_cli_takes_processes_and_a_launcher_and_fails_in_one_line(monkeypatch, fake_embedder, tiny_generator,
                                                                     tmp_path):
    from typer.testing import CliRunner

    from memory_llm import MemoryLLM, cli, cli_common

    monkeypatch.setattr(cli_common, "open_memory", lambda home, **kw: MemoryLLM(
        home, embedder=fake_embedder, generator=tiny_generator))
    runner = CliRunner()

    def mllm(*args):
        return runner.invoke(cli.app, list(args))
    assert mllm("learn", "--text", "The lighthouse of Varn was built in 1820.").exit_code == 0
    assert mllm("consolidate", "--processes", "0").exit_code == 2  # typer's usage error
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("epochs = 1\nrank = 4\nalpha = 8\nlocality_prompts = 4\nquestions = 1\nmin_steps = 0\n")
    for launcher, says in (("torchrun -m x", "must contain {job}"), ("torchrun '{job}", "not a command line"),
                           ("false {job}", "training workers failed (exit 1)")):
        out = mllm("consolidate", "--launcher", launcher, "--recipe", str(recipe))
        err = out.stderr.strip()
        assert out.exit_code == 1 and err.startswith("Error: ") and says in err and len(err.splitlines()) == 1, err
        assert "Traceback" not in out.output

