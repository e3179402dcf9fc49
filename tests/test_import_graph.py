"""One direction between the modules: reading adapter files never imports the code that attaches adapters.

The graph is read from the source (every ``from .x import`` / ``import unilora_hf.x``, at module level or
inside functions), so a lazy import that closes a circle is caught too."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "unilora_hf"
FILE_SIDE = {"serialization", "safe_io", "config", "layout", "projection", "errors", "version"}
ATTACHING = {"model", "loading", "distributed", "layer", "siblings", "trainer", "sft_trainer", "auto", "peft_export"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("unilora_hf."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("unilora_hf."))
    return out


def graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def reachable(g: dict[str, set[str]], start: str, ignore: frozenset = frozenset()) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for nxt in g.get(node, ()):
            if nxt not in seen and (node, nxt) not in ignore:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# UniLoraConfig.from_pretrained reads a stored config (a lazy import inside that method): the one edge from the
# config back to the file readers. It reaches no attaching code, as the first test checks.
# The PEFT-named methods that inject_adapter installs on the model (peft_api) include model.load_adapter(folder,
# adapter_name=...), which calls the loader when it is called: the one edge from the attaching core back up to
# loading, at call time only, and not through any file-side module.
ALLOWED = frozenset({("config", "hub"), ("config", "serialization"), ("peft_api", "loading")})


def test_reading_files_never_imports_the_attaching_code():
    g = graph()
    assert reachable(g, "hub") & ATTACHING == set()
    for module in FILE_SIDE | {"hub"}:
        assert not reachable(g, module) & ATTACHING, (module, reachable(g, module) & ATTACHING)


def test_model_serialization_distributed_and_loading_form_no_circle():
    g = graph()
    for a in ("model", "serialization", "distributed", "loading", "hub"):
        assert a not in reachable(g, a, ALLOWED), a


def test_the_allowed_edges_are_imports_at_call_time():
    """Each allowed edge is an import inside a function, never at module level (so importing a module never
    pulls the other one in)."""
    for source, target in ALLOWED:
        tree = ast.parse((PACKAGE / f"{source}.py").read_text())
        top_level = {node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert target not in top_level, (source, target)
        assert target in imports_of(PACKAGE / f"{source}.py"), (source, target)
