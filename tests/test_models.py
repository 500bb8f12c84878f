"""init-model: presets, the CLI writes HF dirs that transformers loads and generates with, seeded."""
import json

import pytest
import torch

from npr_async.cli import main
from npr_async.models import PRESETS, count_parameters, init_model, model_config
from npr_async.tags import TagIds
from npr_async.tokenizer import format_prompt, load_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert main(["init-model", "--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0
    return out


def test_cli_writes_loadable_model_that_generates(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.dtype == torch.float32
    TagIds.from_tokenizer(tok)
    cfg = model.config
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(tok)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 4, 4, 2)
    assert cfg.tie_word_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
    enc = tok(format_prompt(tok, "Let A = 1+2, B = 3+4. What is A+B?"), return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert out.shape == (1, enc["input_ids"].shape[1] + 12)
    assert isinstance(tok.decode(out[0, enc["input_ids"].shape[1]:]), str)


def test_same_seed_same_bytes_other_seed_differs(tiny_dir, tmp_path):
    same = init_model("tiny", str(tmp_path / "a"), seed=3)
    other = init_model("tiny", str(tmp_path / "b"), seed=4)
    ref = (tiny_dir / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == ref
    assert (other / "model.safetensors").read_bytes() != ref
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (same / name).read_bytes() == (tiny_dir / name).read_bytes()


def test_bfloat16(tmp_path):
    from transformers import AutoModelForCausalLM

    out = init_model("tiny", str(tmp_path / "bf"), seed=0, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert model.dtype == torch.bfloat16


def test_small_is_20_to_50m():
    n = count_parameters(model_config("small"))
    assert 20e6 <= n <= 50e6, n


def test_qwen3_4b_shape_config_only():
    tok = load_tokenizer()
    c = model_config("qwen3-4b-shape", tok)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (2560, 36, 32, 8, 128, 9728, 151936, 40960)
    assert c.tie_word_embeddings and c.rms_norm_eps == 1e-6 and c.rope_parameters["rope_theta"] == 1e6
    assert 3.9e9 <= count_parameters(c) <= 4.1e9  # Qwen3-4B: 4.02B parameters


def test_count_parameters_matches_torch():
    from transformers import Qwen3ForCausalLM

    cfg = model_config("tiny")
    cfg.tie_word_embeddings = False
    model = Qwen3ForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown model preset"):
        init_model("huge", str(tmp_path / "x"))
    with pytest.raises(ValueError, match="dtype"):
        init_model("tiny", str(tmp_path / "x"), dtype="int8")
    with pytest.raises(FileNotFoundError):
        init_model("tiny", str(tmp_path / "x"), tokenizer_path=str(tmp_path / "missing"))
    with pytest.raises(SystemExit):
        main(["init-model", "--preset", "huge", "--out", str(tmp_path / "x")])
    assert set(PRESETS) == {"tiny", "small", "qwen3-0.6b-shape", "qwen3-4b-shape"}


def test_qwen3_06b_shape_config_only():
    c = model_config("qwen3-0.6b-shape", load_tokenizer())
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (1024, 28, 16, 8, 128, 3072, 151936)
    assert 0.55e9 <= count_parameters(c) <= 0.65e9  # Qwen3-0.6B: 0.6B parameters (0.44B without embeddings)
