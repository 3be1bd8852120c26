"""The README's tested snippet runs and its custom guide gives a sensible log p(x)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _tested_blocks() -> list[str]:
    text = README.read_text()
    return re.findall(r"<!-- tested by tests/test_readme.py -->\n```python\n(.*?)```", text, re.S)


def test_custom_guide_snippet_trains_and_scores(capsys):
    (code,) = _tested_blocks()
    assert len(code.strip().splitlines()) < 20, "the README promises fewer than 20 lines"
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    value = float(capsys.readouterr().out.strip().splitlines()[-1])
    # the importance-sampled log p(x) is above the guide's own ELBO on the same points
    from ppl_vae.importance import log_likelihood

    r = log_likelihood(
        scope["model"], scope["guide"], scope["data"].test, num_samples=1000, diagnostics=True
    )
    assert abs(r.log_px.mean().item() - value) < 0.05
    assert r.elbo.mean() < r.log_px.mean() < 0.0
