"""Write the adapter-methods and training-rules tables of docs/adapter_methods.md from the registries.

The tables live between marker comments (``<!-- methods-table:start -->`` ... ``<!-- methods-table:end -->``, and
``rules-table``), so the page stays in sync with ``medlora.adapters.list_methods()`` and
``medlora.adapters.optim.list_rules()``: rerun this script after adding a method. With ``--llm-json`` /
``--unet-json`` (files written by ``scripts/llm_demo.py --json`` and ``scripts/methods_unet_table.py --json``) it
also replaces the two measured demo tables (``llm-demo`` and ``unet-demo`` markers); with ``--merge`` only the
rows measured in the files are replaced (matched by method and rule), the others stay, so that a rerun of a few
methods (``--methods``/``--rules`` of the demo scripts) updates just their rows.

    python scripts/methods_table.py                       # rewrite the registry tables
    python scripts/methods_table.py --check               # exit 1 if the page is out of date
    python scripts/methods_table.py --llm-json llm.json --unet-json unet.json
    python scripts/methods_table.py --merge --llm-json some_rows.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medlora.adapters import get_method, list_methods  # noqa: E402
from medlora.adapters.optim import get_rule, list_rules  # noqa: E402

DOC = ROOT / "docs" / "adapter_methods.md"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def methods_table() -> str:
    lines = [
        "| method | label | family | paper | what trains | mergeable | LoRA-pair rules | layer types |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in list_methods():
        spec = get_method(name)
        lines.append(
            f"| `{name}` | {_cell(spec.label)} | {spec.family} | {_cell(spec.citation)} | "
            f"{_cell(spec.trains or spec.summary)} | "
            f"{'yes' if spec.mergeable else 'no'} | {'yes' if spec.lora_pair else 'no'} | {_cell(spec.layer_types)} |"
        )
    return "\n".join(lines)


def rules_table() -> str:
    lines = ["| rule | label | paper | what it does |", "|---|---|---|---|"]
    for name in list_rules():
        spec = get_rule(name)
        lines.append(f"| `{name}` | {_cell(spec.label)} | {_cell(spec.citation)} | {_cell(spec.summary)} |")
    return "\n".join(lines)


def _markers(text: str, marker: str) -> tuple[str, str]:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{DOC}: markers {start} ... {end} not found")
    return start, end


def replace_between(text: str, marker: str, body: str) -> str:
    start, end = _markers(text, marker)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def between(text: str, marker: str) -> str:
    start, end = _markers(text, marker)
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def merge_rows(table: str, measured: str) -> str:
    """``table`` with each body row of ``measured`` in place of the row of the same (method, rule); rows it lacks
    are appended."""
    def key(line: str) -> tuple[str, ...]:
        return tuple(cell.strip() for cell in line.strip().strip("|").split("|")[:2])

    new = {key(line): line for line in measured.splitlines()[2:]}
    lines = table.splitlines()
    merged = lines[:2] + [new.pop(key(line), line) for line in lines[2:]]
    return "\n".join(merged + list(new.values()))


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(text: str, llm_json: str | None = None, unet_json: str | None = None, merge: bool = False) -> str:
    text = replace_between(text, "methods-table", methods_table())
    text = replace_between(text, "rules-table", rules_table())
    for path, marker, script in ((llm_json, "llm-demo", "llm_demo"), (unet_json, "unet-demo", "methods_unet_table")):
        if path:
            rows = json.loads(Path(path).read_text(encoding="utf-8"))
            table = _script(script).format_table(rows)
            text = replace_between(text, marker, merge_rows(between(text, marker), table) if merge else table)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", default=str(DOC), help="the markdown page to update")
    parser.add_argument("--check", action="store_true", help="only check that the registry tables are up to date")
    parser.add_argument("--llm-json", help="rows written by scripts/llm_demo.py --json")
    parser.add_argument("--unet-json", help="rows written by scripts/methods_unet_table.py --json")
    parser.add_argument("--merge", action="store_true", help="replace only the measured rows of the demo tables")
    args = parser.parse_args(argv)
    path = Path(args.doc)
    old = path.read_text(encoding="utf-8")
    new = render(old, args.llm_json, args.unet_json, args.merge)
    if args.check:
        if new != old:
            print(f"{path} is out of date: run python scripts/methods_table.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        path.write_text(new, encoding="utf-8")
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
