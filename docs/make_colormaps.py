"""Write service/static/colormaps.json: the published 256-entry colour tables that the overlay
(service/overlay.py) and the web viewer both read.

viridis and inferno are van der Walt and Smith's tables (matplotlib 1.5, "A better default
colormap for matplotlib", SciPy 2015); berlin is a diverging table from Crameri's Scientific
colour maps (doi:10.5281/zenodo.1243862). matplotlib ships all three verbatim in
matplotlib/_cm_listed.py, which is where they are copied from. Run from the repository root:
    .venv/bin/python docs/make_colormaps.py
"""

import json
from pathlib import Path

from matplotlib import _cm_listed

OUT = Path("service/static/colormaps.json")
NAMES = ("viridis", "inferno", "berlin")


def main() -> None:
    tables = {name: getattr(_cm_listed, f"_{name}_data") for name in NAMES}
    for name, table in tables.items():
        if len(table) != 256:
            raise SystemExit(f"{name} has {len(table)} entries, expected 256")
    lines = ",\n".join(
        f"  {json.dumps(name)}: {json.dumps(table)}" for name, table in tables.items()
    )
    OUT.write_text("{\n" + lines + "\n}\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
