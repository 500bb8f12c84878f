"""Stage 1: sequential decoding with a stock tokenizer whose NPR tags are plain multi-token text."""
import pytest
from transformers import PreTrainedTokenizerFast

from engine.llm import LLM
from engine.sampler import SamplingParams
from npr_async.config import EngineConfig
from npr_async.models import init_model
from npr_async.tokenizer import BUNDLED_TOKENIZER


def stock_tokenizer(tmp_path):
    """The bundled tokenizer with the 8 tags removed from its vocabulary: they tokenise as plain text."""
    import json

    tj = json.loads((BUNDLED_TOKENIZER / "tokenizer.json").read_text())
    tags = {t["content"] for t in tj["added_tokens"] if t["content"].startswith("<") and "|" not in t["content"]}
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] not in tags]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    return PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token="<|im_end|>")


def test_sequential_decoding_with_multi_token_tags(tmp_path):
    model_dir = init_model("tiny", str(tmp_path / "m"))
    tok = stock_tokenizer(tmp_path)
    assert len(tok.encode("</guideline>", add_special_tokens=False)) > 1
    llm = LLM(model_dir, tokenizer=tok, config=EngineConfig(parallel=False))
    prompt = "<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n</guideline>"  # would fork in parallel mode
    (traj,) = llm.generate([prompt], SamplingParams(temperature=1.0, seed=0, max_total_tokens=24,
                                                    max_path_tokens=24, parallel=False))
    assert traj.num_forks == 0 and len(traj.segments) == 1 and traj.finish_reason in ("stop", "length")
    assert (traj.pos() == list(range(len(traj)))).all()


def test_parallel_decoding_needs_single_token_tags(tmp_path):
    model_dir = init_model("tiny", str(tmp_path / "m"))
    with pytest.raises(ValueError, match="add_npr_tokens"):
        LLM(model_dir, tokenizer=stock_tokenizer(tmp_path), config=EngineConfig(parallel=True))
