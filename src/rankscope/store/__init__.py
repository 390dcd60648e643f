"""Run data: Parquet parts written atomically, DuckDB views over them."""

from rankscope.store.runstore import TABLES, RunStore

__all__ = ["TABLES", "RunStore"]
