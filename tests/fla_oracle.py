"""fla's own ``RetNetForCausalLM`` on a CPU: its GPU kernels replaced by its pure-PyTorch references.

fla 0.6.0 imports on a CPU but its Triton kernels need a GPU driver. What its RetNet calls and what
stands in (fla's own references, or plain PyTorch with the kernel's formula):

- retention (``chunk``/``fused_chunk``/``fused_recurrent``/``parallel_retention``):
  ``fla.ops.retention.naive.naive_retention`` (float32 as shipped; :func:`naive_retention_f64`
  follows it line for line in float64);
- rotary: ``fla.modules.rotary.ops.rotary_embedding_ref`` on the module's own cos/sin tables;
- the head RMSNorm (fla's Triton ``RMSNorm`` with ``fuse_norm=False``): ``torch.nn.RMSNorm``;
- SwiGLU: ``x * sigmoid(x) * y``, the kernel's formula. Block norms: ``torch.nn.RMSNorm`` already
  (``fuse_norm=False``).

Only the oracle's config sets ``fuse_norm``/``fuse_swiglu``/``fuse_cross_entropy`` off; the
checkpoints it writes are converted like real ones (their head norm key renamed to the fused name).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def naive_retention_f64(q, k, v):
    """``fla.ops.retention.naive.naive_retention`` with every float32 replaced by float64."""
    orig_type = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    _, n_heads, seq_len, d_head = q.shape
    s = (1 - q.new_tensor(2., dtype=torch.double).pow(-5. - q.new_tensor(range(n_heads), dtype=torch.double))).log2()
    n = q.new_tensor(range(seq_len), dtype=torch.double)
    n = torch.exp2((n.unsqueeze(-1) - n) * s.view(-1, 1, 1)) * n.unsqueeze(-1).ge(n)
    s = torch.einsum('bhqd,bhkd,hqk->bhqk', q * d_head ** -0.5, k, n.to(q.dtype))
    o = torch.einsum('bhqk,bhkd->bhqd', s, v)
    return o.to(orig_type)


@contextlib.contextmanager
def fla_on_cpu(float64: bool = False) -> Iterator[Any]:
    """Patch fla's kernels for references while the block runs; yields the ``fla`` module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fla
        import fla.layers.multiscale_retention as msr
        import fla.models
        import fla.modules.mlp as mlp
        import fla.modules.rotary.ops as rot
        from fla.ops.retention.naive import naive_retention
    core = naive_retention_f64 if float64 else naive_retention

    def retention(q, k, v, initial_state=None, output_final_state=False, cu_seqlens=None, **_):
        assert initial_state is None and cu_seqlens is None
        return core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2), None

    def rms_norm(hidden_size, elementwise_affine=True, eps=1e-5, dtype=None, **_):
        return nn.RMSNorm(hidden_size, eps=eps, elementwise_affine=elementwise_affine, dtype=dtype)

    def rotary(x, cos, sin, interleaved=False, seqlen_offsets=0, cu_seqlens=None, **_):
        assert cu_seqlens is None and isinstance(seqlen_offsets, int)
        length = x.shape[1]
        return rot.rotary_embedding_ref(x, cos[seqlen_offsets:seqlen_offsets + length],
                                        sin[seqlen_offsets:seqlen_offsets + length], interleaved)

    patches = [(msr, name, retention) for name in
               ("chunk_retention", "fused_chunk_retention", "fused_recurrent_retention", "parallel_retention")]
    patches += [(msr, "RMSNorm", rms_norm), (rot, "rotary_embedding", rotary),
                (mlp, "swiglu", lambda x, y: x * torch.sigmoid(x) * y)]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        import fla as fla_module
        yield fla_module
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def fla_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A tiny random ``fla.models.RetNetForCausalLM`` (build it inside :func:`fla_on_cpu`), eval
    mode; norm weights randomised so a path that ignores them cannot pass."""
    from fla.models import RetNetConfig, RetNetForCausalLM

    fields = {"hidden_size": 64, "num_heads": 4, "num_hidden_layers": 2, "vocab_size": 97, "hidden_ratio": 2,
              "fuse_norm": False, "fuse_swiglu": False, "fuse_cross_entropy": False, "norm_eps": 1e-6,
              **overrides}
    torch.manual_seed(seed)
    model = RetNetForCausalLM(RetNetConfig(**fields)).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
    return model


def fla_checkpoint_state(model: Any) -> dict[str, torch.Tensor]:
    """The state dict a real (``fuse_norm=True``) checkpoint stores for the oracle's weights."""
    return {k.replace("attn.g_norm.weight", "attn.g_norm_swish_gate.weight"): v
            for k, v in model.state_dict().items()}


def fla_checkpoint_config(model: Any) -> dict[str, Any]:
    data = model.config.to_dict()
    data.update(fuse_norm=True, fuse_swiglu=True, fuse_cross_entropy=True)
    return data


def fla_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
