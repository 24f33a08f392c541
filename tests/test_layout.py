"""The README's layout is a map of the package: every module it names exists where it says, and every
module of the package is on it (a rename or a new file without its line fails here)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_modules() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Layout") :]
    block = block[block.index("```") + 3 :]
    block = block[: block.index("```")]
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


def logical_lines(source: str) -> dict[int, int]:
    """Physical line -> 1 where a logical line (a statement, or a comment on its own line) starts: a call
    the formatter wraps over six physical lines is still one line to read."""
    import io
    import tokenize

    starts, begun = {}, False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not begun:
            starts[tok.start[0]] = 1
        elif tok.type in (tokenize.NEWLINE, tokenize.NL):
            begun = False if tok.type == tokenize.NEWLINE or not begun else begun
        elif tok.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING) and not begun:
            starts[tok.start[0]], begun = 1, True
    return starts


def test_no_function_in_the_package_is_over_60_lines():
    """Functions short enough to read at once (issue 33): at most 60 logical lines (statements and
    comment lines; ruff format's wrapping of one call over several lines does not count against it)."""
    import ast

    long = []
    for f in sorted((ROOT / "ganlab").rglob("*.py")):
        source = f.read_text()
        starts = logical_lines(source)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = sum(1 for line in range(node.lineno, node.end_lineno + 1) if line in starts)
                if n > 60:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
