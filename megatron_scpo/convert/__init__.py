"""HF <-> Megatron checkpoint conversion and the streaming HF-named export used for weight sync.

- ``mapping``: names and layouts on full tensors (GQA QKV fusion, gated fc1, vocab padding, tied embeddings).
- ``live``: a live TP/PP-sharded model: ``load_hf_into_model``, ``iter_hf_tensors``.
- ``hf_io``: HF directories (config, safetensors, tokenizer files) and atomic output directories.
- ``checkpoint``: ``hf_to_mcore`` / ``mcore_to_hf`` on disk (megatron dist-checkpointing, any TP/PP).
- ``cli``: ``scpo convert hf-to-mcore | mcore-to-hf``.

Submodules are imported explicitly (nothing here) so ``import megatron_scpo.convert`` stays cheap. See
docs/conversion.md.
"""
