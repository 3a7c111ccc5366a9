-- Types: enumerations shared by the project tracker tables.

create type task_status as enum ('todo', 'in_progress', 'blocked', 'done');
