"""Pictures: the image grid puts each image in its cell; files are written whole."""

import subprocess
import sys

import matplotlib
import torch
from sklearn.decomposition import PCA

from ppl_vae.data import DataConfig, load_data
from ppl_vae.model import BernoulliLikelihood, VAEModel
from ppl_vae.networks import NetworkConfig
from ppl_vae.plots import (
    close_figure,
    curves_figure,
    image_grid,
    latent_figure,
    latent_subset,
    manifold_figure,
    posterior_means,
    reconstructions_figure,
    samples_figure,
)
from ppl_vae.runs.files import save_figure
from ppl_vae.vae import VAEConfig, build_vae


def test_image_grid_places_images_row_major_with_gaps():
    images = torch.arange(5.0).reshape(5, 1, 1, 1).expand(5, 1, 2, 3) / 10
    grid = image_grid(images, ncols=3)
    assert grid.shape == (2 * 3 - 1, 3 * 4 - 1)
    assert grid[0, 0] == 0.0 and grid[0, 4] == 0.1 and grid[0, 8] == 0.2
    assert grid[3, 0] == 0.3 and grid[3, 4] == 0.4
    assert grid[2, 0] == 1.0 and grid[0, 3] == 1.0  # white gaps
    assert grid[3, 8] == 1.0  # the empty sixth cell stays white


def test_scatter_pictures_for_two_dimensional_data(tmp_path):
    data = load_data(DataConfig("moons", num_train=200, num_test=100))
    model, guide = build_vae(VAEConfig(latent_dim=2, network=NetworkConfig(hidden=(8,))), data)
    a = save_figure(samples_figure(model, data), tmp_path / "samples.png")
    b = save_figure(reconstructions_figure(model, guide, data), tmp_path / "recon.png")
    for path in (a, b):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recon.png", "samples.png"]


def small_vae(latent_dim=2, name="moons", guide="gaussian"):
    data = load_data(DataConfig(name, num_train=200, num_test=120))
    config = VAEConfig(latent_dim=latent_dim, network=NetworkConfig(hidden=(8,)), guide=guide)
    return (*build_vae(config, data), data)


def test_the_manifold_is_the_decoder_on_a_grid_of_prior_quantiles():
    torch.manual_seed(0)
    encoder, decoder = NetworkConfig(hidden=(8,)).build((1, 28, 28), 2)
    model = VAEModel(decoder, BernoulliLikelihood(), 2, (1, 28, 28))
    fig = manifold_figure(model, n=5)
    shown = fig.axes[0].get_images()[0].get_array()
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]))
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")
    with torch.no_grad():
        means = model.observation(torch.stack([z1.flatten(), z2.flatten()], -1)).mean
    assert torch.allclose(torch.as_tensor(shown.data), image_grid(means, ncols=5), atol=1e-6)
    close_figure(fig)


def test_a_larger_latent_is_drawn_by_its_first_two_principal_components():
    model, guide, data = small_vae(latent_dim=3)
    fig = latent_figure(guide, data)
    points = torch.cat([torch.as_tensor(c.get_offsets()) for c in fig.axes[0].collections])
    z = posterior_means(guide, data.encode(data.test))
    centred = z - z.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    pcs = (centred @ v[:2].T).double()
    # the same set of points (the scatter groups them by label); signs of components are free
    key = lambda p: sorted(map(tuple, p.abs().round(decimals=4).tolist()))  # noqa: E731
    assert key(points) == key(pcs)
    assert "principal components" in fig.axes[0].get_title()
    close_figure(fig)


def test_a_larger_test_set_is_drawn_by_a_seeded_random_subset_projected_as_pca_would():
    """More test points than the picture takes: a uniform random subset (not the first
    points), the same on every call; its first two principal components as scikit-learn's
    PCA computes them from the subset's posterior means, up to each component's sign; each
    point coloured by its own label; the title says how many of how many."""
    model, guide, data = small_vae(latent_dim=4)
    pick = latent_subset(120, 50)
    assert len(set(pick.tolist())) == 50 and pick.min() >= 0 and pick.max() < 120
    assert pick.max() >= 100 and torch.equal(pick, latent_subset(120, 50))  # spread, seeded
    assert sorted(latent_subset(120, 500).tolist()) == list(range(120))  # all, when fewer
    fig = latent_figure(guide, data, n=50)
    (scatter,) = fig.axes[0].collections
    shown = torch.as_tensor(scatter.get_offsets().data)
    z = posterior_means(guide, data.encode(data.test[pick])).double().numpy()
    want = torch.as_tensor(PCA(n_components=2).fit_transform(z))
    signs = torch.sign((shown * want).sum(0))
    assert torch.allclose(shown, want * signs, atol=1e-5)
    classes = data.test_labels.unique().tolist()
    cmap = matplotlib.colormaps["tab10"]
    colours = [cmap(classes.index(c))[:3] for c in data.test_labels[pick].tolist()]
    assert torch.allclose(torch.as_tensor(scatter.get_facecolors()[:, :3]),
                          torch.tensor(colours, dtype=torch.float64))  # fmt: skip
    assert "a random 50 of the 120 test points" in fig.axes[0].get_title()
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["0", "1"]
    close_figure(fig)


def test_posterior_means_are_the_guides_mean_or_the_average_of_flow_draws():
    model, guide, data = small_vae()
    x = data.test[:7]
    assert torch.equal(posterior_means(guide, x), guide.distribution(x).mean)
    _, flow, _ = small_vae(guide="planar")
    torch.manual_seed(0)
    z = torch.stack([flow.distribution(x)() for _ in range(4000)])
    assert torch.allclose(posterior_means(flow, x, draws=4000), z.mean(0), atol=0.05)


def test_the_curves_show_the_recorded_numbers_and_the_kl_weight_when_annealed():
    metrics = [
        {"epoch": e, "train_elbo": -10.0 + e, "test_elbo": -11.0 + e, "kl_weight": min(1, e / 2)}
        for e in (1, 2, 3)
    ]
    fig = curves_figure(metrics)
    lines = {line.get_label(): list(line.get_ydata()) for ax in fig.axes for line in ax.lines}
    assert lines["train (objective)"] == [-9.0, -8.0, -7.0]
    assert lines["test ELBO"] == [-10.0, -9.0, -8.0]
    assert lines["KL weight"] == [0.5, 1.0, 1.0]
    (best,) = [line for line in fig.axes[0].lines if line.get_label() == "best epoch (best.pt)"]
    assert list(best.get_xdata()) == [3, 3]  # a vertical line at the best test ELBO
    close_figure(fig)
    metrics[2]["validation_elbo"], metrics[1]["validation_elbo"] = -5.0, -4.0  # best at 2
    metrics[0]["validation_elbo"] = -6.0
    fig = curves_figure(metrics)
    lines = {line.get_label(): list(line.get_ydata()) for ax in fig.axes for line in ax.lines}
    assert lines["validation ELBO"] == [-6.0, -4.0, -5.0]
    (best,) = [line for line in fig.axes[0].lines if line.get_label() == "best epoch (best.pt)"]
    assert list(best.get_xdata()) == [2, 2]  # now chosen by the validation ELBO
    close_figure(fig)


def test_the_curves_add_a_panel_of_the_test_accuracy_where_the_metrics_have_it():
    metrics = [
        {"epoch": e, "train_elbo": -10.0 + e, "test_elbo": -11.0 + e, "test_accuracy": a}
        for e, a in ((1, 0.5), (2, 0.75), (3, 0.7))
    ]
    fig = curves_figure(metrics)
    assert len(fig.axes) == 2
    (accuracy,) = fig.axes[1].lines
    assert list(accuracy.get_ydata()) == [0.5, 0.75, 0.7]
    assert fig.axes[1].get_title() == "classifier q(y|x); last test accuracy 0.7000"
    close_figure(fig)
    del metrics[0]["test_accuracy"]  # not on every line: no panel
    fig = curves_figure(metrics)
    assert len(fig.axes) == 1
    close_figure(fig)


def test_importing_and_drawing_leave_matplotlib_as_the_user_set_it():
    """A notebook's backend survives ``import ppl_vae``, and our figures stay out of pyplot's
    list (so inline display and ``plt.show()`` are the user's alone)."""
    code = (
        "import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt\n"
        "import ppl_vae, ppl_vae.plots, ppl_vae.runs\n"
        "fig = ppl_vae.plots.curves_figure([{'epoch': 1, 'train_elbo': -3.0, 'test_elbo': -3.1},"
        " {'epoch': 2, 'train_elbo': -2.0, 'test_elbo': -2.2}])\n"
        "print(matplotlib.get_backend(), plt.get_fignums(), type(fig).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["svg", "[]", "Figure"]


def test_the_curves_keep_every_epoch_in_view_and_name_a_first_epoch_far_below():
    # ten epochs rising towards -100 (the README's MNIST run): all of them in view
    rising = [
        {"epoch": e, "train_elbo": -100 - 20 / e, "test_elbo": -101 - 20 / e} for e in range(1, 11)
    ]
    fig = curves_figure(rising)
    low, high = fig.axes[0].get_ylim()
    assert low <= -121 and high >= -102
    assert not fig.axes[0].texts and fig.legends and not fig.axes[0].get_legend()
    # a first epoch 500 nats down would flatten the rest: it is named instead of drawn in view
    falling = [{"epoch": 1, "train_elbo": -600.0, "test_elbo": -610.0}] + rising[1:]
    fig = curves_figure(falling)
    low, high = fig.axes[0].get_ylim()
    assert -112 < low < -111 and high > -102
    assert fig.axes[0].texts[0].get_text() == "epoch 1 below: train -600.00, test -610.00"


def test_the_curves_name_kl_delay_epochs_far_below_and_keep_later_ones_in_view():
    # --kl-delay 2 (the VampPrior's default), as its 100-epoch MNIST run recorded it: at KL
    # weight 0 the test ELBO, taken at full weight, fell to -2793.51 in epoch 2
    delayed = [
        {"epoch": 1, "train_elbo": -211.88, "test_elbo": -219.04, "kl_weight": 0.0},
        {"epoch": 2, "train_elbo": -206.75, "test_elbo": -2793.51, "kl_weight": 0.0},
    ] + [
        {"epoch": e, "train_elbo": -100 - 90 / (e - 2), "test_elbo": -100 - 80 / (e - 2),
         "kl_weight": min(1.0, (e - 2) / 5)}
        for e in range(3, 30)
    ]  # fmt: skip
    fig = curves_figure(delayed)
    low, high = fig.axes[0].get_ylim()
    assert -240 < low < -219.04 and high > -103  # epoch 1 in view, epoch 2 not
    text = fig.axes[0].texts[0].get_text()
    assert text == "epoch 2 below (KL weight 0): train -206.75, test -2793.51"
    # the same fall at full weight is a fact of training, not of the schedule: kept in view
    fig = curves_figure([dict(m, kl_weight=1.0) for m in delayed])
    assert fig.axes[0].get_ylim()[0] < -2793.51 and not fig.axes[0].texts
