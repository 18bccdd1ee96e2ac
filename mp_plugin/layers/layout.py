"""The k:n layout: which n weights of a layer form one group.

Sparse tensor cores (cuSPARSELt, TensorRT) and NVIDIA's own pruning tools
(apex ASP, ModelOpt's magnitude mode) group a weight along its **input-channel**
axis. For a Linear weight (C_out, C_in) a group is n consecutive inputs of a row.
For a conv weight (C_out, C_in/groups, kh, kw) a group is n consecutive input
channels at one kernel position (r, s) of one output channel, *not* n
consecutive entries of the flattened C_in·kh·kw row (which would mix kernel
positions of one channel, a pattern no sparse kernel accepts).

Every k:n computation in mp_plugin goes through this module:

* :func:`kn_matrix` — a weight as the 2-D (C_out, kh·kw·C_in/groups) matrix whose
  rows split into groups of n consecutive entries (position-major, channel-minor);
* :func:`from_kn_matrix` — the inverse, back to the weight's own shape;
* :func:`kn_width` — the length of the grouped axis (C_in/groups or in_features),
  which must be divisible by n;
* :func:`kn_input_columns` — reorders unfolded conv inputs (rows, C_in·kh·kw,
  channel-major as ``F.unfold`` gives them) into the same position-major order,
  so calibration covariances line up with :func:`kn_matrix` columns.

For a Linear or a 1×1 conv the layout is the identity.
"""

from __future__ import annotations

import torch

from mp_plugin.errors import PatternError

__all__ = ["kn_matrix", "from_kn_matrix", "kn_width", "kn_input_columns", "kn_eligible"]


def kn_width(shape: tuple[int, ...] | torch.Size) -> int:
    """Length of the grouped (input-channel) axis of a weight of ``shape``: ``shape[1]``."""
    if len(shape) < 2:
        raise PatternError(f"a k:n weight needs at least 2 dims, got shape {tuple(shape)}")
    return int(shape[1])


def kn_eligible(shape: tuple[int, ...] | torch.Size, n: int) -> bool:
    """Whether a weight of ``shape`` (C_out, C_in[/groups], *kernel) can take groups of ``n``."""
    return kn_width(shape) % n == 0


def kn_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The weight as (C_out, kh·kw·C_in/groups), input channels last (contiguous copy for convs).

    Column ``p·C + c`` holds kernel position p (row-major over kh, kw) of input
    channel c, so a k:n group is n consecutive columns = n channels at one position.
    """
    if weight.dim() < 2:
        raise PatternError(f"a k:n weight needs at least 2 dims, got shape {tuple(weight.shape)}")
    if weight.dim() == 2:
        return weight
    return weight.movedim(1, -1).reshape(weight.shape[0], -1)


def from_kn_matrix(matrix: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`kn_matrix`: a (C_out, kh·kw·C) matrix back to ``shape`` (C_out, C, *kernel)."""
    shape = tuple(shape)
    if len(shape) == 2:
        return matrix.reshape(shape)
    return matrix.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


def kn_input_columns(rows: torch.Tensor, in_channels: int, conv_groups: int = 1) -> torch.Tensor:
    """Reorder unfolded conv input rows from channel-major to the k:n layout.

    Args:
        rows: (R, C_in·kh·kw) as ``F.unfold`` lays them out (channel c owns
            columns c·kh·kw … c·kh·kw + kh·kw − 1).
        in_channels: C_in of the whole conv (all conv groups).
        conv_groups: the conv's ``groups``; conv group q keeps its contiguous block.

    Returns:
        (R, C_in·kh·kw): per conv group, position-major then channel, matching
        :func:`kn_matrix` of the weights that read that block.
    """
    r, width = rows.shape
    area = width // in_channels
    if area * in_channels != width or in_channels % conv_groups:
        raise PatternError(f"{width} input columns do not split into {in_channels} channels / {conv_groups} groups")
    if area == 1:
        return rows
    per = in_channels // conv_groups
    return rows.reshape(r, conv_groups, per, area).transpose(2, 3).reshape(r, width)
