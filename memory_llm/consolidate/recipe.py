"""The consolidation recipe: every hyper-parameter of a round, with help text and validation, loadable from a
TOML file (`mllm consolidate --recipe FILE`). Why each default is what it is: docs/consolidation.md, "Recipe
fields: why these defaults"; the measurements behind them: docs/lab-notes.md.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from memory_llm.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POOLS = ("mean", "max")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class Recipe:
    """Hyper-parameters of a consolidation round; the defaults are the measured ones."""

    # LoRA and optimisation
    rank: int = _f(16, "LoRA rank")
    alpha: int = _f(32, "LoRA alpha (the update is scaled by alpha / rank)")
    lr: float = _f(1e-2, "learning rate of the first round")
    later_lr_scale: float = _f(0.3, "the learning rate is multiplied by this in every round after the first")
    epochs: int = _f(5, "passes over the training items (0: synthesize and prepare only)")
    batch_size: int = _f(8, "sequences per training step")
    min_steps: int = _f(16, "a small round runs more epochs to train at least this many steps")
    seed: int = _f(0, "seed of every sampling in the round")
    target_modules: tuple = _f(LORA_TARGETS, "the model's linear layers that get LoRA adapters")
    mixed_precision: bool = _f(True, "train under bf16 autocast where the hardware computes bf16 natively (fp32"
                                     " weights, LoRA and optimizer)")
    diverge_ratio: float = _f(1.5, "a run is diverged when the mean loss of its last tenth of steps exceeds the"
                                   " first tenth's by this factor")
    diverge_retries: int = _f(2, "retries at half the learning rate after a diverged run")
    # distillation
    temperature: float = _f(2.0, "softmax temperature of the teacher's and the student's distributions")
    top_k: int = _f(32, "teacher tokens kept per position (top-k distillation)")
    ce_weight: float = _f(1.0, "weight of the cross-entropy on the items' own tokens beside the distillation")
    # locality: staying the base model on generic prompts
    locality_weight: float = _f(1.0, "weight of the locality term (KL to the base model on generic prompts)")
    locality_tokens: int = _f(32, "tokens of the base model's continuation each locality example supervises")
    locality_per_batch: int = _f(2, "locality examples in every batch")
    locality_prompts: int = _f(40, "generic prompts (of 60) for the locality term and the null space; the rest"
                                    " calibrate the router")
    null_space_energy: float = _f(0.99, "LoRA inputs are projected off the generic prompts' directions that hold"
                                        " this share of their energy (0: off)")
    replay_fraction: float = _f(0.25, "earlier rounds' items replayed, as a share of this round's items, when a"
                                      " round continues an adapter")
    # training items
    rewrites: int = _f(0, "model rewrites of each memory, cut into cloze items")
    held_out_rewrite: bool = _f(False, "one more rewrite per memory, held out for the gate's generalization figure")
    questions: int = _f(4, "questions sampled about each memory as a whole")
    sentence_questions: int = _f(2, "questions asked about each sentence of a memory, in chat form")
    sentence_answers: bool = _f(True, "sentence questions are answered by their sentence itself, not the teacher")
    open_book: float = _f(0.0, "share of qa items also trained with retrieved sources in the prompt (RAFT)")
    cloze_cuts: tuple = _f((0.4,), "where sentences are cut into cloze items, as fractions of their words")
    cloze_answer_words: int = _f(32, "words after a cut that a cloze item supervises")
    max_items_per_memory: int = _f(8, "cap on trained cloze items per memory (0: all); qa items are always kept")
    # routing
    route_margin: float = _f(1.25, "the adapter acts on prompts scoring this many times the highest generic"
                                   " prompt's score (0: always on)")
    route_similarity: float = _f(0.1, "a prompt this much more similar to a trained prompt than any generic one"
                                      " gets the adapter whatever its score (0: off)")
    route_band: tuple = _f((0.4, 0.6), "the decoder layers (fractions of depth) whose LoRA updates are scored")
    route_pool: str = _f("mean", "how a prompt's token scores make its score: mean or max")
    route_per_form: bool = _f(False, "raw text (no chat head) gets a threshold of its own")
    max_stack: int = _f(4, "adapters served side by side, one per round; beyond, a round continues the newest")

    def __post_init__(self) -> None:
        for name in ("cloze_cuts", "route_band", "target_modules"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        for f in fields(self):
            value, kind = getattr(self, f.name), {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type))
            ok = kind is None or isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) \
                or kind is float and isinstance(value, int) and not isinstance(value, bool)
            if not ok or str(f.type) == "tuple" and not isinstance(value, tuple):
                raise InputError(f"recipe field {f.name}={value!r} must be of type {f.type}")
        positive = ("rank", "alpha", "lr", "later_lr_scale", "batch_size", "temperature", "top_k", "locality_tokens",
                    "cloze_answer_words", "max_stack", "diverge_ratio")
        for name in positive:
            _check(name, getattr(self, name), getattr(self, name) > 0, "must be > 0")
        at_least_zero = ("epochs", "min_steps", "ce_weight", "locality_weight", "locality_per_batch",
                         "locality_prompts", "rewrites", "questions", "sentence_questions", "max_items_per_memory",
                         "route_margin", "diverge_retries")
        for name in at_least_zero:
            _check(name, getattr(self, name), getattr(self, name) >= 0, "must be >= 0")
        for name in ("replay_fraction", "open_book", "null_space_energy", "route_similarity"):
            _check(name, getattr(self, name), 0 <= getattr(self, name) <= 1, "must be in [0, 1]")
        _check("locality_prompts", self.locality_prompts, self.locality_prompts <= 60, "must be at most 60")
        _check("cloze_cuts", self.cloze_cuts, bool(self.cloze_cuts) and all(_fraction(c) and 0 < c < 1
                                                                              for c in self.cloze_cuts),
               "must be fractions strictly between 0 and 1")
        band = self.route_band
        _check("route_band", band, len(band) == 2 and all(_fraction(b) for b in band) and 0 <= band[0] < band[1] <= 1,
               "must be two fractions lo < hi in [0, 1]")
        _check("route_pool", self.route_pool, self.route_pool in POOLS, f"must be one of {', '.join(POOLS)}")
        _check("target_modules", self.target_modules,
               bool(self.target_modules) and all(isinstance(m, str) and m for m in self.target_modules),
               "must be module names")

    def as_dict(self) -> dict:
        """The fields as plain JSON/TOML values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict, where: str = "recipe") -> "Recipe":
        """A Recipe from field values (the rest default); an unknown field is an InputError naming the nearest."""
        if not isinstance(values, dict):
            raise InputError(f"{where}: expected a table of recipe fields")
        known = [f.name for f in fields(cls)]
        for name in values:
            if name not in known:
                near = difflib.get_close_matches(name, known, n=1)
                raise InputError(f"{where}: unknown recipe field {name!r}" + (f" (did you mean {near[0]!r}?)"
                                                                             if near else ""))
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Recipe":
        """A Recipe from a TOML file of fields (docs/consolidation.md has an example)."""
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise InputError(f"{path}: not valid TOML ({exc})") from None
        return cls.from_dict(values, str(path))


def _fraction(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(name: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise InputError(f"recipe field {name}={value!r} {rule}")
