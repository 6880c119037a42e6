"""The mutation tool's table stays applicable: every mutant plants its bug in today's code.

tools/mutation/run.py runs the conformance suite once per mutant, which takes
an hour, so it is not part of plain tox.  This keeps its table from rotting in
between: each mutant's text occurs exactly once in its file and the mutated
file still parses.  When the code moves, this fails and names the mutant.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_run", REPO / "tools/mutation/run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


tool = _tool()
MUTANTS = tool.load_mutants()


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_mutant_applies_exactly_once_and_parses(mutant):
    original = (REPO / mutant.file).read_text()
    mutated = tool.mutated_source(mutant)
    assert mutated != original
    assert mutated.count(mutant.replace) >= 1


def test_the_table_covers_the_protocol_core():
    files = {m.file for m in MUTANTS}
    for module in ("handshake", "transmission", "reply_builder", "wire", "export", "phases"):
        assert f"reference_server/protocol/{module}.py" in files, module
    assert "reference_server/dispatch.py" in files
    assert 40 <= len(MUTANTS) <= 80


def test_a_mutant_whose_text_is_missing_or_repeated_fails_loudly():
    mutant = tool.Mutant("m", "reference_server/x.py", "a = 1", "a = 2", "bug", "spec")
    assert mutant.apply("a = 1\n") == "a = 2\n"
    for source in ("b = 1\n", "a = 1\na = 1\n"):
        with pytest.raises(tool.MutantRotted, match="exactly once"):
            mutant.apply(source)


def test_a_mutant_that_does_not_parse_is_refused(tmp_path):
    (tmp_path / "reference_server").mkdir()
    (tmp_path / "reference_server/x.py").write_text("a = 1\n")
    mutant = tool.Mutant("m", "reference_server/x.py", "a = 1", "a = (", "bug", "spec")
    with pytest.raises(tool.MutantRotted, match="does not parse"):
        tool.mutated_source(mutant, tmp_path)


def test_the_copy_leaves_out_history_and_environments():
    ignored = tool.IGNORED(str(REPO), [".git", ".tox", ".venv-bootstrap", "conformance", "x.pyc"])
    assert ignored == {".git", ".tox", ".venv-bootstrap", "x.pyc"}


def test_the_score_counts_timeouts_as_detected_and_broken_apart():
    R = tool.Result
    results = [
        R("a", "killed", 1, "t"),
        R("b", "timeout", 1, ""),
        R("c", "broken", 1, ""),
        R("d", "survived", 1, "accepted: equivalent"),
        R("e", "survived", 1, ""),
    ]
    line = tool.score_line(results)
    assert "2/4 = 50%" in line
    assert "excluding 1 accepted survivors: 2/3 = 67%" in line
