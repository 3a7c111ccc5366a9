-- Views: per-project progress summary for dashboards.

create view project_progress as
select
    p.id as project_id,
    p.slug,
    p.name,
    count(t.id) as total_tasks,
    count(t.id) filter (where t.status = 'done') as done_tasks,
    count(t.id) filter (where t.status <> 'done' and t.due_date < current_date) as overdue_tasks
from projects p
left join tasks t on t.project_id = p.id
where not p.archived
group by p.id, p.slug, p.name;
