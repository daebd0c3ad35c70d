"""Builds the optional native CPU kernels (flashmoe_stream/quant/_qdot.c); pyproject.toml holds the metadata.

The extension is optional: where no C compiler works, the install goes on without it and the package
falls back to its torch kernels. It is compiled for this machine (-march=native) and without that flag
where the compiler refuses it.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = ["-O3", "-pthread", "-ffp-contract=off", "-std=c11", "-Wall"]
NATIVE = ["-march=native"]


class BuildExt(build_ext):
    def build_extension(self, ext):
        base = list(ext.extra_compile_args or [])
        try:
            ext.extra_compile_args = base + NATIVE
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - the compiler or assembler refuses -march=native
            self.warn(f"building {ext.name} with -march=native failed ({e}); building it without")
            ext.extra_compile_args = base
            super().build_extension(ext)


setup(
    ext_modules=[Extension("flashmoe_stream.quant._qdot", ["flashmoe_stream/quant/_qdot.c"],
                           extra_compile_args=FLAGS, extra_link_args=["-pthread"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
