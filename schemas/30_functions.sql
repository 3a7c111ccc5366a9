-- Functions and triggers: keep tasks.updated_at current on every update.

create function set_updated_at() returns trigger
language plpgsql
as $$
begin
    new.updated_at := now();
    return new;
end;
$$;

create trigger tasks_set_updated_at
    before update on tasks
    for each row
    execute function set_updated_at();
