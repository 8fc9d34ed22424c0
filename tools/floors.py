"""Print the lower bound of every runtime dependency in pyproject.toml as a ``name==floor`` pin.

``make test-min`` installs exactly these pins (torch excepted: it is installed first, pinned
to the local CPU wheel) so that a floor the code does not actually work with fails there.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SKIP = {"torch"}


def floors(pyproject: Path) -> list[str]:
    """``name==version`` for each ``name>=version`` in ``[project] dependencies``."""
    text = pyproject.read_text(encoding="utf-8")
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M)
    if block is None:
        raise SystemExit(f"no [project] dependencies list in {pyproject}")
    pins = []
    for spec in re.findall(r'"([^"]+)"', block.group(1)):
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", spec.strip())
        if match is None:
            raise SystemExit(f"dependency without a plain '>=' floor: {spec!r}")
        name, version = match.groups()
        if name.lower() not in SKIP:
            pins.append(f"{name}=={version}")
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("pyproject.toml")
    print("\n".join(floors(path)))
