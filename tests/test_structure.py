"""The package stays a pipeline without import circles (issue 14): a cycle crept in twice when two
branches each added a module that imported the other's caller; this test makes the next one fail."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _structure_tool():
    path = ROOT / "tools" / "package_structure.py"
    spec = importlib.util.spec_from_file_location("package_structure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles_in_the_llm_path():
    tool = _structure_tool()
    graph = tool.import_graph(ROOT)
    assert len(graph) > 50  # the graph was really built (every module of minillm/, vision/ and lstm/ aside)
    assert tool.cycles(graph) == []
