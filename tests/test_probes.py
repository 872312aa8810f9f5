from __future__ import annotations

import pytest

from simmerge_lib.probes import kit_probes, load_jsonl, write_jsonl
from simmerge_lib.tasks import get_task


def test_kit_probes_are_deterministic_unlabeled_and_nested():
    small, large = kit_probes(["reverse", "max"], 8), kit_probes(["reverse", "max"], 32)
    assert small == kit_probes(["reverse", "max"], 8) and small.key() == kit_probes(["reverse", "max"], 8).key()
    assert len(small["reverse"]) == 8 and large["max"][:8] == small["max"]
    assert small.key() != large.key()
    # probes are prompts (ending at "="), never answers, and never prompts of the eval split
    eval_prompts = {ex.prompt for ex in get_task("reverse").split("eval")}
    assert all(p.endswith("=") and p not in eval_prompts for p in large["reverse"])


def test_jsonl_roundtrip_and_limit(tmp_path):
    probes = kit_probes(["sort"], 4)
    path = write_jsonl(probes, tmp_path / "p.jsonl")
    back = load_jsonl(path)
    assert back["sort"] == probes["sort"] and back.key() == probes.key()
    assert len(load_jsonl(path, n=2)["sort"]) == 2
    with pytest.raises(KeyError, match="no prompts for task 'max'"):
        back["max"]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"p.jsonl:2: not valid JSON"),
    ('["a"]', r"p.jsonl:2: expected an object"),
    ('{"task": "sort"}', r"p.jsonl:2: missing key\(s\) prompt"),
    ('{"task": "", "prompt": "x"}', r"p.jsonl:2: 'task' must be a non-empty string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"task": "sort", "prompt": "Sabc="}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)
