"""Prompt-library files (TOML or YAML): [[template]] and [[exemplar]] tables, read and validated whole."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from memory_llm.errors import InputError
from memory_llm.store.prompts import Exemplar, Template

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TEMPLATE_KEYS = {"name", "description", "system", "user", "closed_system"}
EXEMPLAR_KEYS = {"question", "answer", "rating", "namespace"}
DEFAULTS = Path(__file__).resolve().parents[1] / "data" / "prompts"


def check_template(t: Template) -> Template:
    """Raise InputError naming the template and the problem; return it unchanged when it is usable."""
    if not isinstance(t.name, str) or not NAME_RE.match(t.name):
        raise InputError(f"invalid template name {t.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    for key in ("description", "system", "user"):
        value = getattr(t, key)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"template {t.name!r}: {key} must be a non-empty text")
    if t.closed_system is not None and not isinstance(t.closed_system, str):
        raise InputError(f"template {t.name!r}: closed_system must be a text")
    if "{question}" not in t.user:
        raise InputError(f"template {t.name!r}: the user template has no {{question}} slot")
    return t


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise InputError(f"{path}: unknown prompt file format {suffix or '(none)'!r}; use .toml, .yaml or .yml")


def read_library(path: Path, namespace: str) -> tuple[list[Template], list[Exemplar]]:
    """Templates and exemplars of a file; every entry is checked before anything is returned.
    Exemplars without a namespace get `namespace`."""
    fmt = _format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read it ({exc})") from None
    try:
        if fmt == "toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError: the message says where
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not valid {fmt.upper()} ({first})") from None
    if not isinstance(data, dict) or set(data) - {"template", "exemplar"}:
        extra = sorted(set(data) - {"template", "exemplar"}) if isinstance(data, dict) else None
        raise InputError(f"{path}: expected only 'template' and 'exemplar' lists" + (f", not {extra[0]!r}" if extra
                                                                                     else ""))
    templates = [_template(path, i, e) for i, e in enumerate(_entries(path, data, "template"), 1)]
    exemplars = [_exemplar(path, i, e, namespace) for i, e in enumerate(_entries(path, data, "exemplar"), 1)]
    names = [t.name for t in templates]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: template {next(n for n in names if names.count(n) > 1)!r} is defined twice")
    if not templates and not exemplars:
        raise InputError(f"{path}: no [[template]] or [[exemplar]] entries")
    return templates, exemplars


def _entries(path: Path, data: dict, key: str) -> list[dict]:
    entries = data.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"{path}: '{key}' must be a list of tables")
    return entries


def _template(path: Path, i: int, e: dict) -> Template:
    where = f"{path}: template #{i}"
    unknown = sorted(set(e) - TEMPLATE_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TEMPLATE_KEYS))})")
    missing = [k for k in ("name", "description", "system", "user") if k not in e]
    if missing:
        raise InputError(f"{where}: missing {missing[0]!r}")
    try:
        return check_template(Template(e["name"], e["description"], e["system"], e["user"], e.get("closed_system")))
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None


def _exemplar(path: Path, i: int, e: dict, namespace: str) -> Exemplar:
    where = f"{path}: exemplar #{i}"
    unknown = sorted(set(e) - EXEMPLAR_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(EXEMPLAR_KEYS))})")
    for key in ("question", "answer"):
        if not isinstance(e.get(key), str) or not e[key].strip():
            raise InputError(f"{where}: {key!r} must be a non-empty text")
    rating = e.get("rating", 1)
    if not isinstance(rating, int) or isinstance(rating, bool):
        raise InputError(f"{where}: rating must be an integer, not {rating!r}")
    ns = e.get("namespace", namespace)
    if not isinstance(ns, str):
        raise InputError(f"{where}: invalid namespace {ns!r}")
    from memory_llm.config import check_namespace

    try:
        check_namespace(ns)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return Exemplar(None, ns, e["question"].strip(), e["answer"].strip(), rating, "import")


def write_library(path: Path, templates: list[Template], exemplars: list[Exemplar]) -> None:
    """Write a file `read_library` reads back (format from the suffix), atomically."""
    fmt = _format(path)
    data: dict = {}
    if templates:
        data["template"] = [t.as_dict() for t in templates]
    if exemplars:
        data["exemplar"] = [{"question": e.question, "answer": e.answer, "rating": e.rating,
                             "namespace": e.namespace} for e in exemplars]
    if fmt == "toml":
        import tomli_w

        text = tomli_w.dumps(data, multiline_strings=True)
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write it ({exc.strerror})") from None


def default_templates() -> list[Template]:
    """The templates shipped in memory_llm/data/prompts/*.toml."""
    out: list[Template] = []
    for path in sorted(DEFAULTS.glob("*.toml")):
        out += read_library(path, "default")[0]
    return out
