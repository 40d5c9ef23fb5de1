"""The two usage examples of the original yet-another-retnet README, run as written there.

Only two things differ from the README: ``device="cpu"`` instead of ``"cuda"``, and the loop
bound equals the sequence length (the README loops to 32 over a 16-token input in the first
example, which would index past the end). Default ``assert_close`` tolerances, a few seeds.
"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_readme_multihead_retention_example(seed):
    torch.manual_seed(seed)

    from yet_another_retnet.retention import MultiheadRetention

    mhr = MultiheadRetention(embed_dim=32, num_heads=4, device="cpu")

    # input shape: (batch_size, seq_len, embed_dim)
    q = k = v = torch.randn(1, 16, 32, device="cpu")

    # Parallel retention
    y_parallel, _ = mhr.forward_parallel(q, k, v)

    # Recursive retention
    outputs = []
    prev_state = None
    for i in range(16):
        out, prev_state = mhr.forward_recurrent(q[:, i], k[:, i], v[:, i], prev_state)
        outputs.append(out)
    y_recursive = torch.stack(outputs, dim=1)

    # Check that outputs are equal
    torch.testing.assert_close(y_parallel, y_recursive)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_readme_functional_retention_example(seed):
    torch.manual_seed(seed)

    from yet_another_retnet.retention import retention_parallel, retention_recurrent

    # input shape: (batch_size, num_heads, seq_len, head_dim)
    q = k = v = torch.randn(1, 4, 32, 8, device="cpu")

    # Parallel retention
    y_parallel, _ = retention_parallel(q, k, v)

    # Recursive retention
    outputs = []
    prev_state = None
    for i in range(32):
        out, prev_state = retention_recurrent(q[:, :, i], k[:, :, i], v[:, :, i], prev_state)
        outputs.append(out)
    y_recursive = torch.stack(outputs, dim=2)

    # Check that outputs are equal
    torch.testing.assert_close(y_parallel, y_recursive)
