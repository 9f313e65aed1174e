"""The native part of the package: pyproject.toml holds the project's metadata; this file
only declares the C extension (setuptools reads both).

``appliance.protocol._sigcheck`` is the signed device request check in C, linked to
OpenSSL's libcrypto (building it needs a C compiler, Python's headers and libssl-dev).
Without it the appliance runs the Python check (docs/architecture.md, "Signed device
requests"), so a build that cannot compile it still installs: ``optional=True``.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "appliance.protocol._sigcheck",
            sources=["appliance/protocol/_sigcheck.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
