"""What a database is and what it holds: identity, a catalog snapshot, its fingerprint, table sizes.

The snapshot is our own normalised reading of the catalogs, one row per object, independent of
migra: it decides whether live equals desired after an apply, detects drift and staleness, and
names the objects that differ. Column order is left out on purpose (migra cannot reorder columns);
owners and grants only when asked (manage_owners, manage_privileges: they depend on the environment's
roles). Owners read as "the applying role" when the connecting role owns the object, so a shadow
loaded by one role compares equal to a target applied by another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .servers import stream

DEFAULT_METADATA_SCHEMA = "reconciler"

_SYSTEM_SCHEMA_FILTER = (
    "{n}.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
    "AND {n}.nspname NOT LIKE 'pg\\_temp\\_%%' AND {n}.nspname NOT LIKE 'pg\\_toast\\_temp\\_%%' "
    "AND {n}.nspname <> ALL(%(excluded)s::text[])"
)


def _managed(alias: str) -> str:
    return _SYSTEM_SCHEMA_FILTER.format(n=alias)


def _not_extension_member(classid: str, objid: str) -> str:
    return (
        f"NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = '{classid}'::regclass "
        f"AND e.objid = {objid} AND e.deptype = 'e')"
    )


# The schema (unquoted) a commented object is in, over pg_description ``d`` and its pg_identify_object_as_address
# ``o``: a schema's own name; a trigger's, policy's or rule's table's (pg_identify_object gives those none, and a
# condition on it would leave their comments out); else pg_identify_object's. NULL: no schema (casts, servers...).
COMMENTED_SCHEMA = ("CASE WHEN d.classoid IN ('pg_namespace'::regclass, 'pg_trigger'::regclass, 'pg_policy'::regclass, "
                    "'pg_rewrite'::regclass) THEN o.object_names[1] "
                    "ELSE (pg_identify_object(d.classoid, d.objoid, d.objsubid)).schema END")

# Each query yields (kind, name, definition). Names are schema-qualified and quoted as PostgreSQL would.
_QUERIES: tuple[str, ...] = (
    f"""SELECT 'schema', quote_ident(n.nspname), ''
        FROM pg_namespace n WHERE {_managed('n')} AND {_not_extension_member('pg_namespace', 'n.oid')}""",
    f"""SELECT 'extension', quote_ident(x.extname), 'schema ' || quote_ident(n.nspname) || ' version ' || x.extversion
        FROM pg_extension x JOIN pg_namespace n ON n.oid = x.extnamespace
        WHERE x.extname <> 'plpgsql' AND {_managed('n')}""",
    f"""SELECT CASE c.relkind WHEN 'p' THEN 'partitioned table' WHEN 'f' THEN 'foreign table' ELSE 'table' END,
               c.oid::regclass::text,
               concat_ws(' ',
                 'persistence=' || c.relpersistence::text,
                 'options=' || array_to_string(ARRAY(SELECT unnest(c.reloptions) ORDER BY 1), ','),  -- in any order
                 'partition key=' || pg_get_partkeydef(c.oid),
                 CASE WHEN c.relispartition THEN 'partition of=' ELSE 'inherits=' END  -- parents, in their order
                   || (SELECT string_agg(i.inhparent::regclass::text, ',' ORDER BY i.inhseqno)
                       FROM pg_inherits i WHERE i.inhrelid = c.oid),
                 'bound=' || pg_get_expr(c.relpartbound, c.oid),
                 'rls=' || c.relrowsecurity, 'force rls=' || c.relforcerowsecurity,
                 'replica identity=' || c.relreplident::text)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'f') AND {_managed('n')} AND {_not_extension_member('pg_class', 'c.oid')}""",
    f"""SELECT 'column', c.oid::regclass::text || '.' || quote_ident(a.attname),
               concat_ws(' ',
                 format_type(a.atttypid, a.atttypmod),
                 CASE WHEN a.attnotnull THEN 'not null' END,
                 -- PostgreSQL 18 keeps it as a constraint: its name, NOT VALID, NO INHERIT, when not the plain one
                 CASE WHEN nn.oid IS NOT NULL AND NOT (nn.convalidated AND NOT nn.connoinherit
                                                        AND nn.conname::text = c.relname || '_' || a.attname || '_not_null')
                      THEN concat_ws(' ', 'constraint ' || quote_ident(nn.conname),
                                     CASE WHEN NOT nn.convalidated THEN 'not valid' END,
                                     CASE WHEN nn.connoinherit THEN 'no inherit' END) END,
                 CASE WHEN a.attcollation <> t.typcollation THEN 'collate ' || co.collname END,
                 CASE WHEN a.attgenerated <> '' THEN 'generated ' || a.attgenerated::text || ' ' || pg_get_expr(d.adbin, d.adrelid)
                      WHEN d.adbin IS NOT NULL THEN 'default ' || pg_get_expr(d.adbin, d.adrelid) END,
                 CASE WHEN a.attidentity <> '' THEN 'identity ' || a.attidentity::text END,
                 CASE WHEN a.attstattarget >= 0 THEN 'statistics ' || a.attstattarget END,
                 CASE WHEN a.attstorage <> t.typstorage THEN 'storage ' || a.attstorage::text END,
                 -- a child's (not a partition's: those follow their parent) columns: inherited, and local too or not
                 CASE WHEN a.attinhcount > 0 AND NOT c.relispartition
                      THEN 'inherited ' || a.attinhcount || CASE WHEN a.attislocal THEN ' and local' ELSE '' END END)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_collation co ON co.oid = a.attcollation
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        LEFT JOIN pg_constraint nn ON nn.conrelid = a.attrelid AND nn.contype = 'n' AND nn.conkey[1] = a.attnum
             AND nn.conislocal AND nn.coninhcount = 0 AND NOT c.relispartition  -- a table's own, not inherited
        WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'f', 'v', 'm', 'c')
          AND {_managed('n')} AND {_not_extension_member('pg_class', 'c.oid')}
          AND (c.relkind <> 'c' OR {_not_extension_member('pg_type', 'c.reltype')})""",
    f"""SELECT 'constraint',
               CASE WHEN con.conrelid <> 0 THEN con.conrelid::regclass::text ELSE con.contypid::regtype::text END
                 || '.' || quote_ident(con.conname),
               pg_get_constraintdef(con.oid)
                 || CASE WHEN con.condeferrable THEN ' deferrable' ELSE '' END
                 || CASE WHEN con.condeferred THEN ' initially deferred' ELSE '' END
                 || CASE WHEN con.coninhcount > 0 AND NOT ch.relispartition
                         THEN ' inherited ' || con.coninhcount || CASE WHEN con.conislocal THEN ' and local' ELSE '' END
                         ELSE '' END
        FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace
        LEFT JOIN pg_class ch ON ch.oid = con.conrelid
        WHERE {_managed('n')} AND (con.conislocal OR NOT ch.relispartition)  -- a child's inherited ones, not a partition's
          AND con.contype <> 'n'  -- PostgreSQL 18's NOT NULL constraints: the column's "not null" says it
          AND {_not_extension_member('pg_constraint', 'con.oid')}
          AND (con.conrelid = 0 OR {_not_extension_member('pg_class', 'con.conrelid')})""",
    f"""SELECT 'index', quote_ident(n.nspname) || '.' || quote_ident(ic.relname), pg_get_indexdef(i.indexrelid)
                 || CASE WHEN i.indisvalid THEN '' ELSE ' INVALID' END
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_namespace n ON n.oid = ic.relnamespace
        WHERE {_managed('n')} AND {_not_extension_member('pg_class', 'i.indrelid')}""",
    f"""SELECT CASE c.relkind WHEN 'v' THEN 'view' ELSE 'materialized view' END, c.oid::regclass::text,
               pg_get_viewdef(c.oid) || coalesce(' with ' || array_to_string(ARRAY(SELECT unnest(c.reloptions) ORDER BY 1), ','), '')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('v', 'm') AND {_managed('n')} AND {_not_extension_member('pg_class', 'c.oid')}""",
    f"""SELECT 'sequence', c.oid::regclass::text,
               concat_ws(' ', format_type(s.seqtypid, NULL), 'start', s.seqstart, 'increment', s.seqincrement,
                 'min', s.seqmin, 'max', s.seqmax, 'cache', s.seqcache, CASE WHEN s.seqcycle THEN 'cycle' END,
                 (SELECT 'owned by ' || d.refobjid::regclass::text || '.' || quote_ident(a.attname)
                  FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')
                    AND d.refclassid = 'pg_class'::regclass LIMIT 1))
        FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_managed('n')} AND {_not_extension_member('pg_class', 'c.oid')}""",
    f"""SELECT CASE p.prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate' ELSE 'function' END,
               p.oid::regprocedure::text,
               CASE WHEN p.prokind = 'a' THEN
                 concat_ws(' ', 'kind', ag.aggkind::text, 'returns', format_type(p.prorettype, NULL),
                   'sfunc', ag.aggtransfn::regprocedure::text, 'stype', format_type(ag.aggtranstype, NULL),
                   'sspace', ag.aggtransspace, 'init', ag.agginitval,
                   'final', ag.aggfinalfn::regprocedure::text, 'extra', ag.aggfinalextra, 'modify', ag.aggfinalmodify::text,
                   'combine', ag.aggcombinefn::regprocedure::text, 'serial', ag.aggserialfn::regprocedure::text,
                   'deserial', ag.aggdeserialfn::regprocedure::text, 'msfunc', ag.aggmtransfn::regprocedure::text,
                   'minvfunc', ag.aggminvtransfn::regprocedure::text, 'mstype', format_type(ag.aggmtranstype, NULL),
                   'msspace', ag.aggmtransspace, 'minit', ag.aggminitval,
                   'mfinal', ag.aggmfinalfn::regprocedure::text, 'mextra', ag.aggmfinalextra,
                   'mmodify', ag.aggmfinalmodify::text, 'sortop', ag.aggsortop::regoperator::text,
                   'parallel', p.proparallel::text)
               ELSE pg_get_functiondef(p.oid) END
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        LEFT JOIN pg_aggregate ag ON ag.aggfnoid = p.oid
        WHERE {_managed('n')} AND {_not_extension_member('pg_proc', 'p.oid')}
          AND NOT EXISTS (SELECT 1 FROM pg_depend i WHERE i.classid = 'pg_proc'::regclass AND i.objid = p.oid
                          AND i.deptype = 'i')  -- a range type's constructors come and go with it""",
    f"""SELECT 'trigger', c.oid::regclass::text || '.' || quote_ident(t.tgname), pg_get_triggerdef(t.oid)
                 || CASE t.tgenabled WHEN 'O' THEN '' ELSE ' enabled=' || t.tgenabled::text END
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND {_managed('n')}
          AND {_not_extension_member('pg_class', 'c.oid')}""",
    f"""SELECT CASE t.typtype WHEN 'e' THEN 'enum' WHEN 'd' THEN 'domain' WHEN 'r' THEN 'range type'
                               WHEN 'm' THEN 'multirange type' ELSE 'composite type' END,
               t.oid::regtype::text,
               CASE t.typtype
                 WHEN 'e' THEN (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
                                FROM pg_enum e WHERE e.enumtypid = t.oid)
                 WHEN 'd' THEN concat_ws(' ', format_type(t.typbasetype, t.typtypmod),
                                 CASE WHEN t.typnotnull THEN 'not null' END, 'default ' || t.typdefault)
                 WHEN 'r' THEN (SELECT concat_ws(' ', 'subtype', format_type(r.rngsubtype, NULL),
                                  'opclass', r.rngsubopc::text, 'canonical', r.rngcanonical::text,
                                  'diff', r.rngsubdiff::text) FROM pg_range r WHERE r.rngtypid = t.oid)
                 ELSE '' END
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE (t.typtype IN ('e', 'd', 'r')
               OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
          AND {_managed('n')} AND {_not_extension_member('pg_type', 't.oid')}""",
    f"""SELECT 'policy', c.oid::regclass::text || '.' || quote_ident(p.polname),
               concat_ws(' ', CASE WHEN p.polpermissive THEN 'permissive' ELSE 'restrictive' END, 'for', p.polcmd::text,
                 'to', (SELECT string_agg(CASE WHEN r = 0 THEN 'public' ELSE quote_ident(pg_get_userbyid(r)) END, ','
                                          ORDER BY 1) FROM unnest(p.polroles) r),
                 'using', pg_get_expr(p.polqual, p.polrelid), 'check', pg_get_expr(p.polwithcheck, p.polrelid))
        FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {_managed('n')}""",
    f"""SELECT 'rule', c.oid::regclass::text || '.' || quote_ident(r.rulename), pg_get_ruledef(r.oid)
        FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE r.rulename <> '_RETURN' AND {_managed('n')}""",
    f"""SELECT 'statistics', quote_ident(n.nspname) || '.' || quote_ident(s.stxname), pg_get_statisticsobjdef(s.oid)
        FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace WHERE {_managed('n')}""",
    # collations, text search objects, operators: version-dependent columns read through to_jsonb
    f"""SELECT 'collation', quote_ident(n.nspname) || '.' || quote_ident(co.collname),
               concat_ws(' ', 'provider', co.collprovider::text, 'deterministic', co.collisdeterministic,
                 'collate', co.collcollate, 'ctype', co.collctype,
                 'locale', coalesce(to_jsonb(co) ->> 'colllocale', to_jsonb(co) ->> 'colliculocale'),
                 'rules', to_jsonb(co) ->> 'collicurules')
        FROM pg_collation co JOIN pg_namespace n ON n.oid = co.collnamespace
        WHERE {_managed('n')} AND {_not_extension_member('pg_collation', 'co.oid')}""",
    f"""SELECT 'text search dictionary', quote_ident(n.nspname) || '.' || quote_ident(d.dictname),
               concat_ws(' ', 'template', quote_ident(tn.nspname) || '.' || quote_ident(t.tmplname), d.dictinitoption)
        FROM pg_ts_dict d JOIN pg_namespace n ON n.oid = d.dictnamespace
        JOIN pg_ts_template t ON t.oid = d.dicttemplate JOIN pg_namespace tn ON tn.oid = t.tmplnamespace
        WHERE {_managed('n')} AND {_not_extension_member('pg_ts_dict', 'd.oid')}""",
    f"""SELECT 'text search configuration', quote_ident(n.nspname) || '.' || quote_ident(c.cfgname),
               concat_ws(' ', 'parser', quote_ident(pn.nspname) || '.' || quote_ident(p.prsname),
                 (SELECT string_agg(tt.alias || ' with ' || m.dicts, '; ' ORDER BY tt.tokid)
                  FROM ts_token_type(c.cfgparser) tt
                  JOIN (SELECT cm.maptokentype, string_agg(quote_ident(dn.nspname) || '.' || quote_ident(d.dictname), ', '
                                                           ORDER BY cm.mapseqno) AS dicts
                        FROM pg_ts_config_map cm JOIN pg_ts_dict d ON d.oid = cm.mapdict
                        JOIN pg_namespace dn ON dn.oid = d.dictnamespace
                        WHERE cm.mapcfg = c.oid GROUP BY cm.maptokentype) m ON m.maptokentype = tt.tokid))
        FROM pg_ts_config c JOIN pg_namespace n ON n.oid = c.cfgnamespace
        JOIN pg_ts_parser p ON p.oid = c.cfgparser JOIN pg_namespace pn ON pn.oid = p.prsnamespace
        WHERE {_managed('n')} AND {_not_extension_member('pg_ts_config', 'c.oid')}""",
    f"""SELECT 'text search parser', quote_ident(n.nspname) || '.' || quote_ident(p.prsname),
               concat_ws(' ', p.prsstart::regprocedure::text, p.prstoken::regprocedure::text, p.prsend::regprocedure::text,
                 p.prsheadline::regprocedure::text, p.prslextype::regprocedure::text)
        FROM pg_ts_parser p JOIN pg_namespace n ON n.oid = p.prsnamespace
        WHERE {_managed('n')} AND {_not_extension_member('pg_ts_parser', 'p.oid')}""",
    f"""SELECT 'text search template', quote_ident(n.nspname) || '.' || quote_ident(t.tmplname),
               concat_ws(' ', t.tmplinit::regprocedure::text, t.tmpllexize::regprocedure::text)
        FROM pg_ts_template t JOIN pg_namespace n ON n.oid = t.tmplnamespace
        WHERE {_managed('n')} AND {_not_extension_member('pg_ts_template', 't.oid')}""",
    f"""SELECT 'operator', o.oid::regoperator::text,
               concat_ws(' ', 'function', o.oprcode::regprocedure::text, 'returns', format_type(o.oprresult, NULL),
                 'commutator', o.oprcom::regoperator::text, 'negator', o.oprnegate::regoperator::text,
                 'restrict', o.oprrest::regprocedure::text, 'join', o.oprjoin::regprocedure::text,
                 'hashes', o.oprcanhash, 'merges', o.oprcanmerge)
        FROM pg_operator o JOIN pg_namespace n ON n.oid = o.oprnamespace
        WHERE {_managed('n')} AND {_not_extension_member('pg_operator', 'o.oid')}""",
    f"""SELECT 'operator class', quote_ident(n.nspname) || '.' || quote_ident(oc.opcname) || ' using ' || quote_ident(am.amname),
               concat_ws(' ', 'for', format_type(oc.opcintype, NULL), 'default', oc.opcdefault,
                 'family', quote_ident(fn.nspname) || '.' || quote_ident(f.opfname))
        FROM pg_opclass oc JOIN pg_namespace n ON n.oid = oc.opcnamespace JOIN pg_am am ON am.oid = oc.opcmethod
        JOIN pg_opfamily f ON f.oid = oc.opcfamily JOIN pg_namespace fn ON fn.oid = f.opfnamespace
        WHERE {_managed('n')} AND {_not_extension_member('pg_opclass', 'oc.oid')}""",
    """SELECT 'cast', '(' || format_type(c.castsource, NULL) || ' AS ' || format_type(c.casttarget, NULL) || ')',
               concat_ws(' ', 'method', c.castmethod::text, 'function', c.castfunc::regprocedure::text,
                 'context', c.castcontext::text)
        FROM pg_cast c
        WHERE c.oid >= 16384  -- user-defined: FirstNormalObjectId
          AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_cast'::regclass AND e.objid = c.oid
                          AND e.deptype = 'e')""",
    """SELECT 'event trigger', quote_ident(e.evtname),
               concat_ws(' ', 'on', e.evtevent, 'function', e.evtfoid::regprocedure::text,
                 'tags', array_to_string(e.evttags, ','), 'enabled', e.evtenabled::text)
        FROM pg_event_trigger e
        WHERE NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_event_trigger'::regclass
                          AND x.objid = e.oid AND x.deptype = 'e')""",
    """SELECT 'foreign data wrapper', quote_ident(w.fdwname),
               concat_ws(' ', 'handler', w.fdwhandler::regprocedure::text, 'validator', w.fdwvalidator::regprocedure::text,
                 'options', array_to_string(ARRAY(SELECT unnest(w.fdwoptions) ORDER BY 1), ','))
        FROM pg_foreign_data_wrapper w
        WHERE NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_foreign_data_wrapper'::regclass
                          AND x.objid = w.oid AND x.deptype = 'e')""",
    """SELECT 'server', quote_ident(s.srvname),
               concat_ws(' ', 'wrapper', quote_ident(w.fdwname), 'type', s.srvtype, 'version', s.srvversion,
                 'options', array_to_string(ARRAY(SELECT unnest(s.srvoptions) ORDER BY 1), ','))
        FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw
        WHERE NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_foreign_server'::regclass
                          AND x.objid = s.oid AND x.deptype = 'e')""",
    # built-in objects' comments (thousands) are left out before naming each: of the objects from initdb, only the
    # public schema may be commented by its user
    f"""SELECT 'comment', i.type || ' ' || i.identity, d.description
        FROM (SELECT * FROM pg_description WHERE objoid >= 16384 OR classoid = 'pg_namespace'::regclass) d
        CROSS JOIN LATERAL pg_identify_object(d.classoid, d.objoid, d.objsubid) i
        CROSS JOIN LATERAL pg_identify_object_as_address(d.classoid, d.objoid, d.objsubid) o
        CROSS JOIN LATERAL (SELECT {COMMENTED_SCHEMA} AS schema) s
        WHERE d.classoid <> 'pg_database'::regclass AND s.schema IS NOT NULL
          AND s.schema NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
          AND s.schema <> ALL(%(excluded)s::text[])
          AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = d.classoid AND e.objid = d.objoid
                          AND e.deptype = 'e')
          AND NOT (d.classoid = 'pg_namespace'::regclass AND s.schema = 'public'
                   AND d.description = 'standard public schema')""",
)


@dataclass(frozen=True)
class TargetIdentity:
    system_identifier: str
    database: str
    server_version: str
    server_version_num: int


class Objects(Mapping[tuple[str, str], str]):
    """A snapshot's (kind, name) -> definition, held as kind -> name -> definition: no key tuple per object, and
    dicts a fraction of one for all (8 MiB less for the 90,000 objects of 5,000 tables). Read-only."""

    __slots__ = ("_count", "_kinds")

    def __init__(self, kinds: dict[str, dict[str, str]]) -> None:
        """``kinds``' dicts become this mapping's own (not copied): nothing else may change them."""
        self._kinds = {kind: names for kind, names in kinds.items() if names}  # no empty kind: == compares contents
        self._count = sum(len(names) for names in self._kinds.values())

    @classmethod
    def of(cls, objects: Mapping[tuple[str, str], str]) -> Objects:
        """``objects`` as this mapping (itself when it is one)."""
        if isinstance(objects, Objects):
            return objects
        kinds: dict[str, dict[str, str]] = {}
        for (kind, name), definition in objects.items():
            kinds.setdefault(kind, {})[name] = definition
        return cls(kinds)

    def __getitem__(self, key: tuple[str, str]) -> str:
        try:
            kind, name = key
            return self._kinds[kind][name]
        except (KeyError, TypeError, ValueError):
            raise KeyError(key) from None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for kind, names in self._kinds.items():
            for name in names:
                yield kind, name

    def __len__(self) -> int:
        return self._count

    def items(self) -> ItemsView[tuple[str, str], str]:
        return _Items(self)

    def sorted_items(self) -> Iterator[tuple[tuple[str, str], str]]:
        """``sorted(self.items())``, without a list of them all: kinds in order, each kind's names in order."""
        for kind in sorted(self._kinds):
            names = self._kinds[kind]
            for name in sorted(names):
                yield (kind, name), names[name]

    def values(self) -> ValuesView[str]:
        return _Values(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Objects):
            return self._kinds == other._kinds
        if isinstance(other, Mapping):
            missing = object()
            return len(self) == len(other) and all(other.get(key, missing) == value for key, value in self.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking like a dict: equal by contents, not hashable

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class _Items(ItemsView[tuple[str, str], str]):
    _mapping: Objects

    def __iter__(self) -> Iterator[tuple[tuple[str, str], str]]:
        for kind, names in self._mapping._kinds.items():
            for name, definition in names.items():
                yield (kind, name), definition


class _Values(ValuesView[str]):
    _mapping: Objects

    def __iter__(self) -> Iterator[str]:
        for names in self._mapping._kinds.values():
            yield from names.values()


@dataclass(frozen=True)
class SchemaSnapshot:
    """Every managed object as (kind, name) -> normalised definition."""

    objects: Mapping[tuple[str, str], str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", Objects.of(self.objects))

    @functools.cached_property
    def fingerprint(self) -> str:
        """Computed once: a plan asks for it several times (100,000 objects: a quarter of a second each)."""
        assert isinstance(self.objects, Objects)
        digest = hashlib.sha256()
        for (kind, name), definition in self.objects.sorted_items():
            digest.update(f"{kind}\t{name}\t{definition}\n".encode())
        return "sha256:" + digest.hexdigest()


# The words for how an object differs from what was expected (the desired schema for drift, verify and apply's
# verification; the live schema as planned for a stale plan), in one place so every command says them alike.
DIFFERENCES = {
    "missing": "expected, not in the database",
    "unexpected": "in the database, not expected",
    "different": "in both, defined otherwise",
}


def difference(expected: Mapping[Any, object], actual: Mapping[Any, object], key: object) -> str | None:
    """Which of DIFFERENCES ``key`` is, or None where both agree."""
    if key not in actual:
        return "missing" if key in expected else None
    if key not in expected:
        return "unexpected"
    return "different" if expected[key] != actual[key] else None


def describe_difference(name: str, change: str) -> str:
    """'table public.t (missing)': how drift, verify and stale plans name an object that differs."""
    assert change in DIFFERENCES, change
    return f"{name} ({change})"


@dataclass(frozen=True)
class ObjectDifference:
    kind: str
    name: str
    change: str  # one of DIFFERENCES

    def __str__(self) -> str:
        return describe_difference(f"{self.kind} {self.name}", self.change)


@dataclass(frozen=True, slots=True)
class TableSize:
    table: str
    rows: int
    bytes: int


def identity(conn: psycopg.Connection[Any]) -> TargetIdentity:
    row = conn.execute(
        "SELECT (SELECT system_identifier::text FROM pg_control_system()), current_database(), "
        "current_setting('server_version'), current_setting('server_version_num')::int"
    ).fetchone()
    assert row is not None
    return TargetIdentity(system_identifier=row[0], database=row[1], server_version=row[2], server_version_num=row[3])


def snapshot(conn: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...] = (DEFAULT_METADATA_SCHEMA,),
             owners: bool = False, privileges: bool = False) -> SchemaSnapshot:
    """Read the catalogs in one transaction-consistent pass (works inside an open transaction too).

    ``owners`` and ``privileges`` add a row per object for its owner and its ACL (and one per default
    privileges entry): off by default, so snapshots and fingerprints without them stay as they were."""
    kinds: dict[str, dict[str, str]] = {}
    params = {"excluded": list(exclude_schemas)}
    keep = {"": ""}.setdefault  # each definition once: 90,000 objects of 5,000 tables have 23,000 definitions
    with _catalog_search_path(conn) as cur:
        for query in _QUERIES:
            for kind, name, definition in stream(cur, query.encode(), params):
                names = kinds.get(kind)
                if names is None:
                    names = kinds[kind] = {}
                names[name] = keep(definition, definition) if definition else ""
    if owners or privileges:
        for (kind, name), definition in security_rows(security(conn, exclude_schemas=exclude_schemas), owners=owners,
                                                      privileges=privileges).items():
            kinds.setdefault(kind, {})[name] = definition
    return SchemaSnapshot(objects=Objects(kinds))


def compare(desired: SchemaSnapshot, live: SchemaSnapshot) -> list[ObjectDifference]:
    """The objects that differ, in a stable order."""
    want, have = desired.objects, live.objects
    found = {key: "missing" if key not in have else "different" for key, definition in want.items()
             if have.get(key) != definition}
    found.update((key, "unexpected") for key in have if key not in want)
    return [ObjectDifference(kind, name, found[(kind, name)]) for kind, name in sorted(found)]


def table_sizes(conn: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...] = (DEFAULT_METADATA_SCHEMA,)) -> dict[str, TableSize]:
    """Estimated rows and bytes from the catalog (no scans), for hazards and data-aware policies."""
    rows = conn.execute(
        f"""SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), greatest(c.reltuples, 0)::bigint, pg_total_relation_size(c.oid)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind IN ('r', 'p', 'm') AND {_managed('n')}""".encode(),
        {"excluded": list(exclude_schemas)},
    ).fetchall()
    return {name: TableSize(table=name, rows=int(r), bytes=int(b)) for name, r, b in rows}


# --- owners and privileges (opt-in: they name the environment's roles) ---------------------------

APPLYING_ROLE_SETTING = "reconciler.applying_role"
PUBLIC = "=public"  # the PUBLIC pseudo-role as a grantee
OWNER = "=owner"  # the object's owner, whoever that is: owners' own privileges do not depend on who owns
APPLYING_ROLE = "=applying role"  # the role that runs the plan (current_user, or the database's reconciler.applying_role)

# acldefault()'s and pg_default_acl's letters for the kinds that hold an ACL
ACL_TYPES = {"table": "r", "view": "r", "materialized view": "r", "foreign table": "r", "sequence": "s",
             "function": "f", "procedure": "f", "aggregate": "f", "schema": "n", "type": "T", "domain": "T"}
DEFAULT_ACL_TYPES = {"r": "tables", "S": "sequences", "f": "functions", "T": "types", "n": "schemas"}


@dataclass(frozen=True, order=True)
class Grant:
    """One (grantee, privilege) of an ACL, from aclexplode(); grantors are not compared."""

    grantee: str  # a role name, PUBLIC or OWNER
    privilege: str  # SELECT, EXECUTE, USAGE, ...
    grantable: bool

    def describe(self) -> str:
        who = {PUBLIC: "PUBLIC", OWNER: "owner"}.get(self.grantee) or quote_role(self.grantee)
        return f"{who}:{self.privilege}{' with grant option' if self.grantable else ''}"


@dataclass(frozen=True)
class Secured:
    """An object's owner and ACL (a NULL ACL read as acldefault(), so both spellings compare equal)."""

    kind: str  # table, view, materialized view, foreign table, sequence, schema, function, procedure, aggregate,
    #            type, domain, statistics, column
    name: str  # SQL-ready, quoted by PostgreSQL: public.t, public.f(integer); for a column, its table
    column: str | None  # a column's quoted name
    schema: str | None  # the quoted schema it lives in (None for a schema)
    bare: str  # unquoted schema.name[.column], as the diff's change objects name it
    owner: str | None  # a role name or APPLYING_ROLE; None for columns (they follow their table)
    grants: frozenset[Grant] | None  # None: the kind has no ACL
    linked: bool = False  # a sequence owned by a column: its owner follows the table's

    @property
    def label(self) -> str:
        return f"column {self.name}.{self.column}" if self.column else f"{self.kind} {self.name}"


@dataclass(frozen=True)
class DefaultAcl:
    """One pg_default_acl row: what objects a role creates start with (in a schema: on top of the rest)."""

    role: str  # a role name or APPLYING_ROLE
    schema: str | None  # quoted; None: the role's global entry (it replaces the built-in default)
    objtype: str  # r, S, f, T, n
    grants: frozenset[Grant]

    @property
    def label(self) -> str:
        role = "the applying role" if self.role == APPLYING_ROLE else quote_role(self.role)
        where = f" in schema {self.schema}" if self.schema else ""
        return f"for {role}{where} on {DEFAULT_ACL_TYPES.get(self.objtype, self.objtype)}"


@dataclass(frozen=True)
class Security:
    objects: Mapping[tuple[str, str, str | None], Secured]  # (kind, name, column)
    default_acls: Mapping[tuple[str, str | None, str], DefaultAcl]  # (role, schema, objtype)
    applying_roles: frozenset[str]  # the real names APPLYING_ROLE stands for here


def quote_role(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _grants(acl: str, owner: str) -> str:
    """SQL: the ACL exploded as a JSON array of [grantee, privilege, grantable]."""
    return (f"(SELECT coalesce(json_agg(json_build_array(CASE WHEN a.grantee = 0 THEN '{PUBLIC}' "
            f"WHEN a.grantee = {owner} THEN '{OWNER}' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, "
            f"a.is_grantable)), '[]') FROM aclexplode(CASE WHEN cardinality({acl}) > 0 THEN {acl} END) a)")


_RELATION_ACL = "coalesce(c.relacl, acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::\"char\", c.relowner))"

# (kind, name, column, schema, bare, owner, grants, linked)
_SECURED_QUERY = f"""
    SELECT CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
                          WHEN 'f' THEN 'foreign table' ELSE 'table' END,
           quote_ident(n.nspname) || '.' || quote_ident(c.relname), NULL, quote_ident(n.nspname),
           n.nspname || '.' || c.relname, pg_get_userbyid(c.relowner),
           {_grants(_RELATION_ACL, "c.relowner")},
           c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                                       AND d.objid = c.oid AND d.refclassid = 'pg_class'::regclass
                                       AND d.deptype IN ('a', 'i'))
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND {_managed('n')} AND {_not_extension_member('pg_class', 'c.oid')}
    UNION ALL
    SELECT 'column', quote_ident(n.nspname) || '.' || quote_ident(c.relname), quote_ident(a.attname),
           quote_ident(n.nspname), n.nspname || '.' || c.relname || '.' || a.attname, NULL,
           {_grants("a.attacl", "c.relowner")}, false
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
      AND {_managed('n')} AND {_not_extension_member('pg_class', 'c.oid')}
    UNION ALL
    SELECT 'schema', quote_ident(n.nspname), NULL, NULL, n.nspname, pg_get_userbyid(n.nspowner),
           {_grants("coalesce(n.nspacl, acldefault('n', n.nspowner))", "n.nspowner")}, false
    FROM pg_namespace n WHERE {_managed('n')} AND {_not_extension_member('pg_namespace', 'n.oid')}
    UNION ALL
    SELECT CASE p.prokind WHEN 'p' THEN 'procedure' WHEN 'a' THEN 'aggregate' ELSE 'function' END,
           p.oid::regprocedure::text, NULL, quote_ident(n.nspname), n.nspname || '.' || p.proname,
           pg_get_userbyid(p.proowner), {_grants("coalesce(p.proacl, acldefault('f', p.proowner))", "p.proowner")}, false
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE {_managed('n')} AND {_not_extension_member('pg_proc', 'p.oid')}
    UNION ALL
    SELECT CASE t.typtype WHEN 'd' THEN 'domain' ELSE 'type' END,
           quote_ident(n.nspname) || '.' || quote_ident(t.typname), NULL, quote_ident(n.nspname),
           n.nspname || '.' || t.typname, pg_get_userbyid(t.typowner),
           {_grants("coalesce(t.typacl, acldefault('T', t.typowner))", "t.typowner")}, false
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE (t.typtype IN ('e', 'd', 'r')
           OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
      AND {_managed('n')} AND {_not_extension_member('pg_type', 't.oid')}
    UNION ALL
    SELECT 'statistics', quote_ident(n.nspname) || '.' || quote_ident(s.stxname), NULL, quote_ident(n.nspname),
           n.nspname || '.' || s.stxname, pg_get_userbyid(s.stxowner), NULL, false
    FROM pg_statistic_ext s JOIN pg_namespace n ON n.oid = s.stxnamespace
    WHERE {_managed('n')} AND {_not_extension_member('pg_statistic_ext', 's.oid')}"""

_DEFAULT_ACL_QUERY = f"""
    SELECT pg_get_userbyid(d.defaclrole), CASE WHEN d.defaclnamespace = 0 THEN NULL ELSE quote_ident(n.nspname) END,
           d.defaclobjtype::text, {_grants("d.defaclacl", "d.defaclrole")}
    FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
    WHERE d.defaclnamespace = 0 OR ({_managed('n')})"""


def _grant_set(rows: Any) -> frozenset[Grant]:
    """Grants without their grantors; a privilege held with and without grant option counts once, with."""
    found = {Grant(str(g), str(p), bool(o)) for g, p, o in rows or ()}
    return frozenset(g for g in found if g.grantable or Grant(g.grantee, g.privilege, True) not in found)


@contextlib.contextmanager
def _catalog_search_path(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Cursor[Any]]:
    """Names and definitions come out schema-qualified only with an empty search path, so a role's own
    search_path cannot change what is read (works inside an open transaction too)."""
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('search_path'), set_config('search_path', 'pg_catalog', false)")
        row = cur.fetchone()
        assert row is not None
        try:
            yield cur
        finally:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.INERROR:
                cur.execute("SELECT set_config('search_path', %s, false)", (row[0],))


def applying_roles(conn: psycopg.Connection[Any]) -> frozenset[str]:
    """Who stands for the applying role on this connection: current_user and, on a rehearsal copy, the
    target's role named by the database setting reconciler.applying_role."""
    row = conn.execute("SELECT current_user::text, current_setting(%s, true)", (APPLYING_ROLE_SETTING,)).fetchone()
    assert row is not None
    return frozenset(r for r in row if r)


def security(conn: psycopg.Connection[Any], *,
             exclude_schemas: tuple[str, ...] = (DEFAULT_METADATA_SCHEMA,)) -> Security:
    """Owners, ACLs and default privileges of every managed object."""
    params = {"excluded": list(exclude_schemas)}
    mine = applying_roles(conn)

    def role(name: str) -> str:
        return APPLYING_ROLE if name in mine else name

    with _catalog_search_path(conn) as cur:
        cur.execute(_SECURED_QUERY.encode(), params)
        objects = {
            (kind, name, column): Secured(kind, name, column, schema, bare, role(owner) if owner is not None else None,
                                          _grant_set(grants) if grants is not None else None, bool(linked))
            for kind, name, column, schema, bare, owner, grants, linked in cur.fetchall()
        }
        cur.execute(_DEFAULT_ACL_QUERY.encode(), params)
        defaults = {}
        for owner, schema, objtype, grants in cur.fetchall():
            entry = DefaultAcl(role(owner), schema, objtype, _grant_set(grants))
            defaults[(entry.role, schema, objtype)] = entry
    return Security(objects=objects, default_acls=defaults, applying_roles=mine)


def security_rows(sec: Security, *, owners: bool, privileges: bool) -> dict[tuple[str, str], str]:
    """The snapshot's rows for owners and privileges."""
    rows: dict[tuple[str, str], str] = {}
    for obj in sec.objects.values():
        if owners and obj.owner is not None and not obj.linked:
            rows[("owner", obj.label)] = "the applying role" if obj.owner == APPLYING_ROLE else quote_role(obj.owner)
        if privileges and obj.grants is not None and (obj.grants or obj.column is None):
            rows[("privileges", obj.label)] = ", ".join(g.describe() for g in sorted(obj.grants))
    if privileges:
        for entry in sec.default_acls.values():
            rows[("default privileges", entry.label)] = ", ".join(g.describe() for g in sorted(entry.grants))
    return rows


# --- live facts for the safety compiler -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ColumnFact:
    type: str  # format_type, schema-qualified where needed
    type_oid: int
    not_null: bool
    default: str | None


@dataclass(frozen=True, slots=True)
class IndexFact:
    table: str
    definition: str
    backs_constraint: bool
    on_partitioned: bool


@dataclass(frozen=True, slots=True)
class KeyFact:
    """A one-column primary key, unique constraint or foreign key: a column rewrite can carry it over (rebuilt on the
    new column, or re-pointed at it)."""

    name: str
    table: str  # 'schema.table' it is on
    kind: str  # 'p', 'u' or 'f'
    column: str
    definition: str  # pg_get_constraintdef
    ref_table: str | None = None  # a foreign key's referenced table and column
    ref_column: str | None = None
    index: str | None = None  # 'schema.index' a key's index (for a primary key or unique constraint)
    validated: bool = True


SEQUENCE_TYPES = {"smallint": (-32768, 32767), "integer": (-2147483648, 2147483647),
                  "bigint": (-9223372036854775808, 9223372036854775807)}


def default_bounds(type_: str, increment: int = 1) -> tuple[int, int]:
    """A sequence's MINVALUE and MAXVALUE when none is given (PostgreSQL's: from 1 up, or down to -1)."""
    low, high = SEQUENCE_TYPES.get(type_, SEQUENCE_TYPES["bigint"])
    return (1, high) if increment > 0 else (low, -1)


@dataclasses.dataclass(frozen=True)
class SequenceOptions:
    """A sequence's type and options, as ``pg_sequence`` holds them."""

    type: str  # format_type: its bounds are the sequence's by default
    start: int
    increment: int
    minimum: int
    maximum: int
    cache: int
    cycle: bool


@dataclasses.dataclass(frozen=True)
class IdentityFact(SequenceOptions):
    """An identity column's sequence: a dual column's cut-over gives the incoming column an identity of its own that
    goes on where this one stopped (an identity's sequence cannot change columns)."""

    sequence: str  # 'schema.sequence'
    always: bool  # GENERATED ALWAYS (else BY DEFAULT)

    def options(self) -> str:
        """The sequence's options for ``ADD GENERATED ... AS IDENTITY (...)``, its bounds only where they are not
        its type's own (a sequence widened with its column gets the new type's)."""
        default_min, default_max = default_bounds(self.type, self.increment)
        parts = [f"START WITH {self.start}", f"INCREMENT BY {self.increment}"]
        parts += [f"MINVALUE {self.minimum}"] if self.minimum != default_min else []
        parts += [f"MAXVALUE {self.maximum}"] if self.maximum != default_max else []
        return " ".join([*parts, f"CACHE {self.cache}", "CYCLE" if self.cycle else "NO CYCLE"])


@dataclass(frozen=True)
class LockTable:
    """The server's shared lock table: how many objects all transactions together can hold locks on."""

    max_locks_per_transaction: int
    max_connections: int
    max_prepared_transactions: int

    @property
    def slots(self) -> int:
        return self.max_locks_per_transaction * (self.max_connections + self.max_prepared_transactions)


@dataclass(frozen=True)
class LiveFacts:
    """What the safety compiler needs to know about the target, read once, before compiling."""

    tables: Mapping[str, TableSize]  # 'schema.table' (unquoted) -> size
    partitioned: frozenset[str]
    columns: Mapping[tuple[str, str], ColumnFact]
    indexes: Mapping[str, IndexFact]  # 'schema.index' -> fact
    enums: Mapping[str, tuple[str, ...]]
    views: Mapping[str, str]
    volatile_functions: frozenset[str]  # bare names of volatile functions (any schema)
    binary_coercible: frozenset[tuple[int, int]]  # (source type oid, target type oid)
    type_oids: Mapping[str, int]  # 'schema.type' and bare builtin names -> oid
    lock_table: LockTable | None = None  # None: not read (a plan is then never split for it)
    routines: frozenset[str] = frozenset()  # 'schema.name' of every function and procedure: a CREATE of another is new
    # (source, target) type oids PostgreSQL converts in an assignment (pg_cast's implicit and assignment casts), and
    # the string types (any type converts to one of them in an assignment, through its output function)
    assignment_casts: frozenset[tuple[int, int]] = frozenset()
    explicit_casts: frozenset[tuple[int, int]] = frozenset()  # those only an explicit CAST or :: makes
    implicit_casts: frozenset[tuple[int, int]] = frozenset()  # those PostgreSQL makes anywhere (widenings: int4 to int8)
    string_types: frozenset[int] = frozenset()
    domain_types: frozenset[int] = frozenset()
    # ('schema.table', column) something depends on beyond its default, plain indexes, one-column keys and a sequence
    # it owns or its identity's, and views (a constraint of more columns, a materialized view, a trigger's column
    # list, a policy, a rule, extended statistics): a column rewrite cannot go online
    busy_columns: frozenset[tuple[str, str]] = frozenset()
    # ('schema.table', column) -> the views that read it, and the views over those: a cut-over makes them again
    column_views: Mapping[tuple[str, str], tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # ('schema.table', column) -> the one-column keys on it or referencing it (a foreign key is under both its columns)
    keys: Mapping[tuple[str, str], tuple[KeyFact, ...]] = dataclasses.field(default_factory=dict)
    # ('schema.table', column) -> 'schema.sequence' it owns (serial's OWNED BY; not an identity's)
    owned_sequences: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    identities: Mapping[tuple[str, str], IdentityFact] = dataclasses.field(default_factory=dict)
    server_version_num: int = 0  # 0: not read

    def has_table(self, name: str) -> bool:
        return qualify(name) in self.tables


def qualify(name: str) -> str:
    """'t' -> 'public.t': migra qualifies everything, the rest runs with the default search path."""
    return name if "." in name else f"public.{name}"


_SMALL_TABLE_BYTES = 64 * 1024 * 1024


_COUNTS_PER_QUERY = 200
# a primary key, unique constraint or foreign key of one column (each side), not deferrable, on a table (not a
# partitioned one: its key is its partitions' too): what a dual column can rebuild or re-point (``k``: pg_constraint)
_ONE_COLUMN_KEY = """(k.contype IN ('p', 'u', 'f') AND cardinality(k.conkey) = 1 AND NOT k.condeferrable
                      AND coalesce(cardinality(k.confkey), 1) = 1 AND k.conparentid = 0
                      AND NOT EXISTS (SELECT 1 FROM pg_class kc WHERE kc.oid IN (k.conrelid, k.confrelid)
                                        AND (kc.relkind = 'p' OR kc.relispartition)))"""


def _count_rows(conn: psycopg.Connection[Any], tables: Sequence[str]) -> dict[str, int]:
    """Exact row counts, many tables to a query (a fresh GitLab has 1,401 tables never analysed)."""
    counts: dict[str, int] = {}
    for start in range(0, len(tables), _COUNTS_PER_QUERY):
        chunk = tables[start:start + _COUNTS_PER_QUERY]
        query = sql.SQL("SELECT {}").format(sql.SQL(", ").join(
            sql.SQL("(SELECT count(*) FROM {})").format(sql.Identifier(*name.split(".", 1))) for name in chunk))
        row = conn.execute(query).fetchone()
        counts.update(zip(chunk, (int(n) for n in row or ()), strict=True))
    return counts


def live_facts(conn: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...] = (DEFAULT_METADATA_SCHEMA,),
               known: LiveFacts | None = None) -> LiveFacts:
    """``known``: facts read before from catalogs that have not changed since (watch's memo of live): only the
    tables' sizes and the server's settings are read again."""
    params = {"excluded": list(exclude_schemas)}
    managed = _managed("n")
    with conn.cursor() as cur:
        cur.execute(
            f"""SELECT n.nspname || '.' || c.relname, c.relkind, c.reltuples::bigint, pg_total_relation_size(c.oid),
                       c.relkind <> 'p' AND pg_relation_size(c.oid) = 0
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p', 'm') AND {managed}""".encode(), params)
        found = cur.fetchall()
        # never analysed: small enough to count; a heap of no pages holds no row (a row's page is added to the file
        # when it is written), nothing to count
        counted = _count_rows(conn, [name for name, _kind, reltuples, size, empty in found
                                     if int(reltuples) < 0 and size <= _SMALL_TABLE_BYTES and not empty])
        tables: dict[str, TableSize] = {}
        partitioned = set()
        for name, kind, reltuples, size, _empty in found:
            rows = counted.get(name, int(reltuples))
            tables[name] = TableSize(table=name, rows=max(rows, 0), bytes=int(size))
            if kind == "p":
                partitioned.add(name)
        cur.execute("SELECT current_setting('max_locks_per_transaction')::int, current_setting('max_connections')::int, "
                    "current_setting('max_prepared_transactions')::int, current_setting('server_version_num')::int")
        locks = cur.fetchone()
        lock_table = LockTable(int(locks[0]), int(locks[1]), int(locks[2])) if locks else None
        version = int(locks[3]) if locks else 0
        if known is not None:
            return dataclasses.replace(known, tables=tables, partitioned=frozenset(partitioned), lock_table=lock_table,
                                       server_version_num=version)
        # a table's name, a type, a default, a type's oid: one object each, however many columns repeat it
        keep = {name: name for name in tables}.setdefault
        keep_oid: dict[int, int] = {}
        answer = stream(cur,
            f"""SELECT n.nspname || '.' || c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid::int,
                       a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
                FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND {managed}""".encode(), params)
        columns = {(keep(t, t), keep(col, col)): ColumnFact(keep(typ, typ), keep_oid.setdefault(oid, oid), bool(nn),
                                                            None if default is None else keep(default, default))
                   for t, col, typ, oid, nn, default in answer}
        answer = stream(cur,
            f"""SELECT n.nspname || '.' || ic.relname, tn.nspname || '.' || tc.relname, pg_get_indexdef(i.indexrelid),
                       EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid), tc.relkind = 'p'
                FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_namespace n ON n.oid = ic.relnamespace
                JOIN pg_class tc ON tc.oid = i.indrelid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
                WHERE {managed}""".encode(), params)
        indexes = {name: IndexFact(keep(table, table), definition, bool(backs), bool(part))
                   for name, table, definition, backs, part in answer}
        cur.execute(
            f"""SELECT n.nspname || '.' || t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder)
                FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace JOIN pg_enum e ON e.enumtypid = t.oid
                WHERE {managed} GROUP BY 1""".encode(), params)
        enums = {name: tuple(labels) for name, labels in cur.fetchall()}
        cur.execute(
            f"""SELECT n.nspname || '.' || c.relname, pg_get_viewdef(c.oid)
                FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind = 'v' AND {managed}""".encode(), params)
        views = {name: definition for name, definition in cur.fetchall()}
        cur.execute("SELECT DISTINCT proname FROM pg_proc WHERE provolatile = 'v'")
        volatile = frozenset(r[0] for r in cur.fetchall())
        cur.execute("""SELECT DISTINCT n.nspname || '.' || p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                       WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')""")
        routines = frozenset(r[0] for r in cur.fetchall())
        cur.execute("SELECT castsource::int, casttarget::int, castmethod = 'b', castcontext IN ('a', 'i'), "
                    "castcontext = 'i' FROM pg_cast")
        casts = cur.fetchall()
        coercible = frozenset((int(a), int(b)) for a, b, binary, _, _ in casts if binary)
        assignment = frozenset((int(a), int(b)) for a, b, _, assigned, _ in casts if assigned)
        explicit = frozenset((int(a), int(b)) for a, b, _, assigned, _ in casts if not assigned)
        implicit = frozenset((int(a), int(b)) for a, b, _, _, anywhere in casts if anywhere)
        cur.execute(
            f"""SELECT DISTINCT n.nspname || '.' || c.relname, a.attname
                FROM pg_depend d JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
                JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid
                WHERE d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0 AND d.classid <> 'pg_attrdef'::regclass
                  AND NOT (d.classid = 'pg_constraint'::regclass AND EXISTS (  -- PostgreSQL 18's NOT NULL
                      SELECT 1 FROM pg_constraint k WHERE k.oid = d.objid AND k.contype::text = 'n'))
                  AND NOT (d.classid = 'pg_class'::regclass AND EXISTS (
                      SELECT 1 FROM pg_index i WHERE i.indexrelid = d.objid
                        AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid
                                          AND NOT {_ONE_COLUMN_KEY})))
                  AND NOT (d.classid = 'pg_constraint'::regclass AND EXISTS (
                      SELECT 1 FROM pg_constraint k WHERE k.oid = d.objid AND {_ONE_COLUMN_KEY}))
                  AND NOT (d.classid = 'pg_trigger'::regclass AND EXISTS (  -- a dual column's own, its WHEN
                      SELECT 1 FROM pg_trigger g WHERE g.oid = d.objid AND g.tgname LIKE 'reconciler\\_copy\\_%%'))
                  AND NOT (d.classid = 'pg_rewrite'::regclass AND EXISTS (  -- another relation's view: column_views
                      SELECT 1 FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class
                      WHERE r.oid = d.objid AND v.oid <> d.refobjid AND v.relkind IN ('v', 'm')))
                  AND NOT (d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') AND EXISTS (
                      SELECT 1 FROM pg_class s WHERE s.oid = d.objid AND s.relkind = 'S'))  -- serial's, an identity's
                  AND {managed}""".encode(), params)
        busy = {(str(t), str(col)) for t, col in cur.fetchall()}
        cur.execute(
            f"""WITH RECURSIVE over (tbl, col, view) AS (
                    SELECT n.nspname || '.' || c.relname, a.attname, v.oid
                    FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
                    JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
                    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid
                    WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
                      AND d.refobjsubid > 0 AND v.oid <> c.oid AND {managed}
                  UNION
                    SELECT over.tbl, over.col, r.ev_class
                    FROM over JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = over.view
                    JOIN pg_rewrite r ON r.oid = d.objid AND d.classid = 'pg_rewrite'::regclass
                    WHERE r.ev_class <> over.view)
                SELECT over.tbl, over.col, vn.nspname || '.' || v.relname, v.relkind = 'v'
                FROM over JOIN pg_class v ON v.oid = over.view JOIN pg_namespace vn ON vn.oid = v.relnamespace
                ORDER BY 1, 2, 3""".encode(), params)
        viewed: dict[tuple[str, str], list[str]] = {}
        for t, col, view, plain in cur.fetchall():
            viewed.setdefault((str(t), str(col)), []).append(str(view))
            if not plain:  # a materialized view: made again in a cut-over, it would compute its rows under the lock
                busy.add((str(t), str(col)))
        column_views = {column: tuple(views) for column, views in viewed.items()}
        cur.execute(
            f"""SELECT n.nspname || '.' || c.relname, a.attname, sn.nspname || '.' || s.relname
                FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
                JOIN pg_namespace sn ON sn.oid = s.relnamespace
                JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
                JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid
                WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'a'
                  AND {managed}""".encode(), params)
        owned = {(str(t), str(col)): str(seq) for t, col, seq in cur.fetchall()}
        cur.execute(
            f"""SELECT n.nspname || '.' || c.relname, a.attname, sn.nspname || '.' || s.relname, a.attidentity = 'a',
                       q.seqstart, q.seqincrement, q.seqmin, q.seqmax, q.seqcache, q.seqcycle, format_type(q.seqtypid, NULL)
                FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
                JOIN pg_sequence q ON q.seqrelid = s.oid JOIN pg_namespace sn ON sn.oid = s.relnamespace
                JOIN pg_class c ON c.oid = d.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
                JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid AND a.attidentity <> ''
                WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype = 'i'
                  AND {managed}""".encode(), params)
        identities = {(str(t), str(col)): IdentityFact(
            type=str(type_), start=int(start), increment=int(step), minimum=int(low), maximum=int(high), cache=int(cache),
            cycle=bool(cycle), sequence=str(seq), always=bool(always))
            for t, col, seq, always, start, step, low, high, cache, cycle, type_ in cur.fetchall()}
        cur.execute(
            f"""SELECT k.conname, n.nspname || '.' || c.relname, k.contype::text, a.attname, pg_get_constraintdef(k.oid),
                       rn.nspname || '.' || r.relname, ra.attname, ino.nspname || '.' || ic.relname, k.convalidated
                FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
                LEFT JOIN pg_class r ON r.oid = k.confrelid LEFT JOIN pg_namespace rn ON rn.oid = r.relnamespace
                LEFT JOIN pg_attribute ra ON ra.attrelid = k.confrelid AND ra.attnum = k.confkey[1]
                LEFT JOIN pg_class ic ON ic.oid = k.conindid AND k.contype <> 'f'
                LEFT JOIN pg_namespace ino ON ino.oid = ic.relnamespace
                WHERE {_ONE_COLUMN_KEY} AND {managed}""".encode(), params)
        keyed: dict[tuple[str, str], list[KeyFact]] = {}
        for name, table, kind, column, definition, ref_table, ref_column, index, valid in cur.fetchall():
            key = KeyFact(name, table, kind, column, definition, ref_table if kind == "f" else None,
                          ref_column if kind == "f" else None, index, bool(valid))
            keyed.setdefault((table, column), []).append(key)
            if key.ref_table is not None and key.ref_column is not None:
                keyed.setdefault((key.ref_table, key.ref_column), []).append(key)
        keys = {column: tuple(found) for column, found in keyed.items()}
        cur.execute("SELECT oid::int, typcategory = 'S' FROM pg_type WHERE typcategory = 'S' OR typtype = 'd'")
        kinds = cur.fetchall()
        strings = frozenset(int(oid) for oid, string in kinds if string)
        domains = frozenset(int(oid) for oid, string in kinds if not string)
        answer = stream(cur,
            """SELECT n.nspname || '.' || t.typname, t.oid::int, n.nspname = 'pg_catalog', format_type(t.oid, NULL)
               FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
               WHERE t.typtype IN ('b', 'e', 'd', 'r', 'c') AND n.nspname NOT IN ('information_schema', 'pg_toast')""")
        type_oids: dict[str, int] = {}
        for name, oid, builtin, formatted in answer:
            type_oids[name] = int(oid)
            if builtin:
                type_oids[name.split(".", 1)[1]] = int(oid)
                type_oids[formatted] = int(oid)
    return LiveFacts(
        tables=tables, partitioned=frozenset(partitioned), columns=columns, indexes=indexes, enums=enums,
        views=views, volatile_functions=volatile, binary_coercible=coercible, type_oids=type_oids,
        lock_table=lock_table, routines=routines, assignment_casts=assignment, explicit_casts=explicit, implicit_casts=implicit,
        string_types=strings, domain_types=domains, busy_columns=frozenset(busy), column_views=column_views, keys=keys,
        owned_sequences=owned, identities=identities, server_version_num=version,
    )
