"""Collations, text search dictionaries and text search configurations.

migra has no text search objects at all, and creates collations from the wrong columns (an ICU
collation comes out as ``locale = 'None'``). Here all three are read from the catalogs and created
first (right after schemas and extensions: columns, indexes, domains and functions use them), in the
order collations, dictionaries, configurations; removed ones are dropped last, configurations before
the dictionaries they map. A configuration's mappings and a dictionary's options change in place; a
collation, a dictionary's template or a configuration's parser cannot be altered, so those are dropped
and recreated, which is refused while something in the live database uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

import pglast
from pglast import ast
from psycopg import sql

from ...errors import ReconcilerError
from ..base import Change
from . import Context, change, first_index, insert_at, managed, not_extension_member

# locale columns by version: colliculocale (15, 16), colllocale (17+), collicurules (16+); read through
# to_jsonb so one query serves every version
_COLLATIONS = f"""
SELECT n.nspname, co.collname, co.oid::int, co.collprovider::text, co.collisdeterministic,
       co.collcollate, co.collctype,
       coalesce(to_jsonb(co) ->> 'colllocale', to_jsonb(co) ->> 'colliculocale'), to_jsonb(co) ->> 'collicurules'
FROM pg_collation co JOIN pg_namespace n ON n.oid = co.collnamespace
WHERE {managed('n')} AND {not_extension_member('pg_collation', 'co.oid')}
"""

_DICTIONARIES = f"""
SELECT n.nspname, d.dictname, d.oid::int, quote_ident(tn.nspname) || '.' || quote_ident(t.tmplname), d.dictinitoption
FROM pg_ts_dict d JOIN pg_namespace n ON n.oid = d.dictnamespace
JOIN pg_ts_template t ON t.oid = d.dicttemplate JOIN pg_namespace tn ON tn.oid = t.tmplnamespace
WHERE {managed('n')} AND {not_extension_member('pg_ts_dict', 'd.oid')}
"""

_CONFIGURATIONS = f"""
SELECT n.nspname, c.cfgname, c.oid::int, quote_ident(pn.nspname) || '.' || quote_ident(p.prsname),
       coalesce((SELECT array_agg(array[tt.alias, dicts] ORDER BY tt.tokid)
                 FROM ts_token_type(c.cfgparser) tt
                 CROSS JOIN LATERAL (SELECT string_agg(quote_ident(dn.nspname) || '.' || quote_ident(d.dictname), ', '
                                                       ORDER BY m.mapseqno) AS dicts
                                     FROM pg_ts_config_map m JOIN pg_ts_dict d ON d.oid = m.mapdict
                                     JOIN pg_namespace dn ON dn.oid = d.dictnamespace
                                     WHERE m.mapcfg = c.oid AND m.maptokentype = tt.tokid) mapped
                 WHERE dicts IS NOT NULL), '{{}}')
FROM pg_ts_config c JOIN pg_namespace n ON n.oid = c.cfgnamespace
JOIN pg_ts_parser p ON p.oid = c.cfgparser JOIN pg_namespace pn ON pn.oid = p.prsnamespace
WHERE {managed('n')} AND {not_extension_member('pg_ts_config', 'c.oid')}
"""

# what in the live database uses an object: (catalog, oid, description)
_DEPENDENTS = """
SELECT d.refclassid::regclass::text, d.refobjid::int, pg_describe_object(d.classid, d.objid, d.objsubid)
FROM pg_depend d
WHERE d.refclassid IN ('pg_collation'::regclass, 'pg_ts_dict'::regclass, 'pg_ts_config'::regclass)
  AND d.deptype = 'n'
"""

_PROVIDERS = {"c": "libc", "i": "icu", "b": "builtin"}
_PRELUDE = frozenset({"create_schema", "create_extension", "alter_extension"})


@dataclass(frozen=True)
class Collation:
    oid: int
    provider: str
    deterministic: bool
    collate: str | None
    ctype: str | None
    locale: str | None
    rules: str | None

    def definition(self) -> tuple[object, ...]:
        return (self.provider, self.deterministic, self.collate, self.ctype, self.locale, self.rules)


@dataclass(frozen=True)
class Dictionary:
    oid: int
    template: str  # quoted, schema-qualified
    options: str | None  # as PostgreSQL stores them: name = 'value', ...

    def definition(self) -> tuple[object, ...]:
        return (self.template, self.options)


@dataclass(frozen=True)
class Configuration:
    oid: int
    parser: str  # quoted, schema-qualified
    mappings: tuple[tuple[str, str], ...]  # (token type, dictionaries quoted and comma-separated)

    def definition(self) -> tuple[object, ...]:
        return (self.parser, self.mappings)


def _collations(context: Context, side: str) -> dict[tuple[str, str], Collation]:
    return {(s, n): Collation(oid, provider, bool(det), collate, ctype, locale, rules)
            for s, n, oid, provider, det, collate, ctype, locale, rules in context.rows(side, _COLLATIONS)}


def _dictionaries(context: Context, side: str) -> dict[tuple[str, str], Dictionary]:
    return {(s, n): Dictionary(oid, template, options) for s, n, oid, template, options in context.rows(side, _DICTIONARIES)}


def _configurations(context: Context, side: str) -> dict[tuple[str, str], Configuration]:
    return {(s, n): Configuration(oid, parser, tuple((m[0], m[1]) for m in maps))
            for s, n, oid, parser, maps in context.rows(side, _CONFIGURATIONS)}


def _create_collation(name: sql.Identifier, label: str, c: Collation) -> Change:
    provider = _PROVIDERS.get(c.provider)
    if provider is None:
        raise ReconcilerError(f"collation {label}: provider {c.provider!r} cannot be created")
    options: list[sql.Composable] = [sql.SQL("PROVIDER = {}").format(sql.SQL(provider))]
    if c.provider == "c":
        options.append(sql.SQL("LC_COLLATE = {}").format(sql.Literal(c.collate)))
        options.append(sql.SQL("LC_CTYPE = {}").format(sql.Literal(c.ctype)))
    else:
        options.append(sql.SQL("LOCALE = {}").format(sql.Literal(c.locale)))
    if c.rules is not None:
        options.append(sql.SQL("RULES = {}").format(sql.Literal(c.rules)))
    if not c.deterministic:
        options.append(sql.SQL("DETERMINISTIC = false"))
    statement = sql.SQL("CREATE COLLATION {} ({})").format(name, sql.SQL(", ").join(options))
    return change(statement, "create_collation", label)


def _create_dictionary(name: sql.Identifier, label: str, d: Dictionary) -> Change:
    # template and options are PostgreSQL's own quoted text
    options = sql.SQL(", {}").format(sql.SQL(d.options)) if d.options else sql.SQL("")
    statement = sql.SQL("CREATE TEXT SEARCH DICTIONARY {} (TEMPLATE = {}{})").format(name, sql.SQL(d.template), options)
    return change(statement, "create_text_search_dictionary", label)


def _option_names(options: str | None) -> list[str]:
    if not options:
        return []
    node = pglast.parse_sql(f"ALTER TEXT SEARCH DICTIONARY x ({options})")[0].stmt
    assert isinstance(node, ast.AlterTSDictionaryStmt)
    return [str(o.defname) for o in node.options or ()]


def _alter_dictionary(name: sql.Identifier, label: str, have: Dictionary, want: Dictionary) -> Change:
    """Options are set one by one; those only live has are named without a value, which removes them."""
    wanted = _option_names(want.options)
    removed = [sql.Identifier(o) for o in _option_names(have.options) if o not in wanted]
    parts: list[sql.Composable] = ([sql.SQL(want.options)] if want.options else []) + list(removed)
    statement = sql.SQL("ALTER TEXT SEARCH DICTIONARY {} ({})").format(name, sql.SQL(", ").join(parts))
    return change(statement, "alter_text_search_dictionary", label)


def _mapping_statements(name: sql.Identifier, label: str, verb: str,
                        mappings: list[tuple[str, str]]) -> list[Change]:
    """One ALTER per list of dictionaries: ``verb`` (ADD or ALTER) MAPPING FOR its token types."""
    out = []
    for dicts, group in groupby(sorted(mappings, key=lambda m: (m[1], m[0])), key=lambda m: m[1]):
        tokens = sql.SQL(", ").join(sql.Identifier(t) for t, _ in group)
        statement = sql.SQL("ALTER TEXT SEARCH CONFIGURATION {} {} MAPPING FOR {} WITH {}").format(
            name, sql.SQL(verb), tokens, sql.SQL(dicts))
        out.append(change(statement, "alter_text_search_configuration", label))
    return out


def _create_configuration(name: sql.Identifier, label: str, c: Configuration) -> list[Change]:
    statement = sql.SQL("CREATE TEXT SEARCH CONFIGURATION {} (PARSER = {})").format(name, sql.SQL(c.parser))
    return [change(statement, "create_text_search_configuration", label),
            *_mapping_statements(name, label, "ADD", list(c.mappings))]


def _alter_configuration(name: sql.Identifier, label: str, have: Configuration, want: Configuration) -> list[Change]:
    current, wanted = dict(have.mappings), dict(want.mappings)
    out = []
    gone = sorted(t for t in current if t not in wanted)
    if gone:
        statement = sql.SQL("ALTER TEXT SEARCH CONFIGURATION {} DROP MAPPING FOR {}").format(
            name, sql.SQL(", ").join(sql.Identifier(t) for t in gone))
        out.append(change(statement, "alter_text_search_configuration", label))
    out += _mapping_statements(name, label, "ALTER", [(t, d) for t, d in wanted.items() if t in current and current[t] != d])
    out += _mapping_statements(name, label, "ADD", [(t, d) for t, d in wanted.items() if t not in current])
    return out


def _drop(word: str, schema: str, name: str, kind: str) -> Change:
    return change(sql.SQL("DROP {} {}").format(sql.SQL(word), sql.Identifier(schema, name)), kind, f"{schema}.{name}")


def _is_migra_collation(c: Change) -> bool:
    return c.kind == "drop_collation" or c.sql.lstrip().lower().startswith("create collation")


def text_search(context: Context, changes: list[Change]) -> list[Change]:
    live_coll, desired_coll = _collations(context, "live"), _collations(context, "desired")
    live_dict, desired_dict = _dictionaries(context, "live"), _dictionaries(context, "desired")
    live_cfg, desired_cfg = _configurations(context, "live"), _configurations(context, "desired")
    out = [c for c in changes if not _is_migra_collation(c)]
    users: dict[tuple[str, int], list[str]] = {}
    for catalog, oid, description in context.rows("live", _DEPENDENTS):
        users.setdefault((catalog, int(oid)), []).append(description)

    def unused(what: str, label: str, catalog: str, oid: int, why: str) -> None:
        used_by = users.get((catalog, oid), [])
        if used_by:
            raise ReconcilerError(f"{what} {label}: {why}, which PostgreSQL cannot alter, so it must be dropped and "
                                  f"recreated, but {', '.join(sorted(used_by)[:5])} uses it; change it in two plans, "
                                  "or drop those users first")

    front: list[Change] = []  # drops of what is recreated, then creates and changes
    recreate_drops: list[Change] = []
    back: list[Change] = []
    recreated_cfgs: set[str] = set()
    for (schema, name), want_cfg in desired_cfg.items():
        have_cfg = live_cfg.get((schema, name))
        if have_cfg is not None and have_cfg.parser != want_cfg.parser:
            label = f"{schema}.{name}"
            unused("text search configuration", label, "pg_ts_config", have_cfg.oid,
                   f"its parser changes from {have_cfg.parser} to {want_cfg.parser}")
            recreated_cfgs.add(label)
            recreate_drops.append(_drop("TEXT SEARCH CONFIGURATION", schema, name, "drop_text_search_configuration"))

    for (schema, name), want_coll in sorted(desired_coll.items()):
        label, ident = f"{schema}.{name}", sql.Identifier(schema, name)
        have_coll = live_coll.get((schema, name))
        if have_coll is not None and have_coll.definition() != want_coll.definition():
            unused("collation", label, "pg_collation", have_coll.oid, "its definition changes")
            recreate_drops.append(_drop("COLLATION", schema, name, "drop_collation"))
        if have_coll is None or have_coll.definition() != want_coll.definition():
            front.append(_create_collation(ident, label, want_coll))
    for (schema, name), want_dict in sorted(desired_dict.items()):
        label, ident = f"{schema}.{name}", sql.Identifier(schema, name)
        have_dict = live_dict.get((schema, name))
        if have_dict is None:
            front.append(_create_dictionary(ident, label, want_dict))
        elif have_dict.template != want_dict.template:
            unused("text search dictionary", label, "pg_ts_dict", have_dict.oid,
                   f"its template changes from {have_dict.template} to {want_dict.template}")
            recreate_drops.append(_drop("TEXT SEARCH DICTIONARY", schema, name, "drop_text_search_dictionary"))
            front.append(_create_dictionary(ident, label, want_dict))
        elif have_dict.options != want_dict.options:
            front.append(_alter_dictionary(ident, label, have_dict, want_dict))
    for (schema, name), want_cfg in sorted(desired_cfg.items()):
        label, ident = f"{schema}.{name}", sql.Identifier(schema, name)
        have_cfg = live_cfg.get((schema, name))
        if have_cfg is None or label in recreated_cfgs:
            front += _create_configuration(ident, label, want_cfg)
        elif have_cfg.mappings != want_cfg.mappings:
            front += _alter_configuration(ident, label, have_cfg, want_cfg)

    for (schema, name) in sorted(set(live_cfg) - set(desired_cfg)):
        back.append(_drop("TEXT SEARCH CONFIGURATION", schema, name, "drop_text_search_configuration"))
    for (schema, name) in sorted(set(live_dict) - set(desired_dict)):
        back.append(_drop("TEXT SEARCH DICTIONARY", schema, name, "drop_text_search_dictionary"))
    for (schema, name) in sorted(set(live_coll) - set(desired_coll)):
        back.append(_drop("COLLATION", schema, name, "drop_collation"))

    start = first_index(out, lambda c: c.kind not in _PRELUDE, len(out))
    out = insert_at(out, start, [*recreate_drops, *front])
    late = first_index(out, lambda c: c.kind in ("drop_schema", "drop_extension"), len(out))
    return insert_at(out, late, back)
