"""A training job for tests/test_distributed.py, run by torchrun (2 ranks) or plain python (1).

``python tests/ddp_worker.py OUT [--capture|--no-capture]`` trains a deterministic VAE-shaped
program (a Delta guide, so that the loss has no latent noise and any difference between one and
two processes comes from how the batch is split) on dynamically binarized data and saves the
parameters and the metrics to OUT from rank 0.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae.data import Data
from ppl_vae.distributed import barrier, destroy, init, world
from ppl_vae.svi import TrainConfig, train


def program(dim=6, latent=2):
    torch.manual_seed(0)
    encoder, decoder = nn.Linear(dim, latent), nn.Linear(latent, dim)

    def model(x, num_data=None):
        pyro.module("decoder", decoder)
        with pyro.plate("data", num_data or x.shape[0], subsample_size=x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x, num_data=None):
        pyro.module("encoder", encoder)
        with pyro.plate("data", num_data or x.shape[0], subsample_size=x.shape[0]):
            pyro.sample("z", dist.Delta(encoder(x)).to_event(1))

    return model, guide


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--capture", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    init(torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(65 + 20, 6, generator=g)  # 65 training points: batches of 16 and a last of 1
    data = Data(x[:65], x[65:], "dynamic", "toy")
    model, guide = program()
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, capture=args.capture, eval_batch_size=7)
    metrics = train(model, guide, data, config, quiet=True)
    if world().main:
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        torch.save({"params": params, "metrics": metrics}, args.out)
    barrier()  # no rank leaves the group while another still works
    destroy()


if __name__ == "__main__":
    main()
