"""The hooks a quantfmt plugin can implement.

A plugin is any module (built-in, installed distribution with an entry point in the
group "quantfmt", or a .py file in a plugins directory) that implements these hooks
with the `quantfmt.hookimpl` marker:

    import quantfmt

    @quantfmt.hookimpl
    def register_formats(register):
        register(MyFormat())
"""

from __future__ import annotations

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("quantfmt")
hookimpl = HookimplMarker("quantfmt")


@hookspec
def register_formats(register):
    """Register quantization formats.

    Call ``register(fmt)`` once per format, with an instance of a
    ``quantfmt.format.Format`` subclass. Its ``tag`` (1-4 characters of A-Z, 0-9, _)
    must not be taken by another plugin: a duplicate tag is refused with an error
    naming both plugins. Registering is cheap: do not compile kernels here.
    """
