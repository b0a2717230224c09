"""Build the wheel and fail if a file the package needs at run time is missing from it.

An editable install reads the dashboard's assets from the source tree, so a package-data
omission in pyproject.toml would pass every test and break every installed copy.
"""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ["zfabric/py.typed", "zfabric/dashboard/static/index.html",
          "zfabric/dashboard/static/dashboard.js", "zfabric/dashboard/static/dashboard.css"]

with tempfile.TemporaryDirectory() as out:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", out, str(ROOT)], check=True)
    wheel = next(Path(out).glob("zfabric-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [n for n in NEEDED if n not in names]
    # every asset the dashboard serves must be in the wheel, not only the ones listed above
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "zfabric/dashboard/static").iterdir()}
    missing += sorted(shipped - names - set(missing))
    if missing:
        sys.exit(f"the wheel {wheel.name} lacks {', '.join(missing)}; list them under"
                 " [tool.setuptools.package-data] in pyproject.toml")
    print(f"wheel {wheel.name}: {len(names)} files, dashboard assets present")
