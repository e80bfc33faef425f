"""The private APIs gnrev-plugin relies on, one module per host, each with the version it was
checked against.

Everything here is a thin name for something a host library does not export publicly. When a
host changes, this is the one place to look: :mod:`.torch` (functorch internals and the
tensor-subclass switch used by the drop-in GN step's loss capture), :mod:`.curvlinops` (the
operator base classes of ``curvlinops._torch_base``) and :mod:`.backpack` (BackPACK's
name-mangled table of module extensions). The package sits below everything else: core modules
(``nn``, ``optim``, ``metrics``) and hosts may import it; it imports only the host libraries.
"""
