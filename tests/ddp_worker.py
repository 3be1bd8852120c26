"""A training job for tests/test_distributed.py, run by torchrun (2 ranks) or plain python (1).

``python tests/ddp_worker.py OUT [--capture|--no-capture]`` trains a deterministic VAE-shaped
program (a Delta guide, so that the loss has no latent noise and any difference between one and
two processes comes from how the batch is split) on dynamically binarized data and saves the
parameters and the metrics to OUT from rank 0. With ``--m2`` it trains the M2 model
(``ppl_vae.m2``, its guide's q(z|x, y) made a Delta alike) on 65 unlabelled and 12 labelled
points, batches of 16 (the labelled ones in batches of 5, a last of 2): the steps split both
batches across the ranks, with different shares. With ``--sums`` it sums made-up gradients
over the ranks five times, through shared memory and through gloo, and saves both with the
sum made here from every rank's values (each rank's are drawn from a seed of its rank). With
``--orphan`` (started by hand, not by torchrun) both ranks sum once through shared memory, then
rank 0 prints ``ready`` and sleeps while rank 1 waits in a second sum: killed, rank 0 must be
named by rank 1, which prints the error and exits with status 3.
"""

import argparse
import os
import time

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae.data import Data
from ppl_vae.distributed import (
    RankStopped,
    SharedSum,
    barrier,
    destroy,
    init,
    reduce_gradients,
    world,
)
from ppl_vae.m2 import M2Guide, M2Model
from ppl_vae.semisupervised import SemiSupervised
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


class DeltaM2Guide(M2Guide):
    """M2's guide with z at the mean of q(z|x, y): the loss has no latent noise."""

    def distribution(self, x, y):
        return dist.Delta(super().distribution(x, y).mean, event_dim=1)


def m2_training(x, labels, capture):
    """The M2 pair trained on x[:65] unlabelled and x[65:77] labelled; tested on x[77:]."""
    torch.manual_seed(0)
    sizes = {"event_shape": (6,), "num_classes": 3, "latent_dim": 2, "hidden": (5,)}
    model, guide = M2Model(**sizes), DeltaM2Guide(**sizes)
    data = Data(x[:77], x[77:], "dynamic", "toy", test_labels=labels[77:],
                train_labels=labels[:77])  # fmt: skip
    objective = SemiSupervised(data, torch.arange(65, 77), alpha=2.0, batch_size=5, seed=0)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, capture=capture, eval_batch_size=7,
                         loss="meanfield")  # fmt: skip
    unlabelled = data.subset(torch.arange(65))
    return train(model, guide, unlabelled, config, quiet=True, objective=objective)


def made_up_gradients(rank: int, call: int) -> list[torch.Tensor]:
    """Rank ``rank``'s gradients at call ``call``: three tensors, one of them an odd size."""
    g = torch.Generator().manual_seed(1000 * call + rank)
    return [torch.randn(shape, generator=g) for shape in ((7, 5), (3,), (1001,))]


def sums(out: str) -> None:
    """Five sums of made-up gradients, weighted by 0.25 and 0.75, both ways."""
    w, weight = world(), (0.25, 0.75)
    record = {"shared": [], "gloo": [], "expected": [], "summer": None}
    for call in range(5):
        for way in ("shared", "gloo"):
            params = [torch.zeros(g.shape, requires_grad=True) for g in made_up_gradients(0, 0)]
            for p, g in zip(params, made_up_gradients(w.rank, call), strict=True):
                p.grad = g
            reduce_gradients(params, weight[w.rank], shared=way == "shared")
            record[way].append([p.grad.clone() for p in params])
        ranks = [made_up_gradients(r, call) for r in range(w.size)]
        record["expected"].append(
            [sum(weight[r] * ranks[r][i] for r in range(w.size)) for i in range(3)]
        )
    record["summer"] = [type(s).__name__ for s in SharedSum._made.values()]
    if w.main:
        torch.save(record, out)


def orphan() -> None:
    """Rank 1 left waiting in a shared sum while rank 0 sleeps (to be killed)."""
    param = torch.zeros(3, requires_grad=True)
    param.grad = torch.ones(3)
    reduce_gradients([param], 1.0, shared=True)
    if world().main:
        print("ready", flush=True)
        time.sleep(600)
    param.grad = torch.ones(3)
    try:
        reduce_gradients([param], 1.0, shared=True)
    except RankStopped as e:
        print(e, flush=True)
        os._exit(3)  # the group cannot be left cleanly: its store died with rank 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--capture", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--m2", action="store_true")
    parser.add_argument("--sums", action="store_true")
    parser.add_argument("--orphan", action="store_true")
    args = parser.parse_args()
    init(torch.device("cpu"))
    if args.orphan:
        orphan()
    if args.sums:
        sums(args.out)
        barrier()
        destroy()
        return
    g = torch.Generator().manual_seed(1)
    x = torch.rand(65 + 20, 6, generator=g)  # 65 training points: batches of 16 and a last of 1
    if args.m2:
        metrics = m2_training(x, torch.randint(0, 3, (85,), generator=g), args.capture)
    else:
        data = Data(x[:65], x[65:], "dynamic", "toy")
        model, guide = program()
        config = TrainConfig(epochs=2, batch_size=16, lr=0.05, capture=args.capture,
                             eval_batch_size=7)  # fmt: skip
        metrics = train(model, guide, data, config, quiet=True)
    if world().main:
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
        torch.save({"params": params, "metrics": metrics}, args.out)
    barrier()  # no rank leaves the group while another still works
    destroy()


if __name__ == "__main__":
    main()
