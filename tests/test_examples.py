"""Every example runs end to end with --quick; the numbers it prints are checked."""

import importlib.util
import math
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


def written_png(out, name, least_bytes):
    path = Path(re.search(r"^wrote (\S+)$", out, re.M).group(1))
    assert path.name == name and path.stat().st_size > least_bytes


def conditional_beats_baseline(out):
    rows = {r[0]: float(r[1].split("±")[0]) for r in table_rows(out, 2) if r[0] != "model"}
    untrained = rows["untrained CVAE (importance-sampled)"]
    baseline, cvae = rows["baseline (exact)"], rows["CVAE (importance-sampled)"]
    # untrained logits are near 0: about log 2 per hidden pixel, 3 quadrants of 28 x 28
    assert abs(untrained - 588 * math.log(2)) < 5
    # 1 + 2 epochs on 5k images: the baseline about 149 nats, the CVAE about 132
    assert 100 < cvae < baseline < 200
    diff, se = (float(v) for v in re.search(r"paired: (-?[\d.]+) ± ([\d.]+)", out).groups())
    assert abs(diff - (cvae - baseline)) < 0.02 and diff < -3 * se
    written_png(out, "conditional_vae.png", 20_000)


def semi_supervised_learns(out):
    epochs = [float(a) for a in re.findall(r"^epoch \d+: test accuracy ([\d.]+)", out, re.M)]
    final = float(re.search(r"final test accuracy ([\d.]+)", out).group(1))
    assert len(epochs) == 3 and final == epochs[-1]
    assert final > 0.2  # 100 labels, 3 epochs on 5k images: about 0.32; chance is 0.1
    elbo = float(re.search(r"^epoch 3: .* test ELBO \(label summed out\) (-?[\d.]+)", out,
                           re.M).group(1))  # fmt: skip
    log_px = float(re.search(r"label summed out: (-?[\d.]+) ±", out).group(1))
    # about -154 nats (an untrained decoder scores about -543), above the ELBO (-165)
    assert -200 < log_px < -120 and log_px > elbo - 5
    written_png(out, "semi_supervised.png", 20_000)


def vae_and_mixture_over_draws(out):
    (row,) = table_rows(out, 9)[1:]  # one draw with --quick; the first row is the header
    truth, em, best, vae = (float(c) for c in row[1:5])
    pairs = [tuple(float(v) for v in c.split("±")) for c in row[5:]]
    # EM's 8 components on 10,000 points of ring8, its own family: within a hundredth of a nat
    # of the closed-form density on the same 2,000 test points (0.0016 below it for draw 0)
    assert abs(best - truth) < 0.01 and abs(pairs[3][0] - (best - truth)) < 1e-4
    assert em <= best + 1e-9  # one start can only be worse than the best of ten
    # three epochs: far below the mixture (about -3.4 against -0.33), and the pairs agree
    assert vae < best - 0.5
    assert abs(pairs[0][0] - (vae - em)) < 1e-4 and abs(pairs[2][0] - (vae - truth)) < 1e-4


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
    ("vae_vs_gmm_seeds.py", ["--quick", "--out", "{tmp}/runs"], vae_and_mixture_over_draws, False),
    (
        "conditional_vae.py",
        ["--quick", "--out", "{tmp}/conditional_vae.png"],
        conditional_beats_baseline,
        True,
    ),
    (
        "semi_supervised.py",
        ["--quick", "--out", "{tmp}/semi_supervised.png"],
        semi_supervised_learns,
        True,
    ),
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
