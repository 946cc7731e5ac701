"""State shared by replicas through one database: ``SharedLog`` over ``Postgres``."""

from .log import DatabaseUnavailableError, SharedLog
from .postgres import Postgres

__all__ = ["DatabaseUnavailableError", "Postgres", "SharedLog"]
