"""Maps the three code folders onto the `shardserve` namespace.

`cluster/`, `workers/` and `parallel/` sit at the repository's top level (the layout is fixed),
but import as `shardserve.cluster`, `shardserve.workers` and `shardserve.parallel`. setuptools
needs every subpackage named, so they are discovered here by walking each folder.
"""

import os

from setuptools import setup

FOLDERS = {"cluster": "shardserve.cluster", "workers": "shardserve.workers", "parallel": "shardserve.parallel"}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = [], {}
    for folder, name in FOLDERS.items():
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if "__init__.py" in files:
                pkg = name + root[len(folder):].replace(os.sep, ".")
                packages.append(pkg)
                package_dir[pkg] = root
    return packages, package_dir


packages, package_dir = _packages()
setup(packages=packages, package_dir=package_dir, package_data={"shardserve.cluster": ["proto/**/*.proto"],
                                                                     "shardserve.parallel.kernels": ["gemv_tiles/*.json"],
                                                                     "shardserve.workers.quant.cpu_kernels": ["*.cpp", "*.inc"]})
