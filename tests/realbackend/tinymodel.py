"""A tiny random-weight llama model in GGUF, written in milliseconds, for tests of real servers.

Model weights cannot be downloaded here, and the real-backend tests need none: they check how
the agent drives llama-server (start-up, readiness, metrics, errors, streaming), not what the
model says. The model is a real llama architecture (2 layers, hidden 64) with a SentencePiece
vocabulary that has the 256 byte-fallback tokens, so any text tokenizes, and a ChatML chat
template, so `/v1/chat/completions` works. Its output is random tokens.

``context_length`` is what the model *declares* as its training context: llama-server sizes its
KV cache from it unless told otherwise, so tests declare a large one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = ["▁hello", "▁world", "▁the", "▁a", "▁gpu", "▁fleet", "▁model", "▁is", "▁ready", "."]


def write_tiny_llama(
    path: Path,
    *,
    context_length: int = 1_048_576,
    n_embd: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_ff: int = 128,
    seed: int = 0,
) -> Path:
    import gguf  # imported here: only the real-backend tests need the package

    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>".encode() for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += [w.encode() for w in ["▁", *_WORDS]]
    types += [gguf.TokenType.NORMAL] * (len(_WORDS) + 1)
    n_vocab = len(tokens)
    scores = [0.0] * 259 + [-float(i) for i in range(n_vocab - 259)]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("gpufleet-tiny-llama")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(n_embd // n_heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    # numpy shapes are ggml's ne reversed: (out_features, in_features).
    w.add_tensor("token_embd.weight", rand(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", rand(n_vocab, n_embd))
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + name + ".weight", rand(n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", rand(n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", rand(n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", rand(n_embd, n_ff))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
