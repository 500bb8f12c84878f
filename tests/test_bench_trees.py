"""bench/trees.py's pieces that need no GPU: exporting revisions with edits, and the comparison table."""
import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_trees", ROOT / "bench" / "trees.py")
trees = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trees)

has_git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.skipif(not has_git, reason="needs the git checkout")
def test_export_copies_the_revision_and_applies_exact_edits(tmp_path):
    committed = subprocess.run(["git", "show", "HEAD:engine/triton_gemm.py"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout
    line = next(ln for ln in committed.splitlines() if committed.count(ln) == 1 and ln.strip())  # occurs once
    edit = ("engine/triton_gemm.py", line, line + "  # edited")
    out = trees.export(ROOT, "a", "HEAD", tmp_path, [edit])
    assert (out / "engine" / "triton_gemm.py").read_text() == committed.replace(*edit[1:])
    assert (out / "bench" / "engine.py").is_file() and not (out / "npr_async").exists()
    with pytest.raises(FileExistsError, match="remove it first"):
        trees.export(ROOT, "a", "HEAD", tmp_path)
    with pytest.raises(ValueError, match="occurs 0 times"):
        trees.export(ROOT, "b", "HEAD", tmp_path, [("engine/triton_gemm.py", "no such text", "x")])
    with pytest.raises(subprocess.CalledProcessError):
        trees.export(ROOT, "c", "no-such-revision", tmp_path)


def test_table_puts_each_tree_side_by_side_and_the_kernels_that_moved_first():
    def doc(step16, step64, attn, gemm):
        return {"decode": [{"batch": 16, "step_ms": step16}, {"batch": 64, "step_ms": step64}],
                "profile_b64": [{"name": "replay (back to back)", "ms_per_step": step64},
                                {"name": "_decode_kernel", "ms_per_step": attn},
                                {"name": "_skinny_kernel", "ms_per_step": gemm}]}
    text = trees.table({"_v/old": [doc(4.9, 5.41, 0.929, 1.227), doc(4.9, 5.40, 0.931, 1.227)],
                        "here": [doc(4.9, 5.66, 1.126, 1.224)]})
    lines = text.splitlines()
    assert lines[0] == "| batch | _v/old step ms | here step ms |"
    assert lines[3] == "| 64 | 5.410 / 5.400 | 5.660 |"
    kernels = [ln.split(" | ")[0][2:] for ln in lines[lines.index("| kernel | _v/old | here |") + 2:]]
    assert kernels[:2] == ["replay (back to back)", "_decode_kernel"]  # biggest difference first
    assert "| _decode_kernel | 0.930 | 1.126 |" in lines


def test_run_calls_each_trees_own_script_interleaved_and_writes_the_table(tmp_path, capsys):
    # stand-in trees whose bench/engine.py records its call order and writes an engine.json as the real one does
    log = tmp_path / "calls.txt"
    for name, step in (("a", 5.4), ("b", 5.6)):
        script = tmp_path / name / "bench" / "engine.py"
        script.parent.mkdir(parents=True)
        script.write_text(
            "import json, sys, pathlib\n"
            f"out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir(parents=True)\n"
            f"open({str(log)!r}, 'a').write('{name} ' + ' '.join(sys.argv[1:-2]) + '\\n')\n"
            f"(out / 'engine.json').write_text(json.dumps({{'decode': [{{'batch': 64, 'step_ms': {step}}}]}}))\n")
    out = tmp_path / "out"
    assert trees.main(["run", "--trees", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--rounds", "2", "--out", str(out),
                       "--", "--batches", "64"]) == 0
    assert log.read_text().splitlines() == ["a --batches 64", "b --batches 64"] * 2  # A B A B
    assert "| 64 | 5.400 / 5.400 | 5.600 / 5.600 |" in (out / "table.md").read_text()
    with pytest.raises(SystemExit, match="not exported"):
        trees.main(["export", "--dest", str(tmp_path / "v"), "x=HEAD", "--set", "y:f:a:b"])
    assert not (tmp_path / "v").exists()  # nothing copied when the arguments are wrong
