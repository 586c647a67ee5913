"""deep-image: a JAX/Flax reproduction of Baidu's "Deep Image" (Wu et al., 2015)."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-"))]


setuptools.setup(
    name="deep_image",
    version="0.1.0",
    description="Deep Image (Wu et al. 2015) in JAX/Flax: VGG models, "
    "hand-written collectives, data / lazy / hybrid parallelism.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["deep_image", "deep_image.*"]),
    install_requires=_requirements(),
)
