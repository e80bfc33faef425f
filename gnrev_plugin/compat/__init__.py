"""The private APIs gnrev-plugin relies on, one module per host, each with the version it was
checked against.

Everything here is a thin name for something a host library does not export publicly. When a
host changes, this is the one place to look: :mod:`.torch` (functorch internals and the
tensor-subclass switch used by the drop-in GN step's loss capture), :mod:`.curvlinops` (the
operator base classes of ``curvlinops._torch_base``), :mod:`.backpack` (BackPACK's
name-mangled table of module extensions and its ``_backpack_extend`` flag), :mod:`.torch_nn`
(``nn.Module`` internals: hook tables, the ``torch.compile`` wrapper's ``_orig_mod``) and
:mod:`.deepobs` (the TensorFlow import shim and the DeepOBS internals its runner relies on).
The package sits below everything else: core modules (``nn``, ``optim``, ``metrics``) and hosts
may import it; it imports only the host libraries (the layer contract in ``pyproject.toml``
enforces this).
"""
