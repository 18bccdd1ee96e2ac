"""The k:n layout: groups along input channels at each kernel position, consistent everywhere."""

from __future__ import annotations

import pytest
import torch

from mp_plugin.errors import PatternError
from mp_plugin.layers.calibration import layer_input_rows
from mp_plugin.layers.layout import from_kn_matrix, kn_eligible, kn_input_columns, kn_matrix, kn_width


@pytest.mark.parametrize("shape", [(6, 8), (6, 8, 3), (6, 8, 3, 2), (6, 4, 1, 1)])
def test_kn_matrix_round_trips_and_puts_channels_last(shape: tuple[int, ...]) -> None:
    w = torch.randn(*shape)
    mat = kn_matrix(w)
    area = int(torch.tensor(shape[2:]).prod()) if len(shape) > 2 else 1
    assert mat.shape == (shape[0], area * shape[1])
    assert torch.equal(from_kn_matrix(mat, w.shape), w)
    # column p·C + c is channel c at kernel position p
    flat = w.reshape(shape[0], shape[1], -1)
    for p in range(area):
        assert torch.equal(mat[:, p * shape[1] : (p + 1) * shape[1]], flat[:, :, p])


@pytest.mark.parametrize("groups", [1, 2])
def test_reordered_inputs_times_kn_matrix_is_the_conv(groups: int) -> None:
    """kn_input_columns and kn_matrix describe the same columns: their product is the conv output."""
    conv = torch.nn.Conv2d(8, 6, (3, 2), padding=1, groups=groups, bias=False)
    x = torch.randn(2, 8, 7, 5)
    rows = kn_input_columns(layer_input_rows(conv, x), 8, groups)  # (B·L, C_in·kh·kw)
    per = rows.shape[1] // groups
    outs = []
    w = conv.weight.detach()
    for q in range(groups):
        wq = kn_matrix(w[q * 6 // groups : (q + 1) * 6 // groups])
        outs.append(rows[:, q * per : (q + 1) * per] @ wq.T)
    got = torch.cat(outs, 1)
    with torch.no_grad():
        want = conv(x)
    assert torch.allclose(got, want.flatten(2).transpose(1, 2).reshape(-1, 6), atol=1e-5)


def test_eligibility_is_about_input_channels() -> None:
    assert kn_width((16, 8, 3, 3)) == 8
    assert kn_eligible((16, 8, 3, 3), 4)
    assert not kn_eligible((16, 6, 2, 2), 4)  # 24 flattened inputs, but 6 channels
    assert kn_eligible((16, 12), 4)
    with pytest.raises(PatternError):
        kn_width((16,))
    with pytest.raises(PatternError):
        kn_input_columns(torch.randn(3, 10), 4)
