"""What a reviewer sees first, on a plan made by the command line against a real database: each phase's locks, who
waits, the tables' sizes and the estimate; the phases as a Mermaid gantt chart (checked by Mermaid's own parser) and
as an SVG file; estimates learned from the target's own recorded runs."""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from markdown_it import MarkdownIt

from reconciler.cli import main
from reconciler.estimates import CATALOG_SECONDS, DEFAULT_RATES
from reconciler.render import render
from tests.conftest import run_sql
from tests.schema_repo import LEDGER, plan_in
from tests.test_deploy_github import ROOT, needs

ROWS = """
INSERT INTO accounts SELECT g, 'u' || g || '@example.com', 'n' || g FROM generate_series(1, 20000) g;
INSERT INTO ledger SELECT g, 1 + g % 20000, 1 + g % 50 FROM generate_series(1, 60000) g;
ANALYZE accounts, ledger;
"""
MERMAID_PARSE = """
const mermaid = (await import(process.argv[2])).default;
let text = '';
for await (const chunk of process.stdin) text += chunk;
const parsed = await mermaid.parse(text);
console.log(parsed.diagramType);
"""


def _changed(repository: Path) -> Path:
    """The ledger's amount CHECK made stricter, an index and a foreign key added: a phase that blocks reads and
    writes briefly, index builds and validations that do not."""
    (repository / "db" / "schemas" / "20_ledger.sql").write_text(
        LEDGER.replace("amount int NOT NULL CHECK (amount > 0)", "amount int NOT NULL CHECK (amount > 0 AND amount < 100)")
        + "CREATE INDEX ledger_amount_idx ON ledger (amount);\n")
    return repository / "db"


def test_each_phase_shows_its_locks_who_waits_its_tables_and_estimate_and_the_timeline_parses(
        schema_repository: Path, database: str, tmp_path: Path) -> None:
    run_sql(database, ROWS)
    plan = plan_in(_changed(schema_repository), "plan.json")
    comment = render(plan, "markdown")
    tokens = MarkdownIt("commonmark").enable("table").parse(comment)
    tables = [i for i, t in enumerate(tokens) if t.type == "table_open"]
    # the first screen, before any SQL: what blocks, for how long, which line asked for it, who must approve
    assert not [t for t in tokens[:tables[1]] if t.type == "fence"]
    cells = [t.content for t in tokens[tables[0]:tables[1]] if t.type == "inline"]
    review = dict(zip(cells[0::2], cells[1::2], strict=True))
    swap = next(s for s in plan.body.steps if s.kind == "add_check_constraint")
    assert re.fullmatch(rf"phase {swap.phase} \(steps [\d-]+, one transaction, (under 0\.1 s|~[\d.]+ s)\): "
                        r"public\.ledger ACCESS EXCLUSIVE \(reads and writes wait, ~60,000 rows, [\d.]+ [kM]B\); "
                        r"asked for by 20_ledger\.sql:4", review["**Blocks**"]), review
    assert review["**Approvals**"] == "none needed" and review["**Risk**"].startswith("**medium**: hazard ")
    rows = []
    for token in tokens[tables[1]:]:
        if token.type == "table_close":
            break
        if token.type == "tr_open":
            rows.append([])
        elif token.type == "inline":
            rows[-1].append(token.content)
    assert rows[0] == ["phase", "steps", "runs as", "locks (who waits)", "tables", "estimate"]
    by_phase = {int(r[0]): r for r in rows[1:]}
    assert sorted(by_phase) == sorted({s.phase for s in plan.body.steps})
    index = next(s for s in plan.body.steps if s.kind == "create_index_concurrently")
    assert by_phase[index.phase][3] == "`public.ledger` SHARE UPDATE EXCLUSIVE (reads and writes go on)"
    assert by_phase[index.phase][4].startswith("`public.ledger` ~60,000 rows, ")
    assert "`public.ledger` ACCESS EXCLUSIVE (reads and writes wait)" in by_phase[swap.phase][3]
    assert all(r[5] for r in rows[1:])  # every phase estimated

    (fence,) = [t for t in tokens if t.type == "fence" and t.info == "mermaid"]
    tasks = [line.strip() for line in fence.content.splitlines() if line.strip().startswith("Phase ")]
    assert len(tasks) == len(by_phase)
    assert [":crit," in t for t in tasks] == [
        any(lock in by_phase[n][3] for lock in ("(writes wait)", "(reads and writes wait)")) for n in sorted(by_phase)]
    node = needs("node")
    mermaid = ROOT / ".venv" / "node" / "node_modules" / "mermaid" / "dist" / "mermaid.core.mjs"
    needs("mermaid", str(mermaid))
    script = tmp_path / "parse.mjs"
    script.write_text(MERMAID_PARSE)
    parsed = subprocess.run([node, str(script), mermaid.as_uri()], input=fence.content, capture_output=True, text=True,
                            timeout=120)
    assert parsed.returncode == 0 and parsed.stdout.strip() == "gantt", parsed.stderr

    svg = ET.fromstring(render(plan, "svg").split("\n", 1)[1])
    ns = {"s": "http://www.w3.org/2000/svg"}
    groups = svg.findall("s:g", ns)
    assert [int(g.get("data-phase", "0")) for g in groups] == sorted(by_phase)
    colors = {int(g.get("data-phase", "0")): g.find("s:rect", ns).get("fill") for g in groups}  # type: ignore[union-attr]
    assert colors[swap.phase] == "#d73a49" and colors[index.phase] == "#2188ff"
    text = render(plan, "text")
    assert f"  Phase {index.phase}: outside a transaction, " in text
    assert "; locks public.ledger SHARE UPDATE EXCLUSIVE (reads and writes go on)" in text


def test_an_estimate_takes_the_rate_this_target_did_the_work_at_last_time(schema_repository: Path, database: str) -> None:
    """First plan: the default rate. Applied, each step records its work; the next plan's index build on the same
    table is estimated at the rate the first one measured (its record's rows over its time)."""
    run_sql(database, ROWS)
    db = _changed(schema_repository)
    first = plan_in(db, "first.json")
    build = next(s for s in first.body.steps if s.kind == "create_index_concurrently")
    assert build.estimate is not None and build.estimate.basis == "default" and build.estimate.work == 60000
    assert build.estimate.seconds == round(CATALOG_SECONDS + 60000 / DEFAULT_RATES["index_concurrently"], 3)
    assert main(["--config", str(db / "reconciler.yaml"), "apply", str(db / "first.json"), "--env", "test"]) == 0

    import psycopg

    with psycopg.connect(database) as conn:
        record = conn.execute("SELECT r FROM reconciler.runs, jsonb_array_elements(statements) r "
                              "WHERE r->>'kind' = 'create_index_concurrently'").fetchone()
    assert record is not None and record[0]["work"] == {"class": "index_concurrently", "amount": 60000.0}
    measured = 60000 / ((record[0]["duration_ms"] - record[0]["lock_wait_ms"]) / 1000)

    schemas = db / "schemas"
    (schemas / "20_ledger.sql").write_text((schemas / "20_ledger.sql").read_text()
                                           + "CREATE INDEX ledger_account_amount_idx ON ledger (account_id, amount);\n")
    second = plan_in(db, "second.json")
    (again,) = [s for s in second.body.steps if s.kind == "create_index_concurrently"]
    assert again.estimate is not None and again.estimate.basis == "this target's last 1 step of the kind"
    assert abs(again.estimate.seconds - (CATALOG_SECONDS + 60000 / measured)) < 0.002
