"""Build the bundled NPR tokenizer (npr_async/assets/tokenizer) reproducibly.

    python scripts/build_tokenizer.py [--out DIR] [--vocab-size 512]

A byte-level BPE trained with HF `tokenizers` on text from the synthetic task (questions and solution
traces of every difficulty, fixed seed) plus a little generic text. Digits are single tokens so
arithmetic is learnable; the 8 NPR tags are atomic added tokens that decode to their text (they are
not "special", so `skip_special_tokens` keeps them); `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are
special. Same inputs, same bytes: `tests/test_tokenizer.py` rebuilds and compares with the shipped files.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from npr_async.tags import NPR_TAGS
from npr_async.task import LEVELS, make_problems, solution_trace

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL = [ENDOFTEXT, IM_START, IM_END]
# Qwen's chat format: the prompt ends with the assistant header, a reply ends with <|im_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "npr_async" / "assets" / "tokenizer"
SEED = 20240607
PROBLEMS_PER_LEVEL = 400

GENERIC = """\
You are a helpful assistant. Solve the problem step by step and put the final answer in a box.
The guideline lists the plans. Each plan is carried out in its own step, and the steps do not see
each other. The takeaway compares the steps, checks the results and decides the next action.
A plan is one short sentence; a step is the execution of that plan; the answer is a number.
Let us compute the value of each part first, then add the parts together to get the total.
What is the sum? What is the product? What is the difference? The result is correct.
First, we find the value of A. Second, we find the value of B. Then we combine them.
The question asks for an exact integer answer, so we check the arithmetic carefully.
If two steps agree, the answer is likely right; if they disagree, we try again.
In this problem there are several independent parts whose results combine at the end.
system user assistant guideline plan step takeaway boxed answer total value part
"""


def corpus() -> list[str]:
    """Training text: deterministic for SEED; the tags are cut out (they are added tokens, not BPE)."""
    texts = []
    for difficulty in LEVELS:
        for p in make_problems(PROBLEMS_PER_LEVEL, difficulty, seed=SEED):
            texts += [p.question, solution_trace(p)]
    texts += GENERIC.splitlines()
    tag_re = "|".join(re.escape(t) for t in NPR_TAGS)
    return [piece for t in texts for piece in re.split(tag_re, t) if piece]


def build(out_dir: str | os.PathLike = DEFAULT_OUT, vocab_size: int = 512) -> Path:
    """Train and save the tokenizer into `out_dir`. `vocab_size` is an upper bound on every token,
    tags included; the corpus is small, so BPE stops earlier (min_frequency 2): 417 tokens."""
    if vocab_size % 64 or vocab_size < 320:
        raise ValueError(f"vocab_size must be a multiple of 64 and >= 320, got {vocab_size}")
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),  # every digit its own token
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(NPR_TAGS), min_frequency=2, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    # Tags: atomic and never split, but not "special", so decode(skip_special_tokens=True) keeps them.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NPR_TAGS])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        model_max_length=40960, clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    _portable_config(out)
    return out


def _portable_config(out: Path) -> None:
    """Template and special tokens inline in tokenizer_config.json (+ special_tokens_map.json), and the
    generic class name, so transformers 4.x and 5.x both load the directory the same way."""
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    cfg.pop("backend", None)
    special = {"eos_token": IM_END, "pad_token": ENDOFTEXT}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--vocab-size", type=int, default=512)
    a = ap.parse_args()
    out = build(a.out, a.vocab_size)
    print(f"wrote {out}: {sorted(os.listdir(out))}")


if __name__ == "__main__":
    main()
