"""The command line of issue 21: ``evaluate --method ais`` and ``gaps``, on a small pinwheel run
(2-D latent, so that log p(x) is also known by quadrature over a grid of z)."""

import json
import math

import pytest
import torch
from helpers import run_cli

from ppl_vae.cli import main
from ppl_vae.gaps import inference_gaps
from ppl_vae.rng import forked_rng
from ppl_vae.runs import load_run
from ppl_vae.runs.evaluate import seeded_batch

# a constant rate: the 2-D default, a cosine, would run the last of a few epochs at rate 0;
# N(0, I) and the fixed-sigma likelihood: the quadrature's grid (spacing 0.05) resolves them
ARGS = ["--dataset", "pinwheel", "--num-train", "600", "--num-test", "200", "--latent-dim", "2",
        "--hidden", "8", "--batch-size", "100", "--device", "cpu", "--quiet",
        "--lr-schedule", "constant", "--prior", "normal", "--likelihood", "gaussian"]  # fmt: skip
POINTS = 100


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ais") / "run"
    assert main(["train", *ARGS, "--epochs", "2", "--out", str(out)]) == 0
    return out


def _evaluate(run, *flags, capsys):
    code, out, err = run_cli("evaluate", "--run", run, "--limit", POINTS, "--device", "cpu",
                             "--quiet", *flags, capsys=capsys)  # fmt: skip
    assert code == 0, err
    return json.loads((run / "evaluate.json").read_text()), out


def _quadrature(run_dir, n: int, half_width=7.0, size=301) -> torch.Tensor:
    """log p(x) of the first ``n`` test points: p(z) p(x|z) summed over a grid of z."""
    run = load_run(run_dir, "cpu")
    t = torch.linspace(-half_width, half_width, size)
    z = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        log_prior = run.model.prior((z.shape[0],)).log_prob(z).double()
        log_lik = run.model.observation(z[:, None]).log_prob(run.data.test[None, :n]).double()
    return torch.logsumexp(log_prior[:, None] + log_lik, 0) + 2 * math.log(t[1] - t[0])


def test_evaluate_ais_agrees_with_importance_sampling_and_quadrature(trained, capsys):
    """Both are estimates of the same log p(x), here known by quadrature. Their per-point
    errors are independent, so the mean of the paired differences has the standard error
    sd(d) / sqrt(N), measured from the same points (about 0.006 nats here); the test allows
    four of those, plus 0.01 nats for AIS's downward bias (about the mean log-weight variance
    / 2C = 0.001 here). Against quadrature, IS with K = 5000 and a 2-D latent is nearly exact,
    and both means must lie within 0.03 nats of it."""
    ais, out = _evaluate(trained, "--method", "ais", "--num-chains", "16", "--num-steps", "100",
                         capsys=capsys)  # fmt: skip
    assert ais["method"] == "ais" and ais["num_points"] == len(ais["log_px"]) == POINTS
    assert (ais["num_chains"], ais["num_steps"], ais["leapfrog_steps"]) == (16, 100, 5)
    assert ais["schedule"] == "sigmoid" and ais["nll"] == pytest.approx(-sum(ais["log_px"]) / 100)
    assert 0.3 < ais["ais"]["acceptance"] < 0.95  # adapted toward 0.65
    assert 1 <= ais["ais"]["ess"] <= 16 and ais["ais"]["log_weight_variance"] >= 0
    assert "num_samples" not in ais and "elbo" not in ais and ais["epoch"] == 2
    assert ais["checkpoint"]["epoch"] == 2 and len(ais["kl_per_dim"]) == 2
    assert f"NLL {ais['nll']:.2f}" in out and "AIS, C=16, T=100" in out and "acceptance" in out
    written = json.loads((trained / "written.json").read_text())
    assert written["evaluate.json"]["sha256"] == ais["checkpoint"]["sha256"]

    is_, out = _evaluate(trained, "--num-samples", "5000", capsys=capsys)
    assert is_["method"] == "is" and is_["num_samples"] == 5000 and "K=5000" in out
    d = torch.tensor(ais["log_px"]) - torch.tensor(is_["log_px"])
    paired_se = (d.std() / math.sqrt(POINTS)).item()
    assert abs(ais["nll"] - is_["nll"]) <= 4 * paired_se + 0.01
    exact = -_quadrature(trained, POINTS).mean().item()
    assert ais["nll"] == pytest.approx(exact, abs=0.03)
    assert is_["nll"] == pytest.approx(exact, abs=0.03)


@pytest.mark.parametrize(
    "flags, wrong",
    [
        (["--num-chains", "4"], "--num-chains"),
        (["--method", "is", "--num-steps", "10"], "--num-steps"),
        (["--schedule", "geometric"], "--schedule"),
        (["--method", "ais", "--num-samples", "100"], "--num-samples"),
        (["--method", "ais", "--iwae-k", "1,10"], "--iwae-k"),
    ],
)
def test_another_methods_option_is_one_line_naming_it(trained, flags, wrong, capsys):
    before = sorted(p.name for p in trained.iterdir())
    code, out, err = run_cli("evaluate", "--run", trained, *flags, capsys=capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"{wrong} does not apply to the evaluation method" in err
    assert sorted(p.name for p in trained.iterdir()) == before


def test_gaps_writes_what_inference_gaps_gives_for_the_seed(trained, capsys):
    flags = ["--limit", "40", "--num-chains", "8", "--num-steps", "200", "--seed", "5"]
    code, out, err = run_cli("gaps", "--run", trained, *flags, "--device", "cpu", "--quiet",
                             capsys=capsys)  # fmt: skip
    assert code == 0, err
    record = json.loads((trained / "gaps.json").read_text())
    written = json.loads((trained / "written.json").read_text())
    assert written["gaps.json"]["sha256"] == record["checkpoint"]["sha256"]
    assert record["num_points"] == 40 and record["seconds"] > 0 and record["epoch"] == 2

    run = load_run(trained, "cpu")  # the same points and draws, called directly
    with forked_rng(run.data.device, 5):
        x = seeded_batch(run.data, run.data.test[:40], 100, 5, 0)
        want = inference_gaps(run.model, run.guide, x, num_chains=8, num_steps=200)
    for key, values in want.items():
        assert record["per_point"][key] == values.tolist(), key
    for key in ("approximation_gap", "amortization_gap"):
        values = want[key]
        assert record["means"][key] == pytest.approx(values.mean().item(), abs=1e-12)
        se = record["standard_errors"][key]
        assert se == pytest.approx((values.std() / math.sqrt(40)).item(), abs=1e-12)
        assert record["means"][key] >= -3 * se, key
    means = record["means"]  # log p(x) = ELBO(q*) + approximation gap, and so on down
    assert means["log_px"] == pytest.approx(means["elbo_optimal"] + means["approximation_gap"])
    assert means["elbo_optimal"] == pytest.approx(means["elbo"] + means["amortization_gap"])
    lines = out.splitlines()
    assert len(lines) == 6 and lines[0].startswith("40 test points, AIS C=8, T=200")
    labels = ["log p(x)", "ELBO of q*", "amortized ELBO", "approximation gap", "amortization gap"]
    for line, label in zip(lines[1:], labels, strict=True):
        assert line.strip().startswith(label)
    assert f"{means['amortization_gap']:.3f} ± " in lines[-1]


def test_a_flow_guide_without_inverse_is_annealed_and_split(tmp_path, capsys):
    """A planar run: AIS (in the flow's base space) against quadrature, as for the Gaussian
    run above, and gaps.json with both gaps non-negative within three standard errors."""
    run = tmp_path / "planar"
    assert main(["train", *ARGS, "--guide", "planar", "--flow-length", "2", "--epochs", "2",
                 "--out", str(run)]) == 0  # fmt: skip
    ais, _ = _evaluate(run, "--method", "ais", "--num-chains", "16", "--num-steps", "400",
                       capsys=capsys)  # fmt: skip
    assert ais["nll"] == pytest.approx(-_quadrature(run, POINTS).mean().item(), abs=0.03)
    code, out, err = run_cli("gaps", "--run", run, "--limit", "20", "--num-steps", "50",
                             "--standard-error", "0.05", "--device", "cpu", "--quiet",
                             capsys=capsys)  # fmt: skip
    assert code == 0, err
    record = json.loads((run / "gaps.json").read_text())
    for key in ("approximation_gap", "amortization_gap"):
        assert record["means"][key] >= -3 * record["standard_errors"][key], key


def test_help_names_the_methods_and_the_gaps(capsys):
    code, out, _ = run_cli("evaluate", "--help", capsys=capsys)
    assert code == 0 and "--method {is,ais}" in out
    assert "importance sampling" in out and "annealed importance sampling" in out
    for flag in ("--num-chains", "--num-steps", "--leapfrog-steps", "--schedule"):
        assert flag in out
    code, out, _ = run_cli("gaps", "--help", capsys=capsys)
    assert code == 0 and "approximation gap" in out and "amortization gap" in out
    for flag in ("--limit", "--num-chains", "--num-steps", "--standard-error", "--no-write",
                 "--checkpoint", "--out"):  # fmt: skip
        assert flag in out
    code, out, _ = run_cli("--help", capsys=capsys)
    assert code == 0 and "gaps" in out
