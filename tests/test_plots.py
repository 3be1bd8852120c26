"""Pictures: the image grid puts each image in its cell; files are written whole."""

import torch

from ppl_vae.data import DataConfig, load_data
from ppl_vae.networks import NetworkConfig
from ppl_vae.plots import image_grid, reconstructions_figure, samples_figure
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
