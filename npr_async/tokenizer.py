"""Tokenizers: the bundled NPR tokenizer, the chat prompt, and adding the NPR tags to any HF model.

The tags are added as atomic, non-"special" tokens: never split by BPE, yet `decode(...,
skip_special_tokens=True)` keeps them, because a response without its tags is not a response.
"""
from __future__ import annotations

import math
from pathlib import Path

from npr_async.tags import NPR_TAGS

BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer"
EMBED_MULTIPLE = 64  # NPR pads the embedding matrix to a multiple of 64


def load_tokenizer(path: str | None = None):
    """The tokenizer in HF directory `path`; None or "" gives the bundled one."""
    from transformers import AutoTokenizer

    if not path and not (BUNDLED_TOKENIZER / "tokenizer.json").is_file():
        raise FileNotFoundError(f"bundled tokenizer missing in {BUNDLED_TOKENIZER}: run scripts/build_tokenizer.py")
    path = str(path) if path else str(BUNDLED_TOKENIZER)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; it is always masked out
    return tok


def format_prompt(tokenizer, question: str) -> str:
    """`question` as one user turn in the tokenizer's chat template, ready for the assistant's reply."""
    if not isinstance(question, str):
        raise TypeError(f"question must be a str, got {type(question).__name__}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def tag_word(tag: str) -> str:
    """"</guideline>" -> "guideline": the word whose sub-token embeddings seed the tag's row."""
    return tag.strip("</>")


def _single_token_id(tokenizer, tag: str) -> int | None:
    ids = tokenizer.encode(tag, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def add_npr_tokens(tokenizer, model):
    """Add the 8 NPR tags to `tokenizer` and `model` (any HF causal LM); returns (tokenizer, model).

    Tags become single tokens; the embedding matrix grows to a multiple of 64 (never shrinks: Qwen
    checkpoints already carry spare rows); each new tag row, in the input embeddings and in an untied
    lm_head, is the mean of the rows of the tag word's sub-tokens. Idempotent: a second call changes
    nothing. Both objects are modified in place.
    """
    import torch
    from tokenizers import AddedToken

    emb = model.get_input_embeddings()
    if emb is None or not hasattr(emb, "weight"):
        raise TypeError(f"{type(model).__name__} has no input embedding matrix")
    old_rows = emb.weight.shape[0]
    missing = [t for t in NPR_TAGS if _single_token_id(tokenizer, t) is None]
    # sub-tokens of each tag word, read before the tags exist (adding them does not change these)
    words = {t: tokenizer.encode(tag_word(t), add_special_tokens=False) for t in NPR_TAGS}
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    ids = {}
    for t in NPR_TAGS:
        i = _single_token_id(tokenizer, t)
        if i is None:
            raise RuntimeError(f"tag {t} is still not a single token after adding it to {type(tokenizer).__name__}")
        ids[t] = i
    rows = max(old_rows, math.ceil(len(tokenizer) / EMBED_MULTIPLE) * EMBED_MULTIPLE)
    if rows != old_rows:
        model.resize_token_embeddings(rows, mean_resizing=False)
    # rows to seed: tags new to the tokenizer, or tags whose id lies beyond the model's old matrix
    seed = [t for t in NPR_TAGS if t in missing or ids[t] >= old_rows]
    if not seed:
        return tokenizer, model
    inp = model.get_input_embeddings().weight
    out_layer = model.get_output_embeddings()
    out = out_layer.weight if out_layer is not None and out_layer.weight is not inp else None
    with torch.no_grad():
        for t in seed:
            sub = [i for i in words[t] if i < old_rows]
            if not sub:
                raise ValueError(f"tag word {tag_word(t)!r} has no sub-token inside the old embedding matrix")
            for w in (inp, out) if out is not None else (inp,):
                w[ids[t]] = w[sub].float().mean(0).to(w.dtype)
    return tokenizer, model
