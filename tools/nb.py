"""Convert a notebook to and from percent-format Python, for editing notebooks as text.

    python tools/nb.py to-ipynb notebooks/src.py notebooks/01_x.ipynb
    python tools/nb.py to-py notebooks/01_x.ipynb /tmp/01_x.py

Cells start with ``# %%`` (code) or ``# %% [markdown]`` (markdown lines start with ``# ``).
``# %% tags=["parameters"]`` tags a cell. A first line ``# labkit: {json}`` sets notebook
metadata ``labkit`` (title, fast parameters). Outputs are never written.
"""
import json
import re
import sys

import nbformat

HEADER = re.compile(r"^# %%(?: \[(markdown)\])?(?: tags=(\[.*\]))?\s*$")


def to_ipynb(src, dst):
    lines = open(src).read().splitlines()
    meta = {}
    if lines and lines[0].startswith("# labkit:"):
        meta = json.loads(lines.pop(0)[len("# labkit:"):])
    cells, cur = [], None
    for line in lines:
        m = HEADER.match(line)
        if m:
            cur = {"md": bool(m.group(1)), "tags": json.loads(m.group(2) or "[]"), "lines": []}
            cells.append(cur)
        elif cur is not None:
            cur["lines"].append(line)
    nb = nbformat.v4.new_notebook()
    nb.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3",
                                       "language": "python"},
                        "language_info": {"name": "python"}, "labkit": meta})
    for c in cells:
        body = "\n".join(c["lines"]).strip("\n")
        if c["md"]:
            body = "\n".join(re.sub(r"^# ?", "", x) for x in body.splitlines())
            cell = nbformat.v4.new_markdown_cell(body)
        else:
            cell = nbformat.v4.new_code_cell(body)
        if c["tags"]:
            cell.metadata["tags"] = c["tags"]
        cell.id = f"c{len(nb.cells):02d}"  # stable ids: regenerating gives a clean diff
        nb.cells.append(cell)
    nbformat.write(nb, dst)


def to_py(src, dst):
    nb = nbformat.read(src, as_version=4)
    out = []
    if nb.metadata.get("labkit"):
        out.append("# labkit: " + json.dumps(nb.metadata["labkit"]))
    for c in nb.cells:
        tags = c.metadata.get("tags")
        head = "# %%" + (" [markdown]" if c.cell_type == "markdown" else "")
        head += f" tags={json.dumps(tags)}" if tags else ""
        out.append(head)
        if c.cell_type == "markdown":
            out.extend(("# " + x).rstrip() for x in c.source.splitlines())
        else:
            out.extend(c.source.splitlines())
        out.append("")
    open(dst, "w").write("\n".join(out))


if __name__ == "__main__":
    {"to-ipynb": to_ipynb, "to-py": to_py}[sys.argv[1]](sys.argv[2], sys.argv[3])
