"""`npr-async generate`: JSONL in, documented trajectory rows out; bad rows name their line (issue 3)."""
import json

import numpy as np
import pytest

from npr_async.cli import main
from npr_async.messages import Trajectory
from npr_async.models import init_model
from npr_async.structure import parse_structure
from npr_async.tags import TagIds
from npr_async.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(init_model("tiny", str(tmp_path_factory.mktemp("cli") / "m"), seed=1))


def test_generate_writes_trajectory_rows(model_dir, tmp_path):
    tok = load_tokenizer(model_dir)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    fork = "Q: <guideline><plan>1: a</plan><plan>2: b</plan></guideline>"
    inp.write_text(json.dumps({"prompt": fork}) + "\n" +
                   json.dumps({"prompt_ids": tok.encode("hello", add_special_tokens=False), "id": "p1"}) + "\n")
    rc = main(["generate", "--model", model_dir, "--prompts", str(inp), "--out", str(out), "--temperature", "0",
               "--max-total-tokens", "40", "--max-path-tokens", "30", "--max-step-tokens", "8", "--n", "2",
               "--seed", "3"])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and [r["prompt_id"] for r in rows] == ["0", "0", "p1", "p1"]
    for r in rows:
        for key in ("token_ids", "positions", "segment_ids", "segments", "logprobs", "sampled", "finish_reason",
                    "text"):
            assert key in r
        assert all((lp is None) != s for lp, s in zip(r["logprobs"], r["sampled"]))
        t = Trajectory.from_json_row(r)
        s = parse_structure(t.ids(), TagIds.from_tokenizer(tok))
        assert np.array_equal(s.positions, t.pos()) and s.parents == t.parents()
    assert rows[0]["num_forks"] == 1 and rows[0]["token_ids"] == rows[1]["token_ids"]  # greedy


@pytest.mark.parametrize("line, msg", [("{not json", "not valid JSON"), ('{"text": "x"}', "exactly one of"),
                                       ('{"prompt_ids": [1, "a"]}', "prompt_ids")])
def test_bad_rows_name_the_line(model_dir, tmp_path, capsys, line, msg):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"prompt": "ok"}\n' + line + "\n")
    rc = main(["generate", "--model", model_dir, "--prompts", str(inp), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{inp}:2" in err and msg in err
