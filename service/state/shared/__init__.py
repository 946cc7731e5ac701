"""State shared by replicas through one database: ``SharedLog`` over ``Postgres`` (replicas
anywhere) or ``SQLite`` (the worker processes of one machine, in the state dir)."""

from .log import DatabaseUnavailableError, SharedLog
from .postgres import Postgres
from .sqlite import FILE as SQLITE_FILE
from .sqlite import SQLite

__all__ = ["SQLITE_FILE", "DatabaseUnavailableError", "Postgres", "SQLite", "SharedLog"]
