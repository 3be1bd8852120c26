"""Every example runs end to end with --quick; the numbers it prints are checked."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, mnist_root


def final_test_elbo(out):
    # two epochs on 5k images: about -210 nats; an untrained decoder scores below -540
    elbo = float(re.search(r"final test ELBO (-?[\d.]+)", out).group(1))
    assert -260 < elbo < -150


def em_touches(out):
    gap = float(
        re.search(r"max \|bound after E-step - log-likelihood\|[^\d]*([\d.e+-]+)", out).group(1)
    )
    assert gap < 1e-6


def mixture_beats_one_gaussian(out):
    # ring8: 8 components fit the 8 clusters far better than one Gaussian
    k1 = float(re.search(r"\| ring8 \| GMM full K=1 \| (-?[\d.]+)", out).group(1))
    k8 = float(re.search(r"\| ring8 \| GMM full K=8 \| (-?[\d.]+)", out).group(1))
    assert k8 > k1 + 2


def em_and_vae_table(out):
    mixture_beats_one_gaussian(out)
    k1 = float(re.search(r"\| ring8 \| GMM full K=1 \| (-?[\d.]+)", out).group(1))
    k8 = float(re.search(r"\| ring8 \| GMM full K=8 \| (-?[\d.]+)", out).group(1))
    vae = float(re.search(r"\| ring8 \| VAE z=2, 2 epochs \| (-?[\d.]+) ± ([\d.]+)", out).group(1))
    # two epochs: the VAE is no better than the true model class, and not far below one Gaussian
    assert k1 - 1 < vae < k8
    assert "wrote " in out


def table_rows(out, columns):
    """The Markdown rows of ``out`` with ``columns`` cells, as lists of strings."""
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r] for r in rows if len(r) == columns and "---" not in r[0]]


def guides_compare(out):
    rows = {r[0]: r for r in table_rows(out, 7) if r[0] != "guide"}
    assert set(rows) == {"gaussian", "iaf", "full-cov"}

    def mean(cell):
        return float(cell.split("±")[0])

    for name, r in rows.items():
        elbo, log_px, gap, ess = mean(r[2]), mean(r[3]), mean(r[4]), float(r[5])
        assert -260 < elbo < log_px < -150, name  # an untrained decoder scores below -540
        assert abs(gap - (log_px - elbo)) < 0.02 and 0.1 < gap < 20, name
        assert 1 <= ess <= 100, name  # K = 100 draws
    gaussian = mean(rows["gaussian"][3])
    for other in ("iaf", "full-cov"):  # a richer guide is not far below the Gaussian one
        assert mean(rows[other][3]) > gaussian - 5, other


def sandwich(out):
    elbo = float(re.search(r"^ELBO (-?[\d.]+)", out, re.M).group(1))
    log_px = float(re.search(r"^log p\(x\) (-?[\d.]+)", out, re.M).group(1))
    rows = [[float(c) for c in r] for r in table_rows(out, 6) if r[0] != "k"]
    ks = [int(r[0]) for r in rows]
    bounds = [r[1] for r in rows]
    assert ks == [2**i for i in range(9)]  # 1 ... K = 256
    # from the same draws, IWAE_1 is the ELBO and IWAE_K the estimate of log p(x); with k a
    # power of 2 dividing K, each bound is at most the next one (printed to 3 decimals)
    assert abs(bounds[0] - elbo) < 2e-3 and abs(bounds[-1] - log_px) < 2e-3
    assert all(a <= b + 2e-3 for a, b in zip(bounds, bounds[1:], strict=False))
    assert 0.5 < log_px - elbo < 20 and -260 < elbo < -150
    for k, *_, ess, ratio in rows:  # 1 <= ESS of k draws <= k
        assert 1 - 1e-6 <= ess <= k + 1e-6 and ratio <= 1 + 1e-6
    assert rows[-1][4] > rows[0][4]


def latent_pictures(out):
    elbo = float(re.search(r"test ELBO (-?[\d.]+)", out).group(1))
    assert -190 < elbo < -140  # two epochs, z = 2: about -160; untrained below -540
    paths = re.search(r"wrote (\S+) and (\S+)", out).groups()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["latent_manifold.png", "latent_scatter.png"]
    assert all(Path(p).stat().st_size > 20_000 for p in paths)


# (script, arguments, what its output must show, needs MNIST)
EXAMPLES = [
    ("train_vae.py", ["--quick"], final_test_elbo, True),
    ("em_vs_svi.py", ["--quick", "--out", "{tmp}/em_vs_svi.png"], em_touches, False),
    ("em_vs_vae.py", ["--quick", "--figure", "{tmp}/em_vs_vae.png"], em_and_vae_table, False),
    ("swap_guides.py", ["--quick", "--out", "{tmp}/swap_guides.png"], guides_compare, True),
    (
        "marginal_likelihood.py",
        ["--quick", "--out", "{tmp}/marginal_likelihood.png"],
        sandwich,
        True,
    ),
    ("latent_space.py", ["--quick", "--out-dir", "{tmp}"], latent_pictures, True),
]


@pytest.mark.parametrize("script, args, check, mnist", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_runs_quickly(script, args, check, mnist, tmp_path):
    if mnist and mnist_root() is None:
        pytest.skip("MNIST not found")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    check(proc.stdout)
    for png in tmp_path.rglob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_example_is_in_the_list():
    listed = {e[0] for e in EXAMPLES}
    assert listed == {p.name for p in (ROOT / "examples").glob("*.py")}


def test_em_vs_svi_example_em_bound_touches_after_every_e_step(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("em_vs_svi", ROOT / "examples" / "em_vs_svi.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--quick", "--out", str(tmp_path / "em_vs_svi.png")])
    em, svi, local = result["em"], result["svi"], result["svi_local"]
    ll, after_e, after_m = em["log_likelihood"], em["bound_after_e"], em["bound_after_m"]
    assert len(after_e) == 30 and result["max_touch_gap"] < 1e-6
    assert all(
        abs(a - b) < 1e-6 for a, b in zip(ll, after_e, strict=False)
    )  # F(q_t, theta_t) = log p
    assert all(
        m <= a + 1e-12 for a, m in zip(ll[1:], after_m, strict=True)
    )  # F(q_t, theta_t+1) <= log p
    assert (
        max(a - m for a, m in zip(ll[1:], after_m, strict=True)) > 1e-4
    )  # and strictly below somewhere
    assert all(b >= a - 1e-9 for a, b in zip(ll, ll[1:], strict=False)) and ll[-1] > ll[0] + 1
    # Pyro's enumerated ELBO is the log-likelihood itself; the fixed-q and local-q bounds lag
    assert svi["max_loss_mismatch"] < 1e-8 and local["max_loss_mismatch"] < 1e-8
    assert svi["log_likelihood"][-1] - svi["bound"][-1] > 1.0
    assert all(
        a - b > 1e-4 for a, b in zip(local["log_likelihood"][50:], local["bound"][50:], strict=True)
    )
    assert (tmp_path / "em_vs_svi.png").stat().st_size > 10_000
    assert "max |bound after E-step - log-likelihood|" in capsys.readouterr().out
