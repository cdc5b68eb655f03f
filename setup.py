"""Builds the one compiled part: the exact 1-D k-means coremltools' palettes need (see
coreml_opt/simulate/_kmeans1d.c). Optional: without a C compiler the package still installs and
uses coremltools' own, slower routine, with the same results."""
import sys

from setuptools import Extension, setup

FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-fast-math"]

setup(ext_modules=[Extension("coreml_opt.simulate._kmeans1d", ["coreml_opt/simulate/_kmeans1d.c"],
                             extra_compile_args=FLAGS, optional=True)])
