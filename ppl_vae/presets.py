r"""The command line's defaults for particular data sets, where the dataclasses' own (chosen
for MNIST) do not fit.

A preset is laid under the flags given when ``ppl-vae train`` starts a new run, and the run's
configuration records the values it used; ``--resume`` reads the record and never a preset, so
a run keeps its settings when a preset changes. The Python API (:func:`ppl_vae.runs.train_run`)
applies no preset.

Example:
    >>> dataset_defaults("moons")["vae"]["likelihood"]
    'gaussian-hetero'
    >>> dataset_defaults("mnist")
    {}
"""

from __future__ import annotations

from ppl_vae.data import SYNTHETIC

__all__ = [
    "MODEL_PRESETS",
    "PRESETS",
    "PRIOR_PRESETS",
    "dataset_defaults",
    "model_defaults",
    "presets_help",
    "prior_defaults",
]

# 2-D sets: a per-dimension sigma that ignores z cannot follow thin arms or tight clusters
# (docs/RESULTS.md, mixture baseline); without a KL warm-up the latent collapses; 40 epochs at a
# constant rate scored 0.4 nats per point below 400 with a cosine decay of the rate, whose test
# ELBO also stops swinging (docs/RESULTS.md, a heteroscedastic p(x|z) on the 2-D sets). The
# cosine's last epoch runs at rate 0 (ppl_vae.schedules): with a tiny --epochs, pass
# --lr-schedule constant.
#
# A learned mixture prior (20 components): under N(0, I) the one continuous latent has to carry
# its mass across the gaps between separated clusters (ring8: 8 of them), and the mass on the
# way is lost; ring8's training split chose 20 components over 10 (docs/RESULTS.md, same place).
TWO_D: dict[str, dict] = {
    "vae": {
        "likelihood": "gaussian-hetero",
        "latent_dim": 2,
        "prior": "mog",
        "prior_components": 20,
    },
    "train": {"kl_warmup": 10, "epochs": 400, "lr_schedule": "cosine"},
}

PRESETS: dict[str, dict[str, dict]] = {name: TWO_D for name in SYNTHETIC}

# --model two-layer: Burda et al.'s sizes (z1 100, z2 50, 100,100 between x and z1) and a loss
# whose KL terms are taken at the draw (the mean-field loss is refused for it)
MODEL_PRESETS: dict[str, dict[str, dict]] = {
    "two-layer": {
        "vae": {"latent_dim": 100, "network": {"hidden": (100, 100)}},
        "train": {"loss": "elbo"},
    },
    # --model cvae: the sizes of Pyro's examples/cvae (z 200, relu; its 500,500 hidden widths
    # are the model's own default, so that --architecture conv is refused by name)
    "cvae": {"vae": {"latent_dim": 200, "network": {"activation": "relu"}}},
    # --model m2: Kingma et al.'s sizes (z 50, softplus; the one hidden layer of 500 is the
    # model's own default, so that --architecture conv is refused by name)
    "m2": {"vae": {"latent_dim": 50, "network": {"activation": "softplus"}}},
}


def model_defaults(model: str | None) -> dict[str, dict]:
    """The command line's defaults for ``--model`` (as :func:`dataset_defaults`)."""
    return {part: dict(values) for part, values in MODEL_PRESETS.get(model or "", {}).items()}


NO_KL_TERM = ("iwae",)  # losses whose bound has no KL term to warm up (TrainConfig refuses one)

# --prior vamp: two epochs at KL weight 0, then a warm-up over five. The VampPrior's components
# are the guide's own q at the pseudo-inputs, so the KL term's gradient reaches the encoder
# through them too, and from the start it is smallest for an encoder that ignores x (then the
# KL is 0 at any sigma): on MNIST q(z|x) became the same for every image within 50 steps, also
# with the KL weighted by 0.01 from the first step; at weight 0 the decoder takes up z after
# about 1,200 steps, and a rise over five epochs keeps it (docs/RESULTS.md, learned priors).
PRIOR_PRESETS: dict[str, dict[str, dict]] = {"vamp": {"train": {"kl_delay": 2, "kl_warmup": 5}}}


def prior_defaults(prior: str | None, *, loss: str | None = None) -> dict[str, dict]:
    """The command line's defaults for ``--prior`` (as :func:`dataset_defaults`); none for a
    ``loss`` without a KL term (``iwae``)."""
    if loss in NO_KL_TERM:
        return {}
    return {part: dict(values) for part, values in PRIOR_PRESETS.get(prior or "", {}).items()}


def dataset_defaults(
    dataset: str,
    *,
    loss: str | None = None,
    model: str | None = None,
    prior: str | None = None,
) -> dict[str, dict]:
    """``{"vae": {...}, "train": {...}}``: the command line's defaults for ``dataset`` (field
    names of :class:`~ppl_vae.vae.VAEConfig` and :class:`~ppl_vae.svi.TrainConfig`), empty
    where the dataclasses' defaults apply; without a KL warm-up for a ``loss`` that has no KL
    term (``iwae``); without the prior for ``model="two-layer"`` (whose prior is its upper
    layer) and without the prior's number of components for another ``prior`` given. They are
    a VAE's: empty for ``model="cvae"``, which takes image sets only (and refuses the 2-D sets
    by name)."""
    if model in ("cvae", "m2"):
        return {}
    defaults = {part: dict(values) for part, values in PRESETS.get(dataset, {}).items()}
    vae = defaults.get("vae", {})
    if loss in NO_KL_TERM:
        defaults.get("train", {}).pop("kl_warmup", None)
    if model == "two-layer" or (prior is not None and prior != vae.get("prior")):
        vae.pop("prior_components", None)
    if model == "two-layer":
        vae.pop("prior", None)
    return defaults


def _flags(preset: dict[str, dict]) -> str:
    return " ".join(
        f"--{field.replace('_', '-')} {value}"
        for values in preset.values()
        for field, value in values.items()
    )


def presets_help() -> str:
    """One sentence per preset, as flags, for ``--help``."""
    groups: dict[str, list[str]] = {}
    for name, preset in PRESETS.items():
        groups.setdefault(_flags(preset), []).append(name)
    sentences = [
        f"For {', '.join(names)}: {flags} (no warm-up with --loss iwae)."
        for flags, names in groups.items()
    ]
    sentences += [
        f"For --prior {prior}: {_flags(preset)} (none with --loss iwae)."
        for prior, preset in PRIOR_PRESETS.items()
    ]
    return " ".join(sentences)
