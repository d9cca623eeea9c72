"""Activation routing of the adapter, after WISE (Wang et al. 2024): the adapter acts on a prompt only when the
prompt excites it.

The score of a prompt is read from the adapter itself: at each token, the energy the LoRA updates of a band of
layers (the middle ones by default, Recipe.route_band) add to their layers' outputs, relative to the energy of
those outputs; the prompt's score is the mean (or, for routers made before mean pooling, the largest) over its
own tokens (the chat template's shared head skipped). labs/probe_routing.py compares
this with other signals (docs/lab-notes.md). With the null-space projection (recipe.null_space_constraint)
the update is near zero on generic inputs, so generic prompts score low and prompts about consolidated memories
score high. A threshold, calibrated when the adapter is trained and stored beside it (router.json), decides per
prompt (per row of a batch) whether the adapter is on for the whole generation; below it, the prompt gets the
base model exactly. Chat prompts (`ask`'s form) and raw text score on different scales, so each form has its own
threshold, calibrated on the same generic prompts in that form. A lone adapter's router consults nothing outside
the model: no index, no embedder.

Stacked adapters (one per round) are routed together by adapters.stack.RouterStack.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from memory_llm.generate import continues_sequence, left_pad


ROUTER_FILE = "router.json"
POOLS = ("mean", "max")  # how a prompt's per-token scores make its score


class LastRouted:
    """What a router of several adapters tells about the last single prompt it routed, from its `last_on` and
    `last_adapter` (one entry per row of the last batch)."""

    last_on: Sequence[bool]
    last_adapter: Sequence[str | None]

    @property
    def active(self) -> bool | None:
        """Whether an adapter acted on the last single prompt routed (None before any)."""
        return None if len(self.last_on) != 1 else self.last_on[0]

    @property
    def acted(self) -> str | None:
        """The adapter that acted on the last single prompt routed (None: none, or before any)."""
        return None if len(self.last_adapter) != 1 else self.last_adapter[0]


class Router:
    """Scores prompts by the adapter's own activation and, once a threshold is set and `install`ed, gates the
    adapter per batch row at every forward that starts a sequence (a prefill)."""

    def __init__(self, peft_model, threshold: float | None = None, band: Sequence[float] = (0.0, 1.0),
                 head: Sequence[int] = (), pool: str = "mean", raw_threshold: float | None = None,
                 name: str | None = None, similarity: float | None = None):
        from peft.tuners.lora import LoraLayer

        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, not {pool!r}")
        self.model, self.threshold, self.band, self.head = peft_model, threshold, tuple(band), list(head)
        self.pool = pool
        self.raw_threshold = raw_threshold  # for prompts without the chat head (None: `threshold` for all)
        self.similarity = similarity  # a prompt this similar to one of the adapter's keys (its trained prompts)
        # gets it whatever its score; in a RouterStack with keys only (None: routing by score alone)
        name = name or peft_model.active_adapter  # the adapter this router scores and gates
        self.layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and name in m.lora_B]
        depth = {m: _layer_index(n) for n, m in peft_model.named_modules() if m in set(self.layers)}
        n = max((d for d in depth.values() if d is not None), default=0) + 1
        lo, hi = round(band[0] * n), max(round(band[0] * n) + 1, round(band[1] * n))
        self.scored = [m for m in self.layers if depth.get(m) is None or lo <= depth[m] < hi]
        self._name = name
        self.gate = None  # per-row 0/1 tensor for the running sequence; None: the adapter is on everywhere
        self._sums: list | None = None  # [delta energy, output energy] per token while scoring
        self.busy = False  # True while the router scores (its own forward passes are not routed)
        self._hooks: list = []
        self.last: list[float] = []  # the scores of the last routed prefill (for provenance)
        self.last_chat: list[bool] = []  # whether each row of the last scored batch was in chat form
        self.last_on: list[bool] = []  # whether the adapter acted on each row of the last routed prefill
        self.veto: list[int] = []  # a prompt holding this token sequence gets the base model, whatever its score
        # (the assistant sets the retrieved-sources marker when Settings.adapter_with_sources is off)
        self.after: list[int] = []  # a prompt holding this token sequence is scored on the tokens after its last
        # occurrence (the assistant sets the sources marker: a prompt with sources is routed on its question)
        self.details: dict = {}  # how the threshold was calibrated (saved with it)
        self.stale = False  # the adapter holds a memory no longer true and has no keys to tell which: it acts on
        # no prompt (a lone adapter routed by activation; stacked ones are kept off by content, RouterStack)
        self.holds: list[int] = []  # the memories (an exemplar: its negative id) the adapter was trained on

    # ---- scoring ------------------------------------------------------------------------------------------
    def _add(self, which: int, out, scale: float = 1.0) -> None:
        self._sums[which] = self._sums[which] + (out.float() * scale).pow(2).sum(-1)

    def score_rows(self, input_ids, attention_mask=None) -> list[float]:
        """The routing score of each row of a padded batch (the mask marks real tokens), the adapter acting."""
        import torch

        hooks = []
        for m in self.scored:
            scale = m.scaling[self._name]
            hooks += [m.lora_B[self._name].register_forward_hook(lambda mod, a, out, s=scale: self._add(0, out, s)),
                      m.base_layer.register_forward_hook(lambda mod, a, out: self._add(1, out))]
        self._sums, gate, self.busy = [0.0, 0.0], self.gate, True
        self.gate = None
        try:
            with torch.no_grad():
                self.model.get_base_model()(input_ids=input_ids, attention_mask=attention_mask)
            ratio = self._sums[0] / (self._sums[1] + 1e-12)
            if not torch.is_tensor(ratio):  # no LoRA layer ran (adapter disabled)
                return [0.0] * input_ids.shape[0]
            out, self.last_chat = [], []
            masks = attention_mask if attention_mask is not None else [None] * len(ratio)
            for r, row, mask in zip(ratio, input_ids.tolist(), masks):
                own, chat = self.own_tokens(row, mask)
                values = r[own]
                out.append(0.0 if not values.numel() else float(values.mean() if self.pool == "mean" else values.max()))
                self.last_chat.append(chat)
            return out
        finally:
            self._sums, self.gate, self.busy = None, gate, False
            for h in hooks:
                h.remove()

    def own_tokens(self, row: list[int], mask) -> tuple[slice, bool]:
        """The prompt's own tokens (its unpadded span, padded on either side, after the chat template's shared
        head, and after the last `after` sequence when it holds one), and whether the prompt is in chat form
        (starts with that head)."""
        start, end = 0, len(row)
        if mask is not None:
            real = [i for i, on in enumerate(mask.tolist()) if on]
            start, end = (real[0], real[-1] + 1) if real else (0, 0)
        h = len(self.head)
        chat = bool(h) and row[start:start + h] == self.head and end > start + h
        start = start + h if chat else start
        if self.after:
            start = max((i + len(self.after) for i in occurrences(row[start:end], self.after)), default=0) + start
        return slice(start, end), chat

    def threshold_for(self, chat: bool) -> float:
        """The threshold a prompt of this form must reach."""
        return self.threshold if chat or self.raw_threshold is None else self.raw_threshold

    def scores(self, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
        """The routing score of each prompt (token ids), left-padded in batches."""
        device = next(self.model.parameters()).device
        out: list[float] = []
        seqs = [list(s) for s in sequences]
        for i in range(0, len(seqs), batch_size):
            ids, mask = left_pad(seqs[i:i + batch_size])
            out += self.score_rows(ids.to(device), mask.to(device))
        return out

    # ---- gating -------------------------------------------------------------------------------------------
    def install(self, route: bool = True) -> "Router":
        """Gate the adapter from now on (a threshold is required). Without `route` only the gate is installed:
        a RouterStack decides it."""
        if self.threshold is None:
            raise ValueError("a router needs a threshold before it gates")
        if self._hooks:
            return self
        if route:
            self._hooks = [self.model.get_base_model().register_forward_pre_hook(self._route, with_kwargs=True)]
        self._hooks += [m.lora_B[self._name].register_forward_hook(self._apply_gate) for m in self.layers]
        return self

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self.gate = [], None

    def _apply_gate(self, mod, args, out):
        gate = self.gate
        if gate is None or gate.shape[0] != out.shape[0]:
            return out
        return out * gate.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))

    @property
    def disabled(self) -> bool:
        """Whether the adapters are switched off (peft's disable_adapter)."""
        return bool(self.layers) and self.layers[0].disable_adapters

    def _route(self, mod, args, kwargs):
        if self.busy or continues_sequence(args, kwargs):  # a decoding step keeps the prefill's decision
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.gate = None if input_ids is None or self.disabled else \
            self.gate_of(self.decide(input_ids, kwargs.get("attention_mask")), input_ids.device)
        return None

    def decide(self, input_ids, attention_mask=None) -> list[bool]:
        """Score a batch's rows and decide which rows the adapter acts on (also kept in last, last_on)."""
        self.last = self.score_rows(input_ids, attention_mask)
        rows = input_ids.tolist() if self.veto else [[]] * len(self.last)
        self.last_on = [s >= self.threshold_for(chat) and not contains(row, self.veto) and not self.stale
                        for s, chat, row in zip(self.last, self.last_chat, rows)]
        return self.last_on

    @staticmethod
    def gate_of(on: Sequence[bool], device):
        """The per-row gate tensor for `on` (1: the adapter acts on that row)."""
        import torch

        return torch.as_tensor([float(x) for x in on], device=device)

    def update_stale(self, stale_of, bar: float = 1.0) -> None:
        """A lone adapter routed by activation acts on nothing once a memory it holds is no longer true (`stale_of`:
        memory ids → those superseded, forgotten or retired); it has no keys to tell which questions are about it."""
        self.stale = bool(self.holds) and bool(stale_of(set(self.holds)))

    def blocks(self, vector) -> bool:
        """Whether a question is kept from the adapter by a memory no longer true (all of them, while stale)."""
        return self.stale

    # ---- persistence --------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        (Path(directory) / ROUTER_FILE).write_text(
            json.dumps({"threshold": self.threshold, "raw_threshold": self.raw_threshold, "band": list(self.band),
                        "head": self.head, "pool": self.pool, "similarity": self.similarity, **self.details},
                       indent=2), encoding="utf-8")

    @property
    def active(self) -> bool | None:
        """Whether the adapter acted on the last single prompt routed (None before any)."""
        return None if len(self.last_on) != 1 else self.last_on[0]

    @property
    def name(self) -> str:
        """The peft adapter name this router gates."""
        return self._name


def read_router(directory: Path) -> dict | None:
    """The stored router settings of an adapter directory (Router's keyword arguments), or None when it has none
    (an adapter without a router is always on). A router.json from before pooling and per-form thresholds
    reads as it was made: max pooling, one threshold. An unreadable router.json is a ValueError."""
    path = Path(directory) / ROUTER_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        raw = data.get("raw_threshold")
        similarity = data.get("similarity")
        out = {"threshold": float(data["threshold"]), "band": [float(b) for b in data.get("band", (0.0, 1.0))],
               "head": [int(t) for t in data.get("head", [])], "pool": str(data.get("pool", "max")),
               "raw_threshold": None if raw is None else float(raw),
               "similarity": None if similarity is None else float(similarity)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{ROUTER_FILE} unreadable ({type(exc).__name__})") from None
    thresholds = [out["threshold"]] + ([] if out["raw_threshold"] is None else [out["raw_threshold"]])
    if not all(math.isfinite(t) for t in thresholds) or len(out["band"]) != 2 or out["pool"] not in POOLS \
            or not (out["similarity"] is None or -1.0 <= out["similarity"] <= 1.0):
        raise ValueError(f"{ROUTER_FILE} has a bad threshold, band, pool or similarity")
    return out


def load_router(peft_model, directory: Path, name: str | None = None) -> Router | None:
    """The stored router of an adapter directory (for peft_model's adapter `name`, default the active one),
    installed; None when it has none. An unreadable router.json is a StoreError."""
    from memory_llm.errors import StoreError

    try:
        settings = read_router(directory)
    except ValueError as exc:
        raise StoreError(f"adapter {Path(directory).name} is broken: {exc}") from None
    return None if settings is None else Router(peft_model, name=name, **settings).install()


def row_gates(router, n: int) -> list[tuple[float, ...]]:
    """Each of the last prefill's n rows' gates under `router` (a Router, a RouterStack or None): one value per
    gated adapter, 1.0 where no gate is set. A continuous batch keeps them per row and restores them with
    set_row_gates whenever rows join or leave (a decoding step keeps the gates it finds)."""
    gated = _gated(router)
    return [tuple(1.0 if r.gate is None or r.gate.shape[0] != n else float(r.gate[i]) for r in gated)
            for i in range(n)]


def set_row_gates(router, rows: Sequence[tuple[float, ...]], device) -> None:
    """Gate `router`'s adapters for a batch whose rows have these gates (row_gates' values, in row order)."""
    for k, r in enumerate(_gated(router)):
        r.gate = Router.gate_of([g[k] if len(g) > k else 1.0 for g in rows], device)


def _gated(router) -> list[Router]:
    return [] if router is None else list(getattr(router, "routers", [router]))


def contains(row: Sequence[int], part: Sequence[int]) -> bool:
    """Whether the token sequence `part` (non-empty) occurs in row."""
    return next(occurrences(row, part), None) is not None


def occurrences(row: Sequence[int], part: Sequence[int]):
    """Where the token sequence `part` (non-empty; empty: nowhere) starts in row, in order."""
    n, part = len(part), list(part)
    return (i for i in range(len(row) - n + 1) if n and row[i] == part[0] and list(row[i:i + n]) == part)


def _layer_index(name: str) -> int | None:
    """The decoder layer a module belongs to (".layers.N." in its name), or None."""
    part = name.split(".layers.", 1)
    if len(part) < 2:
        return None
    digits = part[1].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest head all sequences share (the chat template's system turn and user marker)."""
    if not seqs:
        return []
    first, n = list(seqs[0]), min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != first[i] for x in seqs):
            return first[:i]
    return first[:n]
