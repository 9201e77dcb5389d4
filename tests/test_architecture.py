"""The imports that must never exist (docs/architecture.md), read from the source: a change that adds one
fails here, before it makes the path from import hook to kernel harder to follow or the start-up line
heavier."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "autoflash"

# run at interpreter start-up or on `import transformers`: the standard library and each other only
START_UP = ("__init__", "_startup", "switch", "backend_names", "families", "settings", "hooks")
# the kernels see plain data (a Layout, an AttentionCall) and nothing of transformers or the patches
BACKEND_MAY_USE = ("autoflash.backends", "autoflash.backend_names", "autoflash.call", "autoflash.layout",
                   "autoflash.tracing")
# the runtime path from transformers' call to the kernel: it never reaches back to the patches or hooks
RUNTIME = ("attention", "forward", "unpad_model", "packed_loss", "layout", "call", "dispatch", "tracing")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).with_suffix("")
        yield ".".join(relative.parts), ast.parse(path.read_text(), str(path))


def _imports(tree, top_level_only=False):
    """Every module name an import statement names (``from a import b`` names a and a.b)."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = dict(_modules())


@pytest.mark.parametrize("module", START_UP)
def test_the_start_up_path_imports_only_the_standard_library_and_itself(module):
    heavy = [n for n in _imports(MODULES[module], top_level_only=True)
             if _under(n, ("torch", "transformers", "wrapt", "numpy"))
             or (n.startswith("autoflash.") and n.split(".")[1] not in START_UP)]
    assert heavy == [], f"autoflash/{module}.py imports {heavy} when the interpreter starts"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("backends.")])
def test_backends_see_only_the_call_record_and_the_layout(module):
    reached = [n for n in _imports(MODULES[module]) if n.startswith("autoflash") and not _under(n, BACKEND_MAY_USE)
               and n != "autoflash"]
    assert reached == [], f"autoflash/{module.replace('.', '/')}.py reaches {reached}"
    assert not [n for n in _imports(MODULES[module]) if _under(n, ("transformers",))]


def test_kernels_are_reached_through_dispatch_only():
    reaching = sorted(m for m, tree in MODULES.items() if not m.startswith("backends")
                      and any(_under(n, ("autoflash.backends",)) for n in _imports(tree)))
    assert reaching == ["dispatch", "doctor"]  # doctor lists the backends' availability, it runs none


@pytest.mark.parametrize("module", RUNTIME)
def test_the_runtime_path_never_reaches_back_to_hooks_or_patches(module):
    back = [n for n in _imports(MODULES[module]) if _under(n, ("autoflash.patches", "autoflash.hooks"))]
    assert back == []


def _code_words(tree):
    """Every name, attribute, imported module and string the code uses (docstrings and comments left out)."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        yield node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else \
            node.module or "" if isinstance(node, ast.ImportFrom) else \
            node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) \
            and id(node) not in docstrings else ""


def test_only_the_family_records_name_a_family():
    """Class names such as ``LlamaModel`` come from ``autoflash.families``; the demo builds a LLaMA model."""
    naming = {}
    for module, tree in MODULES.items():
        if module in ("families", "demo"):
            continue
        for text in _code_words(tree):
            # (the seed API's replace_llama_attn_with_flash_attn keeps InternVL's name)
            if any(name in text for name in ("Llama", "Qwen", "Mistral", "modeling_llama", "modeling_qwen",
                                             "modeling_mistral")):
                naming.setdefault(module, []).append(text)
    assert naming == {}


# what differs between transformers releases around the whole-model path: the cache's argument name, the
# cache classes' insides, the loss hook. The era's patch reads them and hands the runtime one record.
RELEASE_SPECIFIC = ("past_key_values", "key_cache", "value_cache", "_seen_tokens", "loss_function")


@pytest.mark.parametrize("module", RUNTIME)
def test_the_runtime_path_names_no_release_specific_argument_or_attribute(module):
    named = sorted(set(_code_words(MODULES[module])) & set(RELEASE_SPECIFIC))
    assert named == [], f"autoflash/{module}.py names {named}: read it in patches/ (unpad_model.Release)"


def _autoflash_imports(tree):
    """The autoflash modules a module imports, at any depth of its code (``from autoflash import a`` names a)."""
    for name in _imports(tree):
        if name.startswith("autoflash."):
            relative = name[len("autoflash."):]
            if relative in MODULES:
                yield relative


def test_no_import_circle():
    """Each module can be read knowing only what it imports: no chain of imports, however deep or late
    (inside a function), leads back to where it started."""
    graph = {module: set(_autoflash_imports(tree)) - {module} for module, tree in MODULES.items()}
    circles = []

    def walk(module, path):
        for reached in sorted(graph[module]):
            if reached == path[0]:
                circles.append(" -> ".join(path + [reached]))
            elif reached not in path and reached > path[0]:  # each circle found once, from its least module
                walk(reached, path + [reached])

    for start in sorted(graph):
        walk(start, [start])
    assert circles == []
