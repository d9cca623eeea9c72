"""Turn the Fictional Knowledge dataset (Chang et al., 2024) into learnable documents and a cloze eval file.

Writes, under --out:
  docs/fk_NNN.txt   each record's `train_context` (NNN = the record's index in the dataset)
  eval.jsonl        one cloze probe per line (the eval format of docs/eval-format.md), 15 per record:
                    {"id": "fk000-mem-0", "kind": "cloze", "input": <prefix>, "answers": [[<target>]],
                     "tags": ["mem", "doc:fk_000"]}   (kinds of probe: mem, gen, hard_gen)
  eval_chat.jsonl   the same probes as questions in `ask`'s chat form (kind qa): "Complete this sentence: ..."

The data stays where it is (../shared/data/fictional_knowledge); nothing is copied into the repository.

    python scripts/prepare_fictional_knowledge.py --n 20 --out /tmp/fk
    mllm learn /tmp/fk/docs && mllm eval /tmp/fk/eval.jsonl --mode rag
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/fictional_knowledge/fictional_knowledge.json"
PROBE_KINDS = ("mem", "gen", "hard_gen")


def doc_name(index: int) -> str:
    """The document file name (without .txt) of record `index`."""
    return f"fk_{index:03d}"


def load_records(data: str | Path = DEFAULT_DATA) -> list[dict]:
    data = Path(data)
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no such file (pass --data)")
    records = json.loads(data.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{data}: expected a JSON list of records")
    return records


def probes_for(index: int, record: dict) -> list[dict]:
    """The cloze probes (mem, gen, hard_gen) of one record, in the eval format of docs/eval-format.md."""
    out = []
    for kind in PROBE_KINDS:
        inputs, targets = record[f"{kind}_input"], record[f"{kind}_target"]
        if len(inputs) != len(targets):
            raise ValueError(f"record {index}: {len(inputs)} {kind} inputs but {len(targets)} targets")
        for j, (prefix, target) in enumerate(zip(inputs, targets)):
            out.append({"id": f"fk{index:03d}-{kind}-{j}", "kind": "cloze", "input": prefix,
                        "answers": [[target]], "tags": [kind, f"doc:{doc_name(index)}"]})
    return out


CHAT_QUESTION = 'Complete this sentence: "{prefix} ..."'


def chat_probes(eval_path: str | Path) -> Path:
    """The probes of a cloze eval file as chat questions (kind qa, same answers and tags), written beside it as
    eval_chat.jsonl: the form `ask` serves, in which the router is calibrated."""
    eval_path = Path(eval_path)
    lines = []
    for line in eval_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            probe = json.loads(line)
            probe.update(kind="qa", input=CHAT_QUESTION.format(prefix=probe["input"]))
            lines.append(json.dumps(probe, ensure_ascii=False))
    out = eval_path.with_name("eval_chat.jsonl")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def prepare(n: int = 20, offset: int = 0, out: str | Path = "fk", data: str | Path = DEFAULT_DATA) -> dict:
    """Write records [offset, offset+n) as out/docs/fk_NNN.txt and their probes as out/eval.jsonl.

    Returns {"docs": docs dir, "eval": eval.jsonl path, "eval_chat": eval_chat.jsonl path, "doc_files": [paths],
    "records": [indices]}.
    """
    if n <= 0 or offset < 0:
        raise ValueError("n must be > 0 and offset >= 0")
    records = load_records(data)
    chosen = list(range(offset, min(offset + n, len(records))))
    if not chosen:
        raise ValueError(f"offset {offset} is past the {len(records)} records")
    out = Path(out)
    docs = out / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    for old in docs.glob("fk_*.txt"):  # a re-run with other records must not leave stale documents
        old.unlink()
    doc_files, lines = [], []
    for i in chosen:
        path = docs / f"{doc_name(i)}.txt"
        path.write_text(records[i]["train_context"].strip() + "\n", encoding="utf-8")
        doc_files.append(path)
        lines += [json.dumps(p, ensure_ascii=False) for p in probes_for(i, records[i])]
    eval_path = out / "eval.jsonl"
    eval_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"docs": docs, "eval": eval_path, "eval_chat": chat_probes(eval_path), "doc_files": doc_files,
            "records": chosen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="number of records to take (default 20)")
    ap.add_argument("--offset", type=int, default=0, help="index of the first record (default 0)")
    ap.add_argument("--out", required=True, help="output directory (e.g. /tmp/fk); docs/ and eval.jsonl go here")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help=f"the dataset JSON (default {DEFAULT_DATA})")
    args = ap.parse_args(argv)
    try:
        paths = prepare(args.n, args.offset, args.out, args.data)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(paths['doc_files'])} documents in {paths['docs']}")
    print(f"{sum(1 for _ in open(paths['eval'], encoding='utf-8'))} probes in {paths['eval']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
