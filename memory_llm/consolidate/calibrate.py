"""Calibrating a freshly trained adapter's router (training side; serving reads the result, adapters.routing):
the activation threshold from generic prompts in chat form (and as raw text), and the similarity bar from the
generic prompts' nearest keys."""

from __future__ import annotations

from typing import Sequence

from memory_llm.adapters.keys import unit
from memory_llm.adapters.routing import Router, common_prefix
from memory_llm.consolidate.examples import closed_prompt_ids, student_prompt_ids


def calibrate(negatives: Sequence[float], margin: float) -> float:
    """The threshold: `margin` times the highest score of the calibration's generic prompts."""
    return margin * max(negatives, default=0.0)


def similarity_bar(keys, generic, margin: float) -> float:
    """Router.similarity for an adapter: `margin` above the highest cosine similarity of generic prompts'
    embeddings (rows of `generic`) to its keys, at most 1."""
    return min(1.0, float((unit(generic) @ unit(keys).T).max()) + margin)


def fit_router(peft_model, generator, generic: Sequence[str], items, margin: float,
               band: Sequence[float] = (0.0, 1.0), pool: str = "mean", per_form: bool = False) -> Router:
    """A router for a freshly trained adapter, calibrated on generic prompts in chat form (negatives), and with
    `per_form` a raw-text threshold calibrated on them as raw text; it reports how many trained items' prompts
    (positives, each in the form it is trained in) it routes. Installed."""
    chats = [closed_prompt_ids(generator, p) for p in generic]
    raws = [generator.tokenizer(p, add_special_tokens=False)["input_ids"] for p in generic] if per_form else []
    router = Router(peft_model, band=band, head=common_prefix(chats), pool=pool)
    negatives, raw_negatives = router.scores(chats), router.scores(raws)
    router.threshold = calibrate(negatives, margin)
    router.raw_threshold = calibrate(raw_negatives, margin) if per_form else None
    prompts = [student_prompt_ids(generator, it) for it in items]
    routed = [score >= router.threshold_for(router.own_tokens(ids, None)[1])
              for ids, score in zip(prompts, router.scores(prompts))]
    router.details = {"margin": margin, "generic_max": max(negatives, default=0.0),
                      "raw_generic_max": max(raw_negatives, default=None),
                      "trained_routed": sum(routed) / max(1, len(routed))}
    return router.install()
