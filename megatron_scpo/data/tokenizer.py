"""A small byte-level BPE tokenizer for the synthetic task, built locally (no hub) and cached on disk.

Why byte-level BPE trained on the task's own texts: any string still encodes (a model output, a file
prompt), while digits stay single tokens, the template words and ``\\n\\n`` become whole tokens, and the
vocabulary stays ~400 so the tiny model is fast.

transformers v5 pitfall (research/infra.md C): ``AutoTokenizer`` may pick a model-specific class from
``config.json`` and swap the pre-tokenizer. We (a) pre-tokenize with Qwen2's regex + ``ByteLevel(use_regex=
False)``, which is what such a swap installs, and (b) save ``tokenizer_class: TokenizersBackend``; tests
check that a reload next to a Llama config gives identical ids.

BOS: the tokenizer adds ``<|bos|>`` itself (``add_bos_token=True``, a post-processor in tokenizer.json), like a
Llama tokenizer. Raw prompts are encoded with the tokenizer's own special tokens (data/templates.py), so the
tiny model's prompts start with exactly one BOS; responses are always encoded with ``add_special_tokens=False``.
Directories written before v2 (``add_bos_token=False``, the BOS was added by the caller) are upgraded on load.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megatron_scpo.data import synthetic, templates

TOKENIZER_VERSION = "arith-bpe-v2"  # v2: adds BOS itself. Bump when the corpus or settings change: cached dirs are keyed by it
VOCAB_SIZE = 460
BOS, EOS, PAD = "<|bos|>", "<|im_end|>", "<|endoftext|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, EOS]
# Task markers: whole tokens, not special (they must survive decode(skip_special_tokens=True)).
TASK_TOKENS = [synthetic.THINK_OPEN, synthetic.THINK_CLOSE, "\\boxed{"]
QWEN_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>' }}{% endif %}"
)


def _corpus(n_examples: int = 400) -> list[str]:
    """Training texts: prompts + verbose traces of the task, prompt templates weighted so their words merge."""
    texts = []
    for ex in synthetic.generate_examples(n_examples, "train", seed=12345):
        texts.append(templates.render_prompt(ex.problem.expression, "synthetic") + ex.verbose.text)
    texts += [templates.RAW_THINK.format(problem="1 + 2") + templates.LENGTH_BUDGET.format(n=120)] * 10
    texts += [templates.INSTRUCTION, "user assistant"] * 10
    return texts


def _train() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PAT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TASK_TOKENS])
    return tok


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, add_bos_token=True, add_eos_token=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def default_cache_dir() -> Path:
    """``$SCPO_CACHE_DIR`` (or ~/.cache/megatron_scpo) / version-corpushash: a changed task never reuses a stale vocab."""
    root = os.environ.get("SCPO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_scpo")
    key = hashlib.sha1(repr((VOCAB_SIZE, SPECIAL_TOKENS, TASK_TOKENS, QWEN_PAT, _corpus())).encode()).hexdigest()[:10]
    return Path(root) / f"{TOKENIZER_VERSION}-{key}"


def build_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The task tokenizer, loaded from ``out_dir`` (default: a per-version cache dir) or built and saved there.

    Saving goes through a temp dir + rename, so concurrent builders (parallel tests) never see half a dir.
    """
    out = Path(out_dir) if out_dir is not None else default_cache_dir()
    if (out / "tokenizer.json").is_file():
        return load_tokenizer(out)
    hf = _wrap(_train())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=out.parent))
    hf.save_pretrained(tmp)
    try:
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "tokenizer.json").is_file():  # someone else's complete dir wins; anything else is an error
            hf.save_pretrained(out)
    return load_tokenizer(out)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a saved tokenizer exactly as written (no model-specific class substitution)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    hf = PreTrainedTokenizerFast.from_pretrained(str(path))
    adds_bos = hf("1", add_special_tokens=True)["input_ids"][:1] == [hf.bos_token_id]
    if hf.bos_token == BOS and not adds_bos:
        hf.add_bos_token = True  # a v1 task tokenizer dir: the caller used to add its BOS (same prompt ids)
    if not hf.chat_template and hf.bos_token == BOS:  # only our task tokenizer gets our template
        hf.chat_template = CHAT_TEMPLATE
    return hf


def fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """Short hash of the vocabulary: lets checkpoints and caches detect a changed tokenizer."""
    items = sorted(tok.get_vocab().items())
    return hashlib.sha1(repr(items).encode()).hexdigest()[:12]
