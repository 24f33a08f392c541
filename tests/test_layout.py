"""The README's layout is a map of the package: every module it names exists where it says, and every
module of the package is on it (a rename or a new file without its line fails here)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_modules() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Layout"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    named, folder = set(), None
    for line in block.splitlines():
        head = re.match(r"^(\S+/)\s", line)
        if head:
            folder = head.group(1)
        for name in re.findall(r"\b([a-z_0-9]+\.py)\b", line):
            named.add(folder + name)
    return named


def test_the_readme_layout_names_every_module_and_only_modules_that_exist():
    named = layout_modules()
    assert named, "no layout block found"
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"README's layout names files that do not exist: {missing}"
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "ganlab").rglob("*.py") if p.name != "__init__.py"}
    unlisted = sorted(modules - named)
    assert not unlisted, f"modules missing from README's layout: {unlisted}"


def test_no_function_in_the_package_is_over_60_lines():
    """Functions short enough to read at once (issue 33): a longer one is split, not waved through."""
    import ast
    long = []
    for f in sorted((ROOT / "ganlab").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
