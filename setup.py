"""Build step for wheels: ship the notebooks and the small data files inside the package.

``notebooks/`` and ``data/sentences_en.txt`` at the top of the repository stay the only copy
in git. A non-editable build copies them into ``labkit/_shipped/`` in the wheel, where
:func:`labkit.report.notebooks_dir` and :data:`labkit.data.DATA_DIR` look first, so
``pip install . && labkit report`` works from any folder. An editable install reads them from
the source tree instead. Everything else is configured in pyproject.toml.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = {"notebooks": "*.ipynb", "data": "sentences_en.txt"}


class BuildPyShipped(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install uses notebooks/ and data/ in the source tree
        for folder, pattern in SHIPPED.items():
            target = Path(self.build_lib) / "labkit" / "_shipped" / folder
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted((ROOT / folder).glob(pattern)):
                shutil.copyfile(path, target / path.name)


setup(cmdclass={"build_py": BuildPyShipped})
