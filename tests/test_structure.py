"""Import directions of the package, read from the source (every import, also those inside
functions): models import only layers (and RecBole, torch); the LLM tools never import the
models, trainers, stages or benchmarks; stages are reached through the registry; and no two
modules import each other, directly or around a longer loop."""

import ast
import os

from conftest import REPO

PACKAGE = "recbole_cdsr"


def _module_files():
    out = {}
    for folder, _, files in os.walk(os.path.join(REPO, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph():
    """``{module: {package modules it imports}}``; ``from a.b import c`` counts as an import
    of ``a.b.c`` when that is a module, else of ``a.b``."""
    files = _module_files()
    graph = {}
    for mod, path in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in files else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def find_cycles(graph):
    """Every loop that a depth-first walk meets, as ``[m1, m2, ..., m1]``."""
    found, state = [], {}

    def walk(node, path):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    return found


def test_cycle_finder_on_a_hand_made_graph():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(g) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    # the package root only re-exports lazily (__version__ is read by submodules): not a node
    graph = {m: d - {PACKAGE} for m, d in import_graph().items() if m != PACKAGE}
    assert find_cycles(graph) == []


def test_models_import_only_layers():
    graph = import_graph()
    models = [m for m in graph if m.startswith(f"{PACKAGE}.model.")]
    assert f"{PACKAGE}.model.llmcdsr" in models and f"{PACKAGE}.model.lecdsr" in models
    for m in models:
        outside = [d for d in graph[m] if not d.startswith(f"{PACKAGE}.model")]
        assert outside == [], f"{m} imports {outside}"


def test_llm_tools_and_stages_keep_their_direction():
    graph = import_graph()
    for m, deps in graph.items():
        if m.startswith(f"{PACKAGE}.llm"):
            bad = [d for d in deps if d.startswith(tuple(f"{PACKAGE}.{p}" for p in
                                                           ("model", "trainer", "stages", "benchmark")))]
            assert bad == [], f"{m} imports {bad}"
        if not m.startswith((f"{PACKAGE}.stages", f"{PACKAGE}.registry")):
            assert not [d for d in deps if d.startswith(f"{PACKAGE}.stages")], f"{m} imports a stage"


def test_every_model_with_stages_has_them_through_the_registry():
    from recbole_cdsr.registry import PLUGIN_AFTER_TRAINING, PLUGIN_MODELS, PLUGIN_STAGES, get_after_training, get_stages

    assert set(PLUGIN_STAGES) <= set(PLUGIN_MODELS) and {"LLMCDSR", "LeCDSR"} <= set(PLUGIN_STAGES)
    for name in PLUGIN_STAGES:
        assert callable(get_stages(name))
    assert get_stages("SASRec") is None and get_stages("C2DSR") is None
    assert set(PLUGIN_AFTER_TRAINING) <= set(PLUGIN_MODELS) and callable(get_after_training("URLLM"))
    assert get_after_training("C2DSR") is None
