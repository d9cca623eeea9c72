"""An adapter's routing keys (keys.npy): the sentence embeddings of its trained prompts, unit length, float16.
RouterStack chooses the adapter whose keys hold a prompt's nearest key (adapters.routing)."""

from __future__ import annotations

from pathlib import Path

KEYS_FILE = "keys.npy"
OWNERS_FILE = "key_memories.npy"  # the memory each key was trained from (a negative id: an exemplar's), int64


def save_keys(directory: Path, keys, owners=None) -> None:
    """An adapter's keys (one row per trained prompt, unit length), float16, and the memory each came from (the
    memory id; an exemplar's negative id), so that a key whose memory is superseded or forgotten can be told."""
    import numpy as np

    np.save(Path(directory) / KEYS_FILE, unit(np.asarray(keys, dtype=np.float32)).astype(np.float16))
    if owners is not None:
        owners = np.asarray(owners, dtype=np.int64)
        if owners.shape != (len(keys),):
            raise ValueError("one owner per key")
        np.save(Path(directory) / OWNERS_FILE, owners)


def read_owners(directory: Path):
    """The memory each of an adapter's keys came from (int64, one per key), or None when it was not recorded (an
    adapter made before supersession). Unreadable: a ValueError."""
    import numpy as np

    owners = _load(Path(directory) / OWNERS_FILE)
    if owners is not None and (owners.ndim != 1 or owners.dtype.kind != "i"):
        raise ValueError(f"{OWNERS_FILE} is not a list of ids")
    return None if owners is None else owners.astype(np.int64)


def check_keys(directory: Path) -> None:
    """A ValueError when the directory's keys.npy (if any) is not a readable 2-D array (memory-mapped: only its
    header is read; read_keys loads and checks the values when the adapter is attached)."""
    import numpy as np

    path = Path(directory) / KEYS_FILE
    if not path.exists():
        return
    try:
        keys = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{KEYS_FILE} unreadable ({type(exc).__name__})") from None
    if keys.ndim != 2:
        raise ValueError(f"{KEYS_FILE} is not a matrix")


def read_keys(directory: Path):
    """An adapter directory's keys (float32, n × dim), or None when it has none. Unreadable: a ValueError."""
    import numpy as np

    keys = _load(Path(directory) / KEYS_FILE)
    if keys is not None and (keys.ndim != 2 or not np.isfinite(keys).all()):
        raise ValueError(f"{KEYS_FILE} is not a finite matrix")
    return None if keys is None else keys.astype(np.float32)


def _load(path: Path):
    """A saved array, or None when the file is absent; an unreadable one is a ValueError naming it."""
    import numpy as np

    if not path.exists():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path.name} unreadable ({type(exc).__name__})") from None


def unit(x):
    """Rows of x scaled to unit length (float32)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def stale_masks(owners_per_adapter, stale: set[int], whole: list[bool]) -> list:
    """For each adapter, which of its keys came from a memory no longer true (`stale`: superseded, in part or as a
    whole, or forgotten; an exemplar's negative id: retired): a bool array over its keys, None when none did. An
    adapter whose keys' owners were not recorded is marked stale as a whole when `whole` says it holds a stale
    memory (all True: it acts on no prompt)."""
    import numpy as np

    out = []
    for owners, all_stale in zip(owners_per_adapter, whole):
        if owners is None:
            out.append(np.ones(1, dtype=bool) if all_stale else None)
            continue
        mask = np.isin(owners, np.fromiter(stale, dtype=np.int64, count=len(stale))) if stale else None
        out.append(mask if mask is not None and mask.any() else None)
    return out


def blocked(queries, keys, masks, bar: float):
    """Which adapter each query must not get (rows × adapters, bool): an adapter holding a stale key at least
    `bar` similar to the query, or whose stale key is the query's nearest of all the adapters' keys (a question
    about a superseded or forgotten memory: the adapter would answer its old value). A mask of one True, or an
    adapter without keys and a mask, blocks every query."""
    import numpy as np

    q = np.asarray(queries, dtype=np.float32)
    out = np.zeros((len(q), len(masks)), dtype=bool)
    sims = [q @ k.T if k is not None and len(k) else None for k in (keys if keys is not None else [None] * len(masks))]
    nearest = np.max([s.max(axis=1) for s in sims if s is not None], axis=0) if any(
        s is not None for s in sims) else None
    for a, mask in enumerate(masks):
        if mask is None:
            continue
        if sims[a] is None or len(mask) != sims[a].shape[1]:
            out[:, a] = True
            continue
        own = sims[a]
        out[:, a] = (mask[own.argmax(axis=1)] & (own.max(axis=1) >= nearest)) | (own[:, mask].max(axis=1) >= bar)
    return out
