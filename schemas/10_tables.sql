-- Tables: users, projects, their members, tasks and task comments.

create table users (
    id bigint generated always as identity primary key,
    email text not null unique,
    display_name text not null,
    created_at timestamptz not null default now(),
    constraint users_email_format check (position('@' in email) > 1)
);

create table projects (
    id bigint generated always as identity primary key,
    slug text not null unique,
    name text not null,
    owner_id bigint not null references users (id),
    archived boolean not null default false,
    created_at timestamptz not null default now(),
    constraint projects_slug_format check (slug ~ '^[a-z0-9-]+$')
);

create table project_members (
    project_id bigint not null references projects (id) on delete cascade,
    user_id bigint not null references users (id) on delete cascade,
    role text not null default 'member',
    joined_at timestamptz not null default now(),
    primary key (project_id, user_id),
    constraint project_members_role_valid check (role in ('member', 'admin'))
);

create table tasks (
    id bigint generated always as identity primary key,
    project_id bigint not null references projects (id) on delete cascade,
    assignee_id bigint references users (id) on delete set null,
    title text not null,
    status task_status not null default 'todo',
    priority integer not null default 3,
    due_date date,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint tasks_title_not_blank check (length(trim(title)) > 0),
    constraint tasks_priority_range check (priority between 1 and 5)
);

create table task_comments (
    id bigint generated always as identity primary key,
    task_id bigint not null references tasks (id) on delete cascade,
    author_id bigint not null references users (id),
    body text not null,
    created_at timestamptz not null default now()
);

-- Secondary indexes (foreign keys used in joins, plus common filters).
create index tasks_project_id_idx on tasks (project_id);
create index tasks_assignee_status_idx on tasks (assignee_id, status);
create index tasks_open_due_idx on tasks (due_date) where status <> 'done';
create index task_comments_task_id_idx on task_comments (task_id, created_at);
create index project_members_user_id_idx on project_members (user_id);
