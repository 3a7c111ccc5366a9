"""reconciler.diff.classify: (kind, object) of one statement."""

from __future__ import annotations

import pytest

from reconciler.diff.classify import classify


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("CREATE TABLE public.t (id int PRIMARY KEY)", ("create_table", "public.t")),
        ("CREATE TABLE t (id int)", ("create_table", "t")),
        ("ALTER TABLE public.t ADD COLUMN c text DEFAULT 'x'", ("add_column", "public.t.c")),
        ("ALTER TABLE public.t DROP COLUMN c", ("drop_column", "public.t.c")),
        ("ALTER TABLE public.t ALTER COLUMN c SET NOT NULL", ("set_not_null", "public.t.c")),
        ("ALTER TABLE public.t ALTER COLUMN c DROP NOT NULL", ("drop_not_null", "public.t.c")),
        ("ALTER TABLE public.t ALTER COLUMN c TYPE bigint USING c::bigint", ("alter_column_type", "public.t.c")),
        (
            "ALTER TABLE ONLY public.t ADD CONSTRAINT t_u_fk FOREIGN KEY (u_id) REFERENCES public.u (id)",
            ("add_foreign_key", "public.t.t_u_fk"),
        ),
        ("ALTER TABLE public.t ADD CONSTRAINT t_c_check CHECK (c > 0)", ("add_check_constraint", "public.t.t_c_check")),
        ("CREATE INDEX t_c_idx ON public.t USING btree (c)", ("create_index", "public.t_c_idx")),
        ("CREATE UNIQUE INDEX CONCURRENTLY t_c_key ON public.t (c)", ("create_index_concurrently", "public.t_c_key")),
        ("DROP TABLE public.t", ("drop_table", "public.t")),
        ("DROP INDEX public.t_c_idx", ("drop_index", "public.t_c_idx")),
        ("DROP INDEX CONCURRENTLY public.t_c_idx", ("drop_index_concurrently", "public.t_c_idx")),
        ("CREATE VIEW public.v AS SELECT 1 AS one", ("create_view", "public.v")),
        ("CREATE OR REPLACE VIEW public.v AS SELECT 1 AS one", ("replace_view", "public.v")),
        (
            "CREATE FUNCTION public.f(a int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN a; END $$",
            ("create_function", "public.f"),
        ),
        ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS 'select 1'", ("create_procedure", "p")),
        ("CREATE TYPE public.mood AS ENUM ('sad', 'happy')", ("create_enum", "public.mood")),
        ("ALTER TYPE public.mood ADD VALUE IF NOT EXISTS 'ok' AFTER 'sad'", ("add_enum_value", "public.mood")),
        ("ALTER TYPE public.mood RENAME VALUE 'sad' TO 'blue'", ("rename_enum_value", "public.mood")),
        (
            "CREATE TRIGGER trg BEFORE UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION public.touch()",
            ("create_trigger", "public.t.trg"),
        ),
        ("SET lock_timeout = '5s'", ("set", "lock_timeout")),
        ("SET search_path TO public", ("set", "search_path")),
        ("ALTER TABLE public.t ADD COLUMN a int, ADD COLUMN b int", ("alter_table", "public.t")),
        ("SELECT 1; SELECT 2", ("multiple", "")),
        ("CREAT TABLE t (id int)", ("unparsed", "")),
        ("ALTER TABLE t ADD COLUMN", ("unparsed", "")),
    ],
)
def test_classify(statement: str, expected: tuple[str, str]) -> None:
    assert classify(statement) == expected
