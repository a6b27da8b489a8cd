"""ptemu: emulate guest writes to write-protected x86 page tables.

The handler an introspection engine calls from its EPT write-violation exit
is `ptemu.handler.PtWriteHandler`; see the README for a tour.
"""

__version__ = "0.1.0"
