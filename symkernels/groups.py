"""Exact permutation representations of small symmetry groups acting on flattened kernels and signals.

Every function returns a stack of 0/1 permutation matrices ``P`` of shape ``[|G|, d, d]`` (float32 unless
``dtype=`` says otherwise) acting on column vectors: ``P[g] @ v`` is the transformed signal, and
``P[g][x, x'] = 1`` iff ``x'`` is the position that element ``g`` moves to ``x``. Grids are flattened
row-major: a ``k x k`` kernel as ``(ky, kx)``, a ``[G, k, k]`` group-conv kernel as ``(h, ky, kx)``, a cube as
``(z, y, x)``. Rotations follow :func:`torch.rot90` on the last two axes ("counter-clockwise").

Each ``*_names`` function lists short labels in the same order as the matching stack.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from symkernels._checks import check_int

__all__ = [
    "cube_rotation_names",
    "cube_rotations",
    "cyclic_shifts",
    "dihedral_names",
    "dihedral_permutations",
    "flip_names",
    "flip_permutations",
    "rotation_names",
    "rotation_permutations",
    "shift_names",
    "shift_twist",
]

# Rotation orders realisable on a square grid, mapped to the number of quarter turns of the generator.
_QUARTER_TURNS = {1: 0, 2: 2, 4: 1}


def _check_order(order: object) -> int:
    order = check_int("order", order)
    if order not in _QUARTER_TURNS:
        raise ValueError(
            f"order must be 1, 2 or 4 (rotations of a square grid by multiples of 90 degrees), got {order}"
        )
    return order


def _from_sources(
    sources: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device | str | None
) -> torch.Tensor:
    """Source-index tables ``[d]`` (``out[x] = in[src[x]]``) -> permutation matrices ``[len, d, d]``."""
    src = torch.stack([s.reshape(-1) for s in sources])
    d = src.shape[-1]
    eye = torch.eye(d, dtype=dtype, device=device)
    return eye[src.to(device=eye.device)]


def _grid(*shape: int) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n).reshape(shape)


def rotation_permutations(
    kernel_size: int,
    order: int = 4,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rotations of a ``k x k`` grid: ``[order, k², k²]``.

    Element ``g`` rotates by ``g * 360 / order`` degrees counter-clockwise, so for ``order=4``
    ``P[g] @ w.flatten() == torch.rot90(w, g, dims=(-2, -1)).flatten()``. ``order`` is 1, 2 or 4.
    """
    k = check_int("kernel_size", kernel_size)
    order = _check_order(order)
    grid = _grid(k, k)
    step = _QUARTER_TURNS[order]
    return _from_sources([torch.rot90(grid, g * step, dims=(0, 1)) for g in range(order)], dtype, device)


def shift_twist(
    kernel_size: int,
    order: int = 4,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Regular action of the rotations on a ``[order, k, k]`` kernel: ``[order, order·k², order·k²]``.

    Element ``g`` cyclically shifts the group axis by ``g`` and rotates space by ``g * 360 / order`` degrees;
    for ``order=4``:
    ``P[g] @ W.flatten() == torch.rot90(torch.roll(W, g, dims=0), g, dims=(-2, -1)).flatten()``.
    """
    k = check_int("kernel_size", kernel_size)
    order = _check_order(order)
    grid = _grid(order, k, k)
    step = _QUARTER_TURNS[order]
    sources = [torch.rot90(torch.roll(grid, g, dims=0), g * step, dims=(1, 2)) for g in range(order)]
    return _from_sources(sources, dtype, device)


def cyclic_shifts(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Cyclic shifts of a length-``n`` signal: ``[n, n, n]`` with ``P[s] @ v == torch.roll(v, s)``."""
    n = check_int("n", n)
    line = torch.arange(n)
    return _from_sources([torch.roll(line, s) for s in range(n)], dtype, device)


def flip_permutations(
    kernel_size: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Identity and horizontal flip of a ``k x k`` grid: ``[2, k², k²]``; ``P[1] @ w.flatten() ==
    torch.flip(w, dims=(-1,)).flatten()``."""
    k = check_int("kernel_size", kernel_size)
    grid = _grid(k, k)
    return _from_sources([grid, torch.flip(grid, dims=(1,))], dtype, device)


def dihedral_permutations(
    kernel_size: int,
    order: int = 4,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Dihedral group of ``order`` rotations and their reflections: ``[2·order, k², k²]``.

    Index ``m * order + r`` is ``rot^r ∘ flip^m`` (the horizontal flip applied first, then the rotation),
    so the first ``order`` elements equal :func:`rotation_permutations`.
    """
    k = check_int("kernel_size", kernel_size)
    order = _check_order(order)
    grid = _grid(k, k)
    step = _QUARTER_TURNS[order]
    sources = [
        torch.rot90(torch.flip(grid, dims=(1,)) if m else grid, r * step, dims=(0, 1))
        for m in range(2)
        for r in range(order)
    ]
    return _from_sources(sources, dtype, device)


# Generators of the cube's rotations acting on a (z, y, x) volume: quarter turns in the y-x and z-y planes.
_CUBE_GENERATORS: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = (
    lambda v: torch.rot90(v, 1, dims=(1, 2)),
    lambda v: torch.rot90(v, 1, dims=(0, 1)),
)


@functools.cache
def _cube_words() -> tuple[tuple[int, ...], ...]:
    """The 24 rotations as shortest generator words, in breadth-first order from the identity.

    Computed on the 3x3x3 grid, where the action is faithful (the corners alone tell all rotations apart).
    """
    start = _grid(3, 3, 3)
    seen = {tuple(start.flatten().tolist()): ()}
    queue = [(start, ())]
    words: list[tuple[int, ...]] = [()]
    while queue:
        volume, word = queue.pop(0)
        for i, generator in enumerate(_CUBE_GENERATORS):
            moved = generator(volume)
            key = tuple(moved.flatten().tolist())
            if key not in seen:
                seen[key] = word + (i,)
                words.append(word + (i,))
                queue.append((moved, word + (i,)))
    assert len(words) == 24
    return tuple(words)


def _apply_word(volume: torch.Tensor, word: tuple[int, ...]) -> torch.Tensor:
    for i in word:
        volume = _CUBE_GENERATORS[i](volume)
    return volume


def cube_rotations(
    size: int = 3, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The 24 proper rotations of a ``size³`` voxel grid flattened as ``(z, y, x)``: ``[24, size³, size³]``.

    Identity first, then breadth-first over products of quarter turns in the y-x plane
    (``torch.rot90(v, 1, dims=(-2, -1))``) and the z-y plane (``torch.rot90(v, 1, dims=(-3, -2))``).
    For ``size=1`` all 24 matrices are the 1x1 identity.
    """
    n = check_int("size", size)
    grid = _grid(n, n, n)
    return _from_sources([_apply_word(grid, w) for w in _cube_words()], dtype, device)


def _axis_label(axis: Sequence[int]) -> str:
    """``(x, y, z)`` signs -> e.g. ``"x-y+z"``."""
    label = ""
    for sign, letter in zip(axis, "xyz", strict=True):
        if sign:
            label += ("-" if sign < 0 else ("+" if label else "")) + letter
    return label


def _rotation_label(q: torch.Tensor) -> str:
    """Axis-angle label of an integer 3x3 rotation ``q`` given in the right-handed frame ``(z, y, x)``."""
    trace = int(q.trace())
    if trace == 3:
        return "id"
    if trace == -1:  # half turn: q = 2 u uT - I
        sym = q + torch.eye(3, dtype=q.dtype)
        axis = torch.sign(sym[:, int(sym.diagonal().argmax())])
        angle = 180
    else:  # quarter turns (trace 1), third turns (trace 0): the skew part is sin(angle) [u]x
        axis = torch.sign(torch.stack([q[2, 1] - q[1, 2], q[0, 2] - q[2, 0], q[1, 0] - q[0, 1]]))
        angle = 90 if trace == 1 else 120
    xyz = [int(c) for c in axis.flip(0)]
    if next(c for c in xyz if c) < 0:  # write the axis with its first (x, y, z) component positive
        xyz = [-c for c in xyz]
        angle = 360 - angle
    return f"{_axis_label(xyz)}:{angle}"


@functools.cache
def _cube_labels() -> tuple[str, ...]:
    labels = []
    # Centred (z, y, x) coordinates of the 3x3x3 cells.
    zyx = torch.stack(torch.meshgrid(*(torch.arange(3),) * 3, indexing="ij"), dim=-1).reshape(27, 3) - 1
    grid = _grid(3, 3, 3)
    # Flat index of the cell one step from the centre along z, y and x.
    units = [13 + 9, 13 + 3, 13 + 1]
    for word in _cube_words():
        src = _apply_word(grid, word).flatten()  # out[p] = in[src[p]]: the rotation moves cell src[p] to p
        dest = torch.empty(27, dtype=torch.long)
        dest[src] = torch.arange(27)
        labels.append(_rotation_label(torch.stack([zyx[dest[u]] for u in units], dim=1)))
    assert len(set(labels)) == 24
    return tuple(labels)


def rotation_names(order: int = 4) -> list[str]:
    """Labels of :func:`rotation_permutations`: ``["rot0", "rot90", "rot180", "rot270"]`` for ``order=4``."""
    order = _check_order(order)
    return [f"rot{g * 360 // order}" for g in range(order)]


def shift_names(n: int) -> list[str]:
    """Labels of :func:`cyclic_shifts`: ``["shift0", ..., f"shift{n-1}"]``."""
    n = check_int("n", n)
    return [f"shift{s}" for s in range(n)]


def flip_names() -> list[str]:
    """Labels of :func:`flip_permutations`: ``["id", "flip"]``."""
    return ["id", "flip"]


def dihedral_names(order: int = 4) -> list[str]:
    """Labels of :func:`dihedral_permutations`: the rotation names, then ``"flip_rot{angle}"`` (flip, then
    rotate)."""
    rotations = rotation_names(order)
    return rotations + [f"flip_{name}" for name in rotations]


def cube_rotation_names() -> list[str]:
    """Labels of :func:`cube_rotations`: ``"id"``, then ``"{axis}:{angle}"``, e.g. ``"z:90"``, ``"x+y:180"``,
    ``"x-y+z:240"``.

    The axis is written in (x, y, z) coordinates (x the last, fastest index of the ``(z, y, x)`` volume)
    with its first non-zero component positive. Angles turn the way :func:`torch.rot90` does: ``"z:90"`` is
    ``torch.rot90(v, 1, dims=(-2, -1))`` (y towards x), ``"x:90"`` is ``dims=(-3, -2)`` (z towards y) and
    ``"y:90"`` is ``dims=(-1, -3)`` (x towards z).
    """
    return list(_cube_labels())
