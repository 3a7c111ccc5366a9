"""A repository folder for end-to-end tests: schemas/ plus a reconciler.yaml whose 'test' environment
points at a fresh test database, with the test server as shadow."""

from __future__ import annotations

import textwrap
from pathlib import Path

from reconciler.cli import main
from reconciler.servers import Server

BASE_SCHEMA = {
    "00_types.sql": "CREATE TYPE status AS ENUM ('open', 'closed');\n",
    "10_tables.sql": textwrap.dedent("""\
        CREATE TABLE customers (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            email text NOT NULL UNIQUE
        );
        CREATE TABLE orders (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            customer_id bigint NOT NULL REFERENCES customers (id),
            status status NOT NULL DEFAULT 'open',
            total numeric(12, 2) NOT NULL CHECK (total >= 0)
        );
        CREATE INDEX orders_customer_id_idx ON orders (customer_id);
        """),
    "20_views.sql": "CREATE VIEW open_orders AS SELECT id, customer_id, total FROM orders WHERE status = 'open';\n",
    "30_functions.sql": textwrap.dedent("""\
        CREATE FUNCTION order_total_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.total > 1000000 THEN RAISE EXCEPTION 'too large'; END IF;
            RETURN NEW;
        END;
        $$;
        CREATE TRIGGER orders_total_guard BEFORE INSERT OR UPDATE ON orders
            FOR EACH ROW EXECUTE FUNCTION order_total_guard();
        """),
}


class Repo:
    """A repo folder with reconciler.yaml pointing the 'test' environment at a test database."""

    def __init__(self, root: Path, database: str, server: Server) -> None:
        self.root = root
        self.database = database
        self.schemas = root / "schemas"
        self.schemas.mkdir()
        self.config = root / "reconciler.yaml"
        self.config.write_text(textwrap.dedent(f"""\
            environments:
              test:
                database: "{database}"
                shadow: "{server.dsn}"
                auto_apply: true
                require_signed_plans: false
                lock_wait: 2s
                lock_timeout: 20s
            """))

    def write(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            (self.schemas / name).write_text(text)

    def run(self, *args: str, env: str | None = "test") -> int:
        argv = ["--config", str(self.config), *args]
        if env is not None and args[0] in {"plan", "apply", "diff", "drift", "history", "verify-plan"}:
            argv += ["--env", env]
        return main(argv)
