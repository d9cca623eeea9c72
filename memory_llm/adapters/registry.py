"""Adapter versions on disk: adapters/vNNNN/ (peft save_pretrained + manifest.json) and adapters/current.

A version directory is written under a temporary name and renamed into place when complete; `current` is a
small file replaced atomically. A directory without a readable manifest and weights is never promoted or
loaded; rollback names an earlier intact version.

A tenant (a namespace consolidated on its own: `mllm consolidate --namespace NS`) has a registry of the same shape
at adapters/tenants/<slug>/, with a `namespace` file naming it; only that namespace's requests are served from it,
and its versions are labelled <slug>/vNNNN wherever names from several registries meet (ledger, answer log).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from memory_llm.adapters.keys import check_keys
from memory_llm.adapters.routing import read_router
from memory_llm.errors import InputError, ModelError, StoreError

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_VERSION = re.compile(r"^v(\d{4,})$")
_PLAIN = re.compile(r"^[A-Za-z0-9_]{1,48}$")
TENANTS = "tenants"  # adapters/tenants/<slug>/: one registry per tenant namespace


def tenant_slug(namespace: str) -> str:
    """The directory (and engine) name of a namespace's adapters: the namespace itself when it is plain (letters,
    digits, underscores), else a readable part and a hash of it (any printable namespace is allowed)."""
    if _PLAIN.match(namespace) and not _VERSION.match(namespace):
        return namespace
    readable = re.sub(r"[^A-Za-z0-9_]+", "_", namespace).strip("_")[:32] or "ns"
    return f"{readable}_{hashlib.sha256(namespace.encode('utf-8')).hexdigest()[:10]}"


def tenants(home: Path) -> dict[str, str]:
    """The home's tenant namespaces (those consolidated on their own) → their slugs."""
    out, root = {}, Path(home) / "adapters" / TENANTS
    if root.is_dir():
        for p in sorted(root.iterdir()):
            try:
                out[(p / "namespace").read_text(encoding="utf-8")] = p.name
            except OSError:
                continue
    return out


@dataclass
class AdapterVersion:
    name: str
    path: Path
    manifest: dict
    below: list = field(default_factory=list)  # the earlier versions whose adapters serve beside this one's
    # (manifest "stack": one adapter per consolidation round, oldest first; see run.py)
    tenant: str | None = None  # the tenant's slug (adapters/tenants/<slug>/), None: the shared registry

    @property
    def label(self) -> str:
        """The version's name where several registries' names meet: vNNNN, or <slug>/vNNNN for a tenant's."""
        return f"{self.tenant}/{self.name}" if self.tenant else self.name

    @property
    def number(self) -> int:
        return int(self.name[1:])

    @property
    def own_memories(self) -> list[int]:
        """The memories this version's own adapter was trained on: a round beside earlier ones (stacked) learned its
        new memories; one that continued or rebuilt an adapter holds every memory it covers."""
        m = self.manifest
        if "own_memories" in m:
            return list(m["own_memories"])
        stacked = bool(m.get("parent")) and m.get("parent") in (m.get("stack") or [])
        return list(m.get("new_memories" if stacked else "memories", []))

    @property
    def own_exemplars(self) -> list[int]:
        """The exemplars this version's own adapter was trained on (as the manifest records them)."""
        return list(self.manifest.get("own_exemplars", self.manifest.get("exemplars", [])))

    @property
    def stack(self) -> list["AdapterVersion"]:
        """Every version whose adapter this version serves, oldest first, itself last."""
        return self.below + [self]


class AdapterRegistry:
    """The adapter versions of a home (namespace None: the shared ones), or of one tenant namespace."""

    def __init__(self, home: Path, namespace: str | None = None):
        self.home, self.namespace = Path(home), namespace
        self.tenant = None if namespace is None else tenant_slug(namespace)
        self.root = self.home / "adapters" / (TENANTS if namespace is not None else "") / (self.tenant or "")

    @property
    def is_tenant(self) -> bool:
        """Whether the namespace is a tenant: consolidated on its own at least once (even if rejected)."""
        return self.namespace is not None and (self.root / "namespace").exists()

    def label(self, name: str) -> str:
        """A version name as the ledger and the answer log record it (<slug>/vNNNN for a tenant's)."""
        return f"{self.tenant}/{name}" if self.tenant else name


    # ---- reading ------------------------------------------------------------------------------------
    def _scan(self) -> tuple[list[AdapterVersion], list[str]]:
        """(intact versions oldest first, one line per broken version directory)."""
        intact, broken = [], []
        if self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if _VERSION.match(p.name) and p.is_dir():
                    try:
                        intact.append(self._read(p))
                    except StoreError as exc:
                        broken.append(str(exc))
        return sorted(intact, key=lambda v: v.number), broken

    def versions(self) -> list[AdapterVersion]:
        """Every intact version, oldest first (broken directories are skipped; see `problems`)."""
        return self._scan()[0]

    def problems(self) -> list[str]:
        """One line per broken version directory (missing manifest or weights, unreadable manifest)."""
        return self._scan()[1]

    def _read(self, path: Path) -> AdapterVersion:
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"adapter {path.name} is broken: manifest unreadable ({type(exc).__name__})") from None
        if not isinstance(manifest, dict) or "base_model" not in manifest:
            raise StoreError(f"adapter {path.name} is broken: manifest lacks base_model")
        problem = _files_problem(path)
        if problem:
            raise StoreError(f"adapter {path.name} is broken: {problem}")
        return AdapterVersion(path.name, path, manifest, self._below(path, manifest.get("stack") or []), self.tenant)

    def _below(self, path: Path, names) -> list[AdapterVersion]:
        """The intact earlier versions a version stacks on; a missing or broken one breaks the version too."""
        below = []
        for name in names if isinstance(names, list) else [names]:
            match = _VERSION.match(str(name))
            if not match or int(match.group(1)) >= int(path.name[1:]) or not (path.parent / name).is_dir():
                raise StoreError(f"adapter {path.name} is broken: adapter {str(name)[:40]!r} beneath it is missing")
            try:
                below.append(self._read(path.parent / name))
            except StoreError:
                raise StoreError(f"adapter {path.name} is broken: adapter {name} beneath it is broken") from None
        return below

    def get(self, name: str) -> AdapterVersion:
        path = self.root / name
        if not _VERSION.match(name) or not path.is_dir():
            raise InputError(f"no adapter version {name!r} (see `mllm adapters list`)")
        return self._read(path)

    def current_name(self) -> str | None:
        try:
            name = (self.root / "current").read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return name or None

    def current(self) -> AdapterVersion | None:
        """The promoted version, or None. A broken current version is a StoreError (rollback fixes it)."""
        name = self.current_name()
        if name is None:
            return None
        path = self.root / name
        if not _VERSION.match(name) or not path.is_dir():  # a pointer outside adapters/ is never followed
            raise StoreError(f"current adapter {name[:40]!r} is missing; run `mllm adapters rollback`")
        try:
            return self._read(path)
        except StoreError as exc:
            raise StoreError(f"{exc}; run `mllm adapters rollback`") from None

    def check_base(self, version: AdapterVersion, base_model: str) -> None:
        if version.manifest.get("base_model") != base_model:
            raise ModelError(f"adapter {version.name} was made for base model {version.manifest.get('base_model')!r},"
                             f" not {base_model!r}; use --no-adapter or re-consolidate (mllm consolidate --full)")

    # ---- writing ------------------------------------------------------------------------------------
    def next_name(self) -> str:
        numbers = [int(m.group(1)) for p in (self.root.iterdir() if self.root.is_dir() else [])
                   if (m := _VERSION.match(p.name))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def staging(self) -> Path:
        """A fresh temporary directory inside adapters/ for a candidate (renamed into place on commit)."""
        self.create()
        return Path(tempfile.mkdtemp(prefix=".candidate-", dir=self.root))

    def create(self) -> None:
        """Make the registry's directory (a tenant's with its `namespace` file, which makes the namespace a tenant)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.namespace is not None and not (self.root / "namespace").exists():
            _write_atomic(self.root / "namespace", self.namespace)

    def commit(self, staged: Path, manifest: dict) -> AdapterVersion:
        """Write the manifest into a staged candidate and rename it to the next version (not yet current)."""
        manifest = {**manifest, "created_at": time.time()}
        _write_atomic(staged / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
        name = self.next_name()
        manifest["version"] = name
        _write_atomic(staged / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(staged, self.root / name)
        return self._read(self.root / name)

    def promote(self, name: str) -> None:
        self.get(name)  # must be intact
        _write_atomic(self.root / "current", name + "\n")

    def rollback(self, to: str | None = None, base_model: str | None = None) -> AdapterVersion | None:
        """Make an earlier intact version current (the newest intact one older than current, made for
        base_model if given), or none."""
        if to is not None:
            self.promote(to)
            return self.get(to)
        current = self.current_name()
        number = int(current[1:]) if current and _VERSION.match(current) else 10 ** 9
        older = [v for v in self.versions() if v.number < number
                 and base_model in (None, v.manifest.get("base_model"))]
        if not older:
            _write_atomic(self.root / "current", "")
            return None
        self.promote(older[-1].name)
        return older[-1]

    # ---- health ------------------------------------------------------------------------------------
    def check(self, base_model: str) -> dict:
        """Doctor's check: `current` names an intact version (manifest, config, whole weights) made for
        base_model. Broken versions that are not current are named but harmless (never loaded)."""
        versions, broken = self._scan()
        result = {"check": "adapters", "ok": True, "repairable": False}
        try:
            current = self.current()
        except StoreError as exc:
            return {**result, "ok": False, "repairable": True, "detail": str(exc).split("; run")[0]}
        if current is None:
            result["detail"] = f"no current adapter ({len(versions)} intact version(s)); the base model answers"
        elif current.manifest.get("base_model") != base_model:
            return {**result, "ok": False, "detail": f"current adapter {current.name} was made for base model"
                    f" {current.manifest.get('base_model')!r}, not {base_model!r} (use --no-adapter, or"
                    " mllm consolidate --full)"}
        else:
            result["detail"] = f"current adapter {current.name} is intact ({len(versions)} intact version(s))"
        if broken:
            result["detail"] += f"; {len(broken)} broken older version(s) ignored: " + "; ".join(broken)
        return result

    def repair(self, base_model: str) -> str:
        """Point a broken or dangling `current` at the newest intact earlier version for base_model, or none."""
        name = self.current_name()
        good = self.rollback(base_model=base_model)
        if good is None:
            return f"the current adapter {name!r} was broken and no intact earlier version exists: none is current"
        return f"rolled the current adapter back from broken {name!r} to {good.name}"

    def discard_staging(self) -> None:
        """Remove candidates left by a killed run."""
        if self.root.is_dir():
            for p in self.root.glob(".candidate-*"):
                shutil.rmtree(p, ignore_errors=True)


def _files_problem(path: Path) -> str | None:
    """Why a version's peft files are unusable (missing, unreadable, truncated), or None. Reads only the
    headers (no torch): a safetensors file is 8 bytes of header length, a JSON header with each tensor's
    byte range, then the data; a torch .bin is a zip archive."""
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "adapter_config.json missing or unreadable"
    if not isinstance(config, dict):
        return "adapter_config.json is not a JSON object"
    try:
        read_router(path)
        check_keys(path)
    except ValueError as exc:
        return str(exc)
    weights, legacy = path / WEIGHTS[0], path / WEIGHTS[1]
    if not weights.exists():
        if not legacy.exists():
            return "adapter weights missing"
        return None if zipfile.is_zipfile(legacy) else "adapter weights unreadable"
    try:
        with open(weights, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size)) if 0 < size < 100_000_000 else None
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "adapter weights unreadable"
    if weights.stat().st_size < 8 + size + end:
        return f"adapter weights truncated ({weights.stat().st_size} of {8 + size + end} bytes)"
    return None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
