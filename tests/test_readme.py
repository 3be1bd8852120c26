"""The README's Python snippets run: the quickstart trains, the custom guide scores sensibly."""

import re
from pathlib import Path

import torch
from helpers import needs_mnist

README = Path(__file__).resolve().parents[1] / "README.md"


def _tested_blocks() -> list[str]:
    text = README.read_text()
    return re.findall(r"<!-- tested by tests/test_readme.py -->\n```python\n(.*?)```", text, re.S)


@needs_mnist
def test_quickstart_trains_a_vae_on_mnist(capsys):
    quickstart, _, _ = _tested_blocks()
    assert "TrainConfig(epochs=5)" in quickstart
    code = quickstart.replace("TrainConfig(epochs=5)", "TrainConfig(epochs=1)")  # CI's budget
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    elbo = float(capsys.readouterr().out.strip().splitlines()[-1])
    # one epoch of the 784-200-200-50 VAE: near -180 nats; an untrained one is below -540
    assert -230 < elbo < -130
    assert scope["images"].shape == (16, 1, 28, 28)


def test_own_data_snippet_splits_and_trains():
    _, code, _ = _tested_blocks()
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    data, metrics = scope["data"], scope["metrics"]
    assert data.train.shape == (900, 1, 12, 12) and data.test_labels.shape == (100,)
    assert data.encoding == "dynamic" and [m["epoch"] for m in metrics] == [1, 2]
    # 144 pixels of uniform intensities: a Bernoulli(1/2) decoder scores 144 ln 2 = 99.8 nats
    # per image, and no model beats the binarization's entropy, 144 E[H(U)] = 144/2 = 72 nats
    assert -99.8 - 5 < metrics[-1]["test_elbo"] < -72 + 2


def test_custom_guide_snippet_trains_and_scores(capsys):
    _, _, code = _tested_blocks()
    assert len(code.strip().splitlines()) < 20, "the README promises fewer than 20 lines"
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    value = float(capsys.readouterr().out.strip().splitlines()[-1])
    # the importance-sampled log p(x) is above the guide's own ELBO on the same points
    from ppl_vae.importance import log_likelihood_diagnostics

    r = log_likelihood_diagnostics(
        scope["model"], scope["guide"], scope["data"].test, num_samples=1000
    )
    assert abs(r.log_px.mean().item() - value) < 0.05
    assert r.elbo.mean() < r.log_px.mean() < 0.0
