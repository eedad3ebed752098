"""The paper's toy task, CI-sized: a digit in a random quadrant of a 16×16 canvas, FC+CONV layers.

With the digit as the label (10 classes) translation helps and the CONV path should win every layer; with
digit × quadrant (40 classes) position matters, and since the CONV paths and the global pool cannot see where
the digit is, an FC path should win in a later layer. Three seeds per label, about 20 s each on one core.
"""

import time

import pytest

from tests.testing import require_extras

require_extras("train", "layerwise")

from symkernels.layerwise import LayerwiseConfig, train_layerwise  # noqa: E402

# Sized for CI: 500 scikit-learn digits, three blocks 16→8→4→2 (α = 4), SGD at lr 0.3 for 70 epochs, the
# marginal likelihood every 5 epochs after 5 (one-sample Monte-Carlo Fisher: one backward pass per fit).
TOY = {
    "source": "digits",
    "model": "fc-conv",
    "size": 16,
    "width": 4,
    "blocks": "1:2,2:2,2:2",
    "epochs": 70,
    "batch_size": 32,
    "lr": 0.3,
    "burn_in": 5,
    "marglik_every": 5,
    "fisher": "mc",
    "train_limit": 500,
    "test_limit": 100,
}
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def winners(tmp_path_factory):
    """``{(task, seed): [winner per layer]}`` and the final shares, from six runs."""
    start = time.perf_counter()
    results = {}
    for task in ("quadrant10", "quadrant40"):
        for seed in SEEDS:
            config = LayerwiseConfig.create(task=task, seed=seed, **TOY)
            out = tmp_path_factory.mktemp(f"{task}-{seed}")
            result = train_layerwise(config, out, threads=1, quiet=True)
            results[task, seed] = result.final_layers
    print(f"six toy runs: {time.perf_counter() - start:.1f} s")
    return results


def _summary(layers) -> str:
    return " | ".join(
        f"{name}: " + ", ".join(f"{p}={entry['share']:.2f}" for p, entry in layer["paths"].items())
        for name, layer in layers.items()
    )


def test_conv_wins_every_layer_when_the_label_is_the_digit(winners):
    for seed in SEEDS:
        layers = winners["quadrant10", seed]
        assert all(layer["winner"] == "conv" for layer in layers.values()), f"seed {seed}: {_summary(layers)}"


def test_fc_wins_a_later_layer_when_the_label_needs_the_quadrant(winners):
    for seed in SEEDS:
        layers = list(winners["quadrant40", seed].values())
        assert any(layer["winner"] == "fc" for layer in layers[1:]), (
            f"seed {seed}: {_summary(dict(enumerate(layers)))}"
        )
