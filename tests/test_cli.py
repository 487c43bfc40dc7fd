"""The demo CLI and the attention-spec parser."""

import json
import subprocess
import sys

import pytest

from hf_distrattn import DistrConfig, parse_attn_spec
from hf_distrattn.cli import main


def test_parse_attn_spec():
    assert parse_attn_spec("sdpa") == ("sdpa", None)
    assert parse_attn_spec("distr") == ("distr", DistrConfig())
    assert parse_attn_spec("distr:group_size=4, block_size=32,reduce=sample,grouping=lsh") == (
        "distr", DistrConfig(grouping="lsh", group_size=4, block_size=32, reduce="sample"))
    for bad, message in [("distr:group=2", "unknown field"), ("distr:group_size", "key=value"),
                         ("sdpa:group_size=2", "only 'distr'"), ("distr:group_size=3", "group_size")]:
        with pytest.raises(ValueError, match=message):
            parse_attn_spec(bad)


def test_demo_default_model(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--new-tokens", "8", "--json", str(out)]) == 0
    rows = {r["attn"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["sdpa", "distr:group_size=1", "distr:group_size=2"]
    assert rows["distr:group_size=1"]["token_agreement"] == 1.0
    assert rows["distr:group_size=1"]["max_logit_diff"] < 1e-4
    assert rows["distr:group_size=2"]["max_logit_diff"] > 1e-4  # the default, subspace: the prompt spans 3 blocks
    assert rows["distr:group_size=1"]["path"] == "prefill reference ×4, decode reference ×4"  # CPU: the reference
    printed = capsys.readouterr().out
    assert "| distr:group_size=2 | prefill reference ×4, decode reference ×4 |" in printed
    assert "prompt: 'In the beginning was the Word" in printed
    assert len(rows["sdpa"]["tokens"]) == 8 and f"sdpa: token ids {rows['sdpa']['tokens'][0]} " in printed
    assert "token agreement: share of generated tokens equal to sdpa's" in printed


def test_demo_bad_attention_setting_is_one_line_error():
    run = subprocess.run([sys.executable, "-m", "hf_distrattn", "demo", "--attn", "distr:group_size=3"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "group_size" in run.stderr


def test_paths_prints_each_layers_path_and_why(capsys):
    assert main(["paths", "--attn", "distr:group_size=2,grouping=lsh,sampled=k,exact_layers=0", "--seq-len",
                 "100"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| 0 | 1 | reference | group_size=1, device cpu")  # layer 0 kept exact
    assert lines[2].startswith("| 1 | 2 | reference | G=2, device cpu") and "| reduced-reference |" in lines[2]
    assert len(lines) == 1 + 4  # the header, the demo model's 4 layers


def run_cli(args, capsys):
    """``(exit code, the stderr lines of hf-distrattn, not those of progress bars)`` of ``hf-distrattn ARGS`` in this
    process."""
    try:
        code = main(args)
    except SystemExit as stop:  # argparse
        code = stop.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("hf-distrattn")]


BAD_INPUTS = [
    (["ppl", "--model", "{lm}", "--text-file", "{empty}"], "text file is empty"),
    (["ppl", "--model", "{lm}", "--text-file", "{text}", "--max-windows", "0"], "argument --max-windows: must be"),
    (["vit", "--model", "m", "--dataset", "d.parquet", "--limit", "0"], "argument --limit: must be at least 1"),
    (["demo", "--new-tokens", "0"], "argument --new-tokens: must be at least 1"),
    (["ppl", "--model", "../no/such/model", "--text-file", "{text}"], "model not found: ../no/such/model"),
    (["ppl", "--model", "{lm}", "--text-file", "{text}", "--attn", "flash_attention_2"],
     "attention implementation 'flash_attention_2' is not available"),
    (["ppl", "--model", "{lm}", "--text-file", "{text}", "--attn", "flash"],
     "attention implementation 'flash' is not available"),
    (["calibrate", "--model", "{lm}", "--text-file", "{text}", "--attn", "sdpa"], "--attn must be a distr setting"),
    (["calibrate", "--model", "{lm}", "--text-file", "{empty}"], "--text-file: no text"),
    (["ppl", "--model", "{lm}", "--text-file", "{text}", "--seq-len", "100000"],
     "--seq-len 100000 exceeds the model's max_position_embeddings (8192)"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_inputs_are_one_line_naming_the_argument(shared, tmp_path, capsys, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    paths = dict(lm=shared / "models/ref-llama-bytes", text=shared / "data/heldout_kjv.txt", empty=empty)
    code, lines = run_cli([a.format(**paths) for a in args], capsys)
    assert code == 2 and len(lines) == 1 and message in lines[0] and len(lines[0]) < 300, lines
    assert lines[0].startswith(f"hf-distrattn {args[0]}: error: ")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is available")
def test_cuda_device_without_a_gpu(capsys):
    code, lines = run_cli(["demo", "--device", "cuda"], capsys)
    assert code == 2 and lines == [lines[0]] and "--device cuda: no CUDA GPU is available" in lines[0]


def test_help_loads_neither_torch_nor_transformers():
    """``hf-distrattn --help`` starts fast: the package and the command list import no heavy module."""
    code = ("import sys\nfrom hf_distrattn.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.stdout.strip().splitlines()[-1] == "[]" and "paths" in run.stdout


def test_the_library_does_not_import_the_evals():
    code = ("import sys, torch, hf_distrattn\nfrom transformers import AttentionInterface\n"
            "from hf_distrattn import cache, calibration, cli, demo, integration, ops, plan, settings, tree\n"
            "assert 'distr' in AttentionInterface._global_mapping and 'tree' in AttentionInterface._global_mapping\n"
            "assert all(callable(getattr(hf_distrattn, f)) for f in ('calibrate', 'configure', 'distr_attention'))\n"
            "print(sorted(m for m in sys.modules if m.startswith('hf_distrattn.eval')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stderr[-2000:]


@pytest.mark.parametrize("module", ["cache", "integration", "tree", "demo", "calibration"])
def test_any_module_imported_first_registers_distr(module):
    """Importing a submodule that imports Transformers before the package has registered (the post-import hook
    fires inside that module's own import) works and registers ``"distr"`` and ``"tree"``."""
    code = (f"import hf_distrattn.{module}\nfrom transformers import AttentionInterface\n"
            "print(sorted(n for n in ('distr', 'tree') if n in AttentionInterface._global_mapping))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().splitlines()[-1] == "['distr', 'tree']", run.stderr[-2000:]
