"""The CPU fast paths: C++ kernels that replace chains of PyTorch ops on CPU tensors.

The math lives one level up in plain PyTorch (:mod:`yet_another_retnet.ops`); every kernel here
computes the same thing as a reference written in PyTorch ops, runs only where it applies, and
falls back to that reference everywhere else. One module per kernel family, each holding:

- its Python wrapper (the function callers use: the kernel where it applies, else the reference);
- ``supports(...)``: a pure predicate, whether the kernel takes these inputs. It never builds the
  extension (it says "yes" before the first build, as long as nothing has ruled the kernels out);
  the wrapper builds it on first use;
- ``register()``: the op's shape-only form (so ``torch.compile`` can trace through it) and its
  autograd, registered once the library is loaded (:mod:`._extension`);
- the reference it is tested against, named in its docstring (``*_reference`` functions).

Its C++ sits beside it in ``csrc/``, each ``.cpp`` named like its module:

============================  ==============================================  =====================================
module                        what it fuses                                   reference
============================  ==============================================  =====================================
:mod:`.gemv`                  a decoding step's matrix-vector product         ``torch.mv`` / ``torch.addmv``
:mod:`.chunk_scan`            the chunk-state recurrence of chunkwise         the decay-matrix product
                              retention
:mod:`.chunk_kernels`         the per-chunk products, and both with the scan  ``chunk_*_reference``
                              as one op
:mod:`.norm_gate`             the head norm and swish gate                    ``norm_gate_reference``
:mod:`.split_heads`           the projection's split into rotated heads       ``split_heads_reference``
:mod:`.retention_core`        the three above as one op per layer             ``retention_core_reference``
:mod:`.mlp`                   the GELU feed-forward network's autograd node   ``gelu_mlp_reference``
:mod:`.matmul`                the products' backend (oneDNN or ATen) and a    ``F.linear`` / ``x.t().contiguous()``
                              transposed copy
:mod:`.memory`                a cache of large CPU buffers across steps       the plain allocator
:mod:`.decode_step`           a whole decoder layer for one token per row     ``retention_step_reference`` and the
                                                                              layer's PyTorch step
============================  ==============================================  =====================================

Switches (environment, read once per process):

- ``YARETNET_FAST_PATH=0`` turns every kernel here off: the plain PyTorch path everywhere
  (``YARETNET_CPU_KERNELS=0`` is its deprecated alias).
- ``YARETNET_CPU_MATMUL=aten|onednn`` fixes the backend of large float32 products
  (:mod:`.matmul`; by default measured once per machine).
- ``YARETNET_CPU_MARCH`` (default ``native``) is the ``-march`` the kernels are built for.

``retnet info --kernels`` (:mod:`.report`) says which of these paths this machine takes and why not.
"""
