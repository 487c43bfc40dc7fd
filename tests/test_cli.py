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
    assert parse_attn_spec("distr:group_size=4, block_size=32,reduce=sample") == (
        "distr", DistrConfig(group_size=4, block_size=32, reduce="sample"))
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
    assert rows["distr:group_size=2"]["max_logit_diff"] > 1e-4
    assert rows["distr:group_size=1"]["path"] == "prefill reference ×4, decode reference ×4"  # CPU: the reference
    printed = capsys.readouterr().out
    assert "| distr:group_size=2 | prefill reference ×4, decode reference ×4 |" in printed


def test_demo_bad_attention_setting_is_one_line_error():
    run = subprocess.run([sys.executable, "-m", "hf_distrattn", "demo", "--attn", "distr:group_size=3"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "group_size" in run.stderr


def test_paths_prints_each_layers_path_and_why(capsys):
    assert main(["paths", "--attn", "distr:group_size=2,sampled=k,exact_layers=0", "--seq-len", "100"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| 0 | 1 | reference | group_size=1, device cpu")  # layer 0 kept exact
    assert lines[2].startswith("| 1 | 2 | reference | G=2, device cpu") and "| reduced-reference |" in lines[2]
    assert len(lines) == 1 + 4  # the header, the demo model's 4 layers
