"""Packaging for trime: TRIME for fairseq (a plugin) and Hugging Face causal LMs (the ``hf`` extra).

The design card's top-level folders ``data_prep/``, ``retrieval/`` and ``eval/`` are
installed as ``trime.data_prep``, ``trime.retrieval`` and ``trime.eval`` so that no
top-level module named ``eval`` is ever installed. ``trime-fairseq-autoload.pth`` is
copied next to the package so that plain ``fairseq-train --criterion trime_loss``
finds the plugin (see ``trime/_autoload.py``).

fairseq-fixed (imports as ``fairseq``) is built against the torch already installed:
``pip install --no-build-isolation fairseq-fixed==0.12.3.1 --no-deps`` and then its
light dependencies, so that it never pulls torchaudio or a second torch. The
Makefile does exactly that.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

AUTOLOAD_PTH = "trime-fairseq-autoload.pth"

PACKAGE_DIR = {
    "trime": "trime",
    "trime.data_prep": "data_prep",
    "trime.retrieval": "retrieval",
    "trime.eval": "eval",
}
PACKAGES = [
    "trime", "trime.cli", "trime.criterions", "trime.models", "trime.tasks", "trime.hf", "trime.adapters",
    "trime.data_prep", "trime.retrieval", "trime.eval",
]

HERE = os.path.dirname(os.path.abspath(__file__))


def read_requirements(name: str = "requirements.txt") -> list:
    """requirements.txt lists everything but torch and fairseq-fixed; requirements-hf.txt the [hf] extra."""
    with open(os.path.join(HERE, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


class BuildPyWithAutoload(build_py):
    """build_py that also places the autoload .pth at the root of site-packages."""

    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join(HERE, AUTOLOAD_PTH), os.path.join(self.build_lib, AUTOLOAD_PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, AUTOLOAD_PTH)]


setup(
    name="trime",
    version="0.1.0",
    description=(
        "TRIME: training language models with memory augmentation, "
        "for fairseq (a plugin) and Hugging Face causal LMs"
    ),
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    cmdclass={"build_py": BuildPyWithAutoload},
    install_requires=[
        "torch>=2.1",
        "fairseq-fixed==0.12.3.1",
        *read_requirements(),
    ],
    extras_require={
        "gpu": ["faiss-gpu-cu12"],
        "hf": read_requirements("requirements-hf.txt"),
        "dev": read_requirements("requirements-dev.txt"),
    },
    entry_points={
        "console_scripts": [
            "trime-train=trime.train_cli:main",
            "trime-prepare=trime.data_prep.prepare:main",
            "trime-eval=trime.eval.evaluate:main",
            "trime-generate=trime.eval.generate:main",
            "trime-build-datastore=trime.retrieval.build_datastore:main",
            "trime-bm25-batches=trime.retrieval.bm25_batches:main",
            "trime-hf-train=trime.hf.train:main",
        ]
    },
)
