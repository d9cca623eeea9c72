"""An adapter's routing keys (keys.npy): the sentence embeddings of its trained prompts, unit length, float16.
RouterStack chooses the adapter whose keys hold a prompt's nearest key (adapters.routing)."""

from __future__ import annotations

from pathlib import Path

KEYS_FILE = "keys.npy"


def save_keys(directory: Path, keys) -> None:
    """An adapter's keys (one row per trained prompt, unit length), float16."""
    import numpy as np

    np.save(Path(directory) / KEYS_FILE, unit(np.asarray(keys, dtype=np.float32)).astype(np.float16))


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

    path = Path(directory) / KEYS_FILE
    if not path.exists():
        return None
    try:
        keys = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{KEYS_FILE} unreadable ({type(exc).__name__})") from None
    if keys.ndim != 2 or not np.isfinite(keys).all():
        raise ValueError(f"{KEYS_FILE} is not a finite matrix")
    return keys.astype(np.float32)


def unit(x):
    """Rows of x scaled to unit length (float32)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
