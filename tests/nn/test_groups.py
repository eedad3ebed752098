"""Exact permutation representations: torch.rot90/roll/flip identities, permutation structure, group laws."""

from __future__ import annotations

import pytest
import torch

from symkernels import groups

KERNEL_SIZES = [1, 2, 3, 5, 7]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_permutations(stack: torch.Tensor) -> None:
    assert stack.dim() == 3 and stack.shape[-1] == stack.shape[-2]
    assert bool(((stack == 0) | (stack == 1)).all())
    assert bool((stack.sum(-1) == 1).all())
    assert bool((stack.sum(-2) == 1).all())


def _keys(stack: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(m.argmax(-1).tolist()) for m in stack]


def _closure(generators: torch.Tensor) -> torch.Tensor:
    """All products of the generators (a finite group), as a stack; identity first."""
    d = generators.shape[-1]
    elements = {_keys(torch.eye(d)[None])[0]: torch.eye(d)}
    frontier = [torch.eye(d)]
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                p = g @ a
                key = _keys(p[None])[0]
                if key not in elements:
                    elements[key] = p
                    new.append(p)
        frontier = new
    return torch.stack(list(elements.values()))


def _assert_closed(stack: torch.Tensor) -> None:
    keys = set(_keys(stack))
    assert tuple(range(stack.shape[-1])) in keys  # identity
    products = (stack[:, None] @ stack[None, :]).reshape(-1, *stack.shape[-2:])
    assert set(_keys(products)) <= keys


# --- 2D rotations -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_rotation_matches_rot90(k: int) -> None:
    rot = groups.rotation_permutations(k)
    assert rot.shape == (4, k * k, k * k) and rot.dtype == torch.float32
    w = torch.randn(3, k, k, generator=_gen(k))
    for g in range(4):
        expected = torch.rot90(w, g, dims=(-2, -1)).reshape(3, -1)
        torch.testing.assert_close(w.reshape(3, -1) @ rot[g].T, expected, rtol=0, atol=0)
        torch.testing.assert_close(rot[g] @ w[0].flatten(), expected[0], rtol=0, atol=0)


@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_rotation_subgroups(k: int) -> None:
    w = torch.randn(k, k, generator=_gen(1))
    half = groups.rotation_permutations(k, order=2)
    assert half.shape == (2, k * k, k * k)
    for g in range(2):
        assert torch.equal(half[g] @ w.flatten(), torch.rot90(w, 2 * g).flatten())
    assert torch.equal(groups.rotation_permutations(k, order=1), torch.eye(k * k)[None])


@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_rotation_group_laws(k: int) -> None:
    rot = groups.rotation_permutations(k, dtype=torch.float64)
    _assert_permutations(rot)
    assert torch.equal(rot[0], torch.eye(k * k, dtype=torch.float64))
    assert torch.equal(torch.linalg.matrix_power(rot[1], 4), rot[0])
    for a in range(4):
        for b in range(4):
            assert torch.equal(rot[a] @ rot[b], rot[(a + b) % 4])
    _assert_closed(rot)


# --- shift-twist -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_shift_twist_matches_roll_and_rot90(k: int) -> None:
    st = groups.shift_twist(k)
    assert st.shape == (4, 4 * k * k, 4 * k * k)
    w = torch.randn(4, k, k, generator=_gen(k + 10))
    for g in range(4):
        expected = torch.rot90(torch.roll(w, g, dims=0), g, dims=(-2, -1)).flatten()
        assert torch.equal(st[g] @ w.flatten(), expected)


@pytest.mark.parametrize("k", [1, 3])
def test_shift_twist_order2(k: int) -> None:
    st = groups.shift_twist(k, order=2)
    assert st.shape == (2, 2 * k * k, 2 * k * k)
    w = torch.randn(2, k, k, generator=_gen(3))
    for g in range(2):
        expected = torch.rot90(torch.roll(w, g, dims=0), 2 * g, dims=(-2, -1)).flatten()
        assert torch.equal(st[g] @ w.flatten(), expected)


@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_shift_twist_group_laws(k: int) -> None:
    st = groups.shift_twist(k)
    _assert_permutations(st)
    assert torch.equal(st[0], torch.eye(4 * k * k))
    for a in range(4):
        for b in range(4):
            assert torch.equal(st[a] @ st[b], st[(a + b) % 4])
    assert len(set(_keys(st))) == 4  # the group-axis shift makes the action faithful even for k = 1
    _assert_closed(st)


def test_shift_twist_entry_formula() -> None:
    """R_g[(h, x), (h', x')] = 1 iff h' = h - g (mod 4) and x' = rot_g^-1(x)."""
    k = 3
    st = groups.shift_twist(k).reshape(4, 4, k * k, 4, k * k)
    rot = groups.rotation_permutations(k)
    for g in range(4):
        for h in range(4):
            for h2 in range(4):
                block = st[g, h, :, h2, :]
                assert torch.equal(block, rot[g] if h2 == (h - g) % 4 else torch.zeros_like(block))


# --- shifts, flips, dihedral --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_cyclic_shifts(n: int) -> None:
    shifts = groups.cyclic_shifts(n)
    assert shifts.shape == (n, n, n)
    _assert_permutations(shifts)
    v = torch.randn(n, generator=_gen(n))
    for s in range(n):
        assert torch.equal(shifts[s] @ v, torch.roll(v, s))
    for a in range(n):
        for b in range(n):
            assert torch.equal(shifts[a] @ shifts[b], shifts[(a + b) % n])
    _assert_closed(shifts)


@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_flip(k: int) -> None:
    flips = groups.flip_permutations(k)
    assert flips.shape == (2, k * k, k * k)
    _assert_permutations(flips)
    w = torch.randn(k, k, generator=_gen(k))
    assert torch.equal(flips[0], torch.eye(k * k))
    assert torch.equal(flips[1] @ w.flatten(), torch.flip(w, dims=(-1,)).flatten())
    assert torch.equal(flips[1] @ flips[1], flips[0])


@pytest.mark.parametrize("k", KERNEL_SIZES)
def test_dihedral(k: int) -> None:
    dih = groups.dihedral_permutations(k)
    assert dih.shape == (8, k * k, k * k)
    _assert_permutations(dih)
    assert torch.equal(dih[:4], groups.rotation_permutations(k))
    w = torch.randn(k, k, generator=_gen(k + 20))
    for m in range(2):
        for r in range(4):
            flipped = torch.flip(w, dims=(-1,)) if m else w
            assert torch.equal(dih[m * 4 + r] @ w.flatten(), torch.rot90(flipped, r).flatten())
    _assert_closed(dih)
    if k >= 2:
        assert len(set(_keys(dih))) == 8


def test_dihedral_order2() -> None:
    dih = groups.dihedral_permutations(3, order=2)
    assert dih.shape == (4, 9, 9)
    _assert_closed(dih)
    assert len(set(_keys(dih))) == 4


# --- cube ---------------------------------------------------------------------------------------------------


def _coordinate_map(perm: torch.Tensor, size: int = 3) -> torch.Tensor:
    """The linear map on centred (z, y, x) coordinates realised by a permutation of a size³ grid."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(size),) * 3, indexing="ij"), -1).reshape(-1, 3) * 2
    coords = coords - (size - 1)
    src = perm.argmax(-1)  # out[x] = in[src[x]]: the element moves src[x] to x
    # Solve moved = Q @ source by least squares over all cells, then check it is exact.
    q = torch.linalg.lstsq(coords[src].double(), coords.double()).solution.T
    assert torch.allclose(coords[src].double() @ q.T, coords.double())
    return q.round()


def test_cube_rotations() -> None:
    cube = groups.cube_rotations()
    assert cube.shape == (24, 27, 27) and cube.dtype == torch.float32
    _assert_permutations(cube)
    assert torch.equal(cube[0], torch.eye(27))
    assert len(set(_keys(cube))) == 24
    _assert_closed(cube)
    dets = torch.stack([torch.linalg.det(_coordinate_map(p)) for p in cube])
    assert torch.equal(dets, torch.ones(24, dtype=torch.float64))  # proper rotations only


def test_cube_rotations_are_the_rotation_subgroup_of_the_full_octahedral_group() -> None:
    cube = groups.cube_rotations()
    v = torch.arange(27).reshape(3, 3, 3)
    eye = torch.eye(27)

    def as_matrix(moved: torch.Tensor) -> torch.Tensor:
        return eye[moved.flatten()]

    quarter_turns = torch.stack(
        [as_matrix(torch.rot90(v, 1, dims=(1, 2))), as_matrix(torch.rot90(v, 1, dims=(0, 1)))]
    )
    assert set(_keys(_closure(quarter_turns))) == set(_keys(cube))
    full = _closure(torch.cat([quarter_turns, as_matrix(torch.flip(v, dims=(2,)))[None]]))
    assert full.shape[0] == 48
    proper = {
        key for key, p in zip(_keys(full), full, strict=True) if torch.linalg.det(_coordinate_map(p)) > 0
    }
    assert proper == set(_keys(cube))


@pytest.mark.parametrize("size", [2, 4])
def test_cube_rotations_other_sizes(size: int) -> None:
    cube = groups.cube_rotations(size, dtype=torch.float64)
    assert cube.shape == (24, size**3, size**3) and cube.dtype == torch.float64
    _assert_permutations(cube)
    assert len(set(_keys(cube))) == 24
    _assert_closed(cube)
    # Same group elements in the same order as on the 3x3x3 grid.
    maps3 = [_coordinate_map(p) for p in groups.cube_rotations()]
    for q3, p in zip(maps3, cube, strict=True):
        assert torch.equal(_coordinate_map(p, size), q3)


def test_cube_rotations_size1() -> None:
    assert torch.equal(groups.cube_rotations(1), torch.ones(24, 1, 1))


def test_cube_rotation_names_follow_rot90() -> None:
    names = groups.cube_rotation_names()
    cube = groups.cube_rotations()
    v = torch.randn(3, 3, 3, generator=_gen(5))
    cases = {"z:90": (-2, -1), "x:90": (-3, -2), "y:90": (-1, -3), "z:270": (-1, -2)}
    for name, dims in cases.items():
        assert torch.equal(cube[names.index(name)] @ v.flatten(), torch.rot90(v, 1, dims=dims).flatten())
    for turns in (2, 3):
        for name, dims in (("z", (-2, -1)), ("x", (-3, -2)), ("y", (-1, -3))):
            label = f"{name}:{90 * turns}"
            assert torch.equal(
                cube[names.index(label)] @ v.flatten(), torch.rot90(v, turns, dims=dims).flatten()
            )


# --- names, dtype, arguments --------------------------------------------------------------------------------


def test_names() -> None:
    assert groups.rotation_names() == ["rot0", "rot90", "rot180", "rot270"]
    assert groups.rotation_names(2) == ["rot0", "rot180"]
    assert groups.rotation_names(1) == ["rot0"]
    assert groups.shift_names(3) == ["shift0", "shift1", "shift2"]
    assert groups.flip_names() == ["id", "flip"]
    dih = groups.dihedral_names()
    assert len(dih) == 8 and len(set(dih)) == 8 and dih[:4] == groups.rotation_names()
    assert dih[5] == "flip_rot90"
    assert len(groups.dihedral_names(2)) == groups.dihedral_permutations(3, 2).shape[0]
    cube = groups.cube_rotation_names()
    assert len(cube) == 24 and len(set(cube)) == 24 and cube[0] == "id"
    kinds = sorted(name.split(":")[-1] for name in cube[1:])
    assert kinds.count("90") == 3 and kinds.count("270") == 3  # the three face axes
    assert kinds.count("180") == 3 + 6 and kinds.count("120") == 4 and kinds.count("240") == 4
    assert len(groups.shift_names(7)) == groups.cyclic_shifts(7).shape[0]


def test_dtype_and_device_keywords() -> None:
    for stack in (
        groups.rotation_permutations(3, dtype=torch.float64),
        groups.shift_twist(2, dtype=torch.float64),
        groups.cyclic_shifts(4, dtype=torch.float64),
        groups.flip_permutations(3, dtype=torch.float64),
        groups.dihedral_permutations(3, dtype=torch.float64),
        groups.cube_rotations(dtype=torch.float64, device="cpu"),
    ):
        assert stack.dtype == torch.float64 and stack.device.type == "cpu"
    for stack in (
        groups.rotation_permutations(2, dtype=torch.bool),
        groups.dihedral_permutations(2, dtype=torch.int64),
        groups.cube_rotations(2, dtype=torch.bool),
    ):
        assert stack.dtype in (torch.bool, torch.int64)
        assert bool((stack.sum(-1) == 1).all())


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: groups.rotation_permutations(0), ValueError, "kernel_size"),
        (lambda: groups.rotation_permutations(-3), ValueError, "kernel_size"),
        (lambda: groups.rotation_permutations(3.0), TypeError, "kernel_size"),
        (lambda: groups.rotation_permutations(True), TypeError, "kernel_size"),
        (lambda: groups.rotation_permutations(3, order=3), ValueError, "order"),
        (lambda: groups.rotation_permutations(3, order=8), ValueError, "order"),
        (lambda: groups.rotation_permutations(3, order=0), ValueError, "order"),
        (lambda: groups.rotation_permutations(3, order="4"), TypeError, "order"),
        (lambda: groups.shift_twist(0), ValueError, "kernel_size"),
        (lambda: groups.shift_twist(3, order=6), ValueError, "order"),
        (lambda: groups.cyclic_shifts(0), ValueError, "n"),
        (lambda: groups.cyclic_shifts(2.5), TypeError, "n"),
        (lambda: groups.flip_permutations(0), ValueError, "kernel_size"),
        (lambda: groups.dihedral_permutations(3, order=5), ValueError, "order"),
        (lambda: groups.cube_rotations(0), ValueError, "size"),
        (lambda: groups.rotation_names(3), ValueError, "order"),
        (lambda: groups.dihedral_names(8), ValueError, "order"),
        (lambda: groups.shift_names(0), ValueError, "n"),
    ],
)
def test_bad_arguments(call, error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=name):
        call()


def test_numpy_integers_accepted() -> None:
    np = pytest.importorskip("numpy")
    assert torch.equal(groups.rotation_permutations(np.int64(3)), groups.rotation_permutations(3))
