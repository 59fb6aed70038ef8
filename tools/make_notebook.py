"""Write a notebook from a plain Python file whose cells are separated by '# %%' lines ('# %% [parameters]' tags
the papermill parameters cell, '# %% [markdown]' a text cell). Keeps notebooks reviewable as text:
the .py under notebooks/src/ is the source, the .ipynb is generated from it by `make notebooks`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cells_from(source: str) -> list[dict]:
    cells = []
    for block in source.split("# %%")[1:]:
        header, _, body = block.partition("\n")
        body = body.strip("\n")
        tags = ["parameters"] if "[parameters]" in header else []
        if "[markdown]" in header:
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            cells.append({"cell_type": "markdown", "metadata": {}, "source": text})
        else:
            cells.append(
                {
                    "cell_type": "code",
                    "metadata": {"tags": tags},
                    "source": body,
                    "outputs": [],
                    "execution_count": None,
                }
            )
    return cells


def main(src: str, out: str) -> None:
    notebook = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "cells": cells_from(Path(src).read_text()),
    }
    for index, cell in enumerate(notebook["cells"]):
        cell["id"] = f"cell-{index}"
    Path(out).write_text(json.dumps(notebook, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
