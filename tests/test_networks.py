"""Encoders and decoders: shapes, the table of pairs, and the conv pair learning."""

import pytest
import torch

from ppl_vae.errors import InputError
from ppl_vae.networks import NETWORKS, ConvDecoder, ConvEncoder, MLPDecoder, NetworkConfig


def test_the_mlp_pair_mirrors_its_widths_and_keeps_leading_dimensions():
    encoder, decoder = NetworkConfig(hidden=(16, 8)).build((3, 4), latent_dim=2)
    assert encoder.feature_dim == 8
    assert [m.out_features for m in decoder.net if hasattr(m, "out_features")] == [8, 16, 12]
    x = torch.randn(5, 7, 3, 4)  # particles x points x event
    assert encoder(x).shape == (5, 7, 8)
    assert decoder(torch.randn(5, 7, 2)).shape == (5, 7, 3, 4)
    assert NetworkConfig().build((6,), 2)[0].feature_dim == 200  # the default 200,200


def test_the_conv_pair_has_the_documented_shapes():
    encoder, decoder = NetworkConfig("conv").build((1, 28, 28), latent_dim=5)
    assert isinstance(encoder, ConvEncoder) and isinstance(decoder, ConvDecoder)
    x = torch.rand(2, 3, 1, 28, 28)
    assert encoder(x).shape == (2, 3, 64 * 7 * 7) and encoder.feature_dim == 64 * 7 * 7
    assert decoder(torch.randn(2, 3, 5)).shape == (2, 3, 1, 28, 28)
    with pytest.raises(InputError, match="conv network needs 1x28x28 images"):
        NetworkConfig("conv").build((1, 14, 14), 5)


def test_the_conv_pair_learns_to_reconstruct():
    """Adam steps through encoder and decoder take 16 images of a bar at different heights to
    well below the best image-independent prediction (the mean image), which the untrained pair
    does not beat: the gradient reaches both networks and the shapes line up."""
    torch.manual_seed(0)
    encoder, decoder = NETWORKS.build("conv", (1, 28, 28), 4, activation="relu")
    head = torch.nn.Linear(encoder.feature_dim, 4)
    x = torch.zeros(16, 1, 28, 28)
    for i in range(16):
        x[i, 0, 4 + i : 7 + i, 4:24] = 1.0
    mean = x.mean(0, keepdim=True).clamp(1e-6, 1 - 1e-6).expand_as(x)
    baseline = torch.nn.functional.binary_cross_entropy(mean, x).item()
    params = [*encoder.parameters(), *decoder.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)

    def loss():
        logits = decoder(head(encoder(x)))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, x)

    assert loss().item() > baseline
    for _ in range(150):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.5 * baseline


def test_the_decoder_can_be_used_alone():
    decoder = MLPDecoder(2, (3,), (4,), "gelu")
    assert decoder(torch.zeros(6, 2)).shape == (6, 3)
