"""The package's import graph: no cycles, imports flow down the layer order of the package docstring, and
function-local imports only for optional heavy dependencies (each with its reason on the line)."""
from __future__ import annotations

import ast
from pathlib import Path

import selora_kernels

PACKAGE_DIR = Path(selora_kernels.__file__).parent

# Lowest first; a module may import from its own layer's package or from a lower layer. Layers sharing a
# rank must not import each other.
LAYER_RANKS = {
    "_cuda_home": 0, "_C": 0, "_extension": 0.5, "config": 0, "fisher_stats": 0,
    "kernels": 1,
    "ops": 2,
    "nn": 3,
    "optim": 4,
    "expansion": 5,
    "integrations": 6,
    "data": 7,
    "methods": 8,
    "families": 8.5,  # uses integrations and data, used by training; never seen below integrations
    "training": 9, "evaluation": 9,
    "experiments": 10,
    "__init__": 11,
}


def _modules():
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
        yield ".".join(parts), path


def _as_module(parts: list) -> str:
    """The module name (relative to the package) of `parts`; a package is its `__init__`."""
    if parts and PACKAGE_DIR.joinpath(*parts).with_suffix(".py").exists():
        return ".".join(parts)
    return ".".join(parts + ["__init__"])


def _resolve(module: str, node: ast.ImportFrom) -> list:
    """In-package modules that `from ... import ...` reads (empty for imports from outside the package)."""
    if node.level == 0:
        if not (node.module or "").startswith("selora_kernels"):
            return []
        base = node.module.split(".")[1:]
    else:
        package = module.split(".")[:-1]  # a module's package; for `pkg.__init__` the package itself
        base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    targets = []
    for alias in node.names:
        candidate = base + [alias.name]
        is_module = (PACKAGE_DIR.joinpath(*candidate).with_suffix(".py").exists()
                     or PACKAGE_DIR.joinpath(*candidate, "__init__.py").exists())
        targets.append(_as_module(candidate if is_module else base))
    return targets


def _layer(module: str) -> str:
    return module.split(".")[0]


def _graph():
    edges, local_imports = {}, []
    for module, path in _modules():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        top_level = set(map(id, tree.body))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if id(node) not in top_level and not _inside_type_checking(tree, node):
                    local_imports.append((module, node.lineno, lines[node.lineno - 1], node))
                if isinstance(node, ast.ImportFrom):
                    targets.update(t for t in _resolve(module, node) if t != module)
                else:
                    targets.update(_as_module(a.name.split(".")[1:]) for a in node.names
                                   if a.name.startswith("selora_kernels"))
        edges[module] = targets
    return edges, local_imports


def _inside_type_checking(tree, target) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            if any(child is target for child in ast.walk(node)):
                return True
    return False


def test_no_import_cycles():
    edges, _ = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in edges:
                continue
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_flow_down_the_layers():
    edges, _ = _graph()
    unknown = sorted({_layer(m) for m in edges} - set(LAYER_RANKS))
    assert not unknown, f"modules outside the declared layers: {unknown}; add them to LAYER_RANKS and the docstring"
    upward = [f"{source} -> {target}" for source, targets in edges.items() for target in targets
              if _layer(target) != _layer(source) and LAYER_RANKS[_layer(target)] >= LAYER_RANKS[_layer(source)]]
    assert not upward, "imports that do not flow down: " + ", ".join(sorted(upward))


def test_package_docstring_states_the_layer_order():
    doc = selora_kernels.__doc__
    positions = {layer: doc.find(layer) for layer in LAYER_RANKS if not layer.startswith("_") and layer != "__init__"}
    missing = sorted(layer for layer, at in positions.items() if at < 0)
    assert not missing, f"package docstring does not name layers {missing}"


def _has_reason(lines, lineno) -> bool:
    """A comment on the import line, or above the block of consecutive imports it belongs to."""
    index = lineno - 1
    if "#" in lines[index]:
        return True
    while index > 0 and lines[index - 1].strip().startswith(("import ", "from ")):
        index -= 1
        if "#" in lines[index]:
            return True
    return index > 0 and lines[index - 1].strip().startswith("#")


def test_function_local_imports_are_optional_dependencies_with_a_reason():
    _, local_imports = _graph()
    lines_of = {module: path.read_text().splitlines() for module, path in _modules()}
    bad = []
    for module, lineno, line, node in local_imports:
        in_package = (isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith(
            "selora_kernels"))) or (isinstance(node, ast.Import) and any(
                a.name.startswith("selora_kernels") for a in node.names))
        # in-package exceptions: the optional compiled part, the Triton kernel modules (Triton is optional) and
        # the peft integration (peft is optional below it)
        optional_part = "_C" in line or "kernels." in line or "peft_method" in line
        reason = _has_reason(lines_of[module], lineno)
        if (in_package and not optional_part) or not reason:
            bad.append(f"{module}:{lineno}: {line.strip()}")
    assert not bad, "function-local imports that are in-package or give no reason:\n" + "\n".join(bad)
