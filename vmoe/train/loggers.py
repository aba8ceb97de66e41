"""Default experiment logger: Weights & Biases, offline unless the user configured wandb.

"Configured" means an API key in ``WANDB_API_KEY``, an ``api.wandb.ai`` entry in ``~/.netrc``
(what ``wandb login`` writes), or an explicit ``WANDB_MODE``. Otherwise the run is logged
offline under the run directory (``wandb sync`` uploads it later); nothing ever prompts.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Dict, Optional

__all__ = ["wandb_configured", "default_logger_config"]


def wandb_configured(environ: Optional[Dict[str, str]] = None, home: Optional[Path] = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY") or env.get("WANDB_MODE"):
        return True
    path = Path(env.get("NETRC") or (home or Path.home()) / ".netrc")
    try:
        return netrc.netrc(str(path)).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def default_logger_config(save_dir: str, name: Optional[str] = None, project: str = "vmoe") -> dict:
    """LightningCLI class_path/init_args of the default WandbLogger for a run directory."""
    offline = not wandb_configured() or os.environ.get("WANDB_MODE") in ("offline", "disabled")
    if offline:
        # Belt and braces: wandb itself must not try to log in or prompt.
        os.environ.setdefault("WANDB_MODE", "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"save_dir": save_dir, "name": name, "project": project, "offline": offline},
    }
