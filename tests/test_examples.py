"""Examples run end to end with their quick settings."""

import re
import subprocess
import sys
from pathlib import Path

from helpers import needs_mnist

ROOT = Path(__file__).resolve().parents[1]


@needs_mnist
def test_train_vae_example_quick():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_vae.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    elbo = float(re.search(r"final test ELBO (-?[\d.]+)", proc.stdout).group(1))
    # two epochs on 5k images: about -210 nats; an untrained decoder scores below -540
    assert -260 < elbo < -150
