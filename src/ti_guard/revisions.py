"""The Alembic revisions shipped inside the package: the config that runs them, and their head.

Below both the CLI and lifecycle.py, which run the same revisions `alembic` runs from the
repository.
"""

from __future__ import annotations

import sys
from pathlib import Path
from importlib import resources

from alembic.config import Config
from alembic.script import ScriptDirectory


def alembic_config(settings, dialect=None, stdout=None) -> Config:
    cfg = Config(stdout=stdout or sys.stdout)
    cfg.set_main_option("script_location", str(resources.files("ti_guard.migrations")))
    cfg.attributes["ti_guard_settings"] = settings
    cfg.attributes["ti_guard_dialect"] = dialect
    return cfg


def packaged_ini() -> str:
    """The alembic.ini shipped in the package (script_location = ti_guard.migrations:.)."""
    return str(Path(__file__).with_name("alembic.ini"))


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config(None)).get_current_head()
