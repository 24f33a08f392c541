"""Rewrite docs/config.md's schema table from ganlab/config.py (between the schema markers).

python scripts/schema_table.py          # tests/test_config.py checks the table is current
"""

from pathlib import Path

from ganlab import config

README = Path(__file__).resolve().parent.parent / "docs" / "config.md"
START, END = "<!-- schema:start -->", "<!-- schema:end -->"


def table() -> str:
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    rows += [f"| `{k}` | `{d}` | {a} | {doc} |" for k, d, a, doc in config.schema_rows()]
    return "\n".join(rows)


if __name__ == "__main__":
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table()}\n{END}{tail}")
