"""JSON Schema of inventory.yaml, and its checker: the one module that imports jsonschema,
inside `schema_errors`. Unknown keys are errors (additionalProperties: false)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

_STRING = {"type": "string", "minLength": 1}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_POSITIVE = {"type": "integer", "minimum": 0}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


RETENTION = _object({
    "keep_last": _POSITIVE, "daily": _POSITIVE, "weekly": _POSITIVE,
    "monthly": _POSITIVE, "min_keep": _POSITIVE, "max_age_hours": _POSITIVE,
})

STORAGE = _object({
    "provider": {"enum": ["r2", "s3", "local"]},
    "endpoint": _STRING, "region": _STRING, "bucket": _STRING, "path": _STRING,
    "access_key_id": _STRING, "secret_access_key": _STRING, "public_base": _STRING,
    "prefix": {"type": "string"},
}, required=["bucket"])

# backups.copies: a second (third…) copy of every backup in another bucket (ops/backup_copies.py); the
# connection settings not given are the backup bucket's, its keys only when the copy is on the same service
BACKUP_COPY = _object({
    "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"},
    "provider": {"enum": ["r2", "s3", "local"]},
    "endpoint": _STRING, "region": _STRING, "bucket": _STRING, "path": _STRING,
    "access_key_id": _STRING, "secret_access_key": _STRING,
    "prefix": {"type": "string"},
}, required=["name", "bucket"])

BACKUPS = _object({
    # the backup bucket: same connection settings as storage, each may be given or inherited
    "provider": {"enum": ["r2", "s3", "local"]},
    "endpoint": _STRING, "region": _STRING, "bucket": _STRING, "path": _STRING,
    "access_key_id": _STRING, "secret_access_key": _STRING,
    "prefix": {"type": "string"},
    "encrypt_to": {"type": "array", "items": _STRING},
    "identity_file": _STRING,
    "compression_level": {"type": "integer", "minimum": 1, "maximum": 22},
    "retention": RETENTION,
    "metrics_file": _STRING,
    "schedule_hours": {"type": "number", "exclusiveMinimum": 0},
    "verify_max_age_days": {"type": "number", "exclusiveMinimum": 0},  # backup.check: a passed verification as recent
    # tables whose rows are left out ("Session" in the app's schema, or "schema.Table"); definitions are kept
    "exclude_table_data": {"type": "array", "items": _STRING, "uniqueItems": True},
    # object lock: each stored object of a backup is held this many days (S3 Object Lock, R2 bucket lock rule)
    "lock_days": {"type": "integer", "minimum": 1, "maximum": 36500},
    "lock_mode": {"enum": ["governance", "compliance"]},
    "copies": {"type": "array", "items": BACKUP_COPY},
})

# pings to a dead man's switch (ops/pings.py): `url` for the scheduled jobs, `jobs.<task>` per task (false: none)
MONITOR = _object({
    "url": _STRING,
    "jobs": {"type": "object", "additionalProperties": {"anyOf": [_STRING, {"const": False}]}},
    "timeout": {"type": "number", "exclusiveMinimum": 0},
    "retries": {"type": "integer", "minimum": 0, "maximum": 5},
})

DATABASE = _object({"url": _STRING, "direct_url": _STRING, "admin_url": _STRING, "name": _STRING, "role": _STRING,
                    # a managed database: Neon's API (ops/neon.py) makes branches, restores and passwords
                    "provider": {"enum": ["postgres", "neon"]}, "project_id": _STRING, "api_key": _STRING,
                    "branch": _STRING, "api_base": _STRING, "pooled": {"type": "boolean"},
                    # triage: the last lines of log_command, run over SSH on log_host (else on this machine)
                    "log_command": _STRING,
                    # several databases per backup (ops/backup_databases.py): these, or every one the admin role reads
                    "names": {"oneOf": [{"type": "array", "items": {"type": "string", "minLength": 1},
                                         "minItems": 1, "uniqueItems": True}, {"const": "all"}]},
                    "log_host": _object({"name": _STRING, "address": _STRING, "user": _STRING, "port": _PORT,
                                         "key_file": _STRING}, required=["address"])})
# A Neon environment may leave the URL to `inv provision`, which stores the new branch's (ops/neon_provision.py).
DATABASE.update({"if": {"properties": {"provider": {"const": "neon"}}, "required": ["provider"]},
                 "else": {"required": ["url"]}})

KEYS = _object({
    "provider": {"enum": ["cloudflare", "aws-iam", "static"]},
    "account_id": _STRING, "api_token": _STRING, "api_base": _STRING,
    "iam_user": _STRING, "max_age_days": _POSITIVE,
    "endpoint": _STRING, "probe_timeout": {"type": "number", "exclusiveMinimum": 0},
})

MIGRATIONS = _object({"engine": {"enum": ["native", "command"]}, "dir": _STRING, "command": _STRING,
                      "lock_rows": _POSITIVE, "lock_bytes": _POSITIVE,  # ops/migrations/locks.py
                      # ops/migrations/lock_wait.py
                      "lock_timeout_seconds": {"type": "number", "minimum": 0},
                      "lock_retries": {"type": "integer", "minimum": 0, "maximum": 10}})

# app.platform vercel (ops/vercel_steps.py): the project, its team, the API token, the variables' target
VERCEL = _object({"project_id": _STRING, "team_id": _STRING, "token": _STRING,
                  "target": {"enum": ["production", "preview"]}, "api": _STRING,
                  "build_timeout": {"type": "number", "exclusiveMinimum": 0}}, required=["project_id", "token"])

APP = _object({
    "platform": {"enum": ["ssh", "vercel"]}, "vercel": VERCEL,
    "dir": _STRING, "env_file": _STRING, "restart": _STRING, "log_command": _STRING,
    "health_url": _STRING, "ready_url": _STRING, "public_url": _STRING, "repository": _STRING,
    "seed": _STRING,  # provision runs it once on the first host, in app.dir, with the app's environment
    "migrations": MIGRATIONS,
    "env": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
    "health_timeout": {"type": "number", "exclusiveMinimum": 0},
})

SSH = _object({"user": _STRING, "port": _PORT, "key_file": _STRING, "connect_timeout": _POSITIVE,
               "strict_host_keys": {"type": "boolean"}})

HOST = _object({
    "name": _STRING, "address": _STRING, "user": _STRING, "port": _PORT, "key_file": _STRING,
    "app": APP,
}, required=["name", "address"])

NOTIFY = _object({
    "kind": {"enum": ["webhook", "smtp", "stdout", "file"]},
    "url": _STRING, "path": _STRING, "host": _STRING, "port": _PORT, "from": _STRING,
    "to": {"type": "array", "items": _STRING}, "username": _STRING, "password": _STRING,
    "starttls": {"type": "boolean"}, "audience": {"enum": ["public", "internal"]},
    "timeout": {"type": "number", "exclusiveMinimum": 0}, "retries": _POSITIVE,
}, required=["kind"])

TARGETS = _object({"rpo_hours": {"type": "number", "exclusiveMinimum": 0},
                   "rto_minutes": {"type": "number", "exclusiveMinimum": 0},
                   "rpo_seconds": {"type": "number", "exclusiveMinimum": 0}})  # PITR: the archive lag allowed

# point-in-time recovery (ops/pitr_*.py): the database server's data directory, on this machine or on `host`,
# the database host over SSH: the name of one of the environment's hosts, or its address written as a host is
PITR = _object({
    "host": {"oneOf": [_STRING, _object({"name": _STRING, "address": _STRING, "user": _STRING, "port": _PORT,
                                         "key_file": _STRING}, required=["address"])]},
    "data_dir": _STRING, "os_user": _STRING, "bin_dir": _STRING, "config_dir": _STRING,
    "restart": _STRING,  # how to restart the server (default: pg_ctl restart -D data_dir, as os_user)
    "archive_timeout": {"type": "integer", "minimum": 1}, "window_days": {"type": "integer", "minimum": 1},
    "server_name": {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"},
}, required=["data_dir"])

# the public status page (ops/status_page.py): published to the app bucket under `prefix` (default status/)
# or to `folder`; components in the order shown, each with an optional group heading
STATUS_PAGE = _object({
    "title": _STRING, "description": {"type": "string"}, "public_base": _STRING,
    "prefix": {"type": "string"}, "folder": _STRING,
    "history_days": {"type": "integer", "minimum": 1, "maximum": 366},
    "components": {"type": "array", "minItems": 1, "items": _object(
        {"name": _STRING, "description": {"type": "string"}, "group": _STRING}, required=["name"])},
}, required=["title", "components"])

_K8S_NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}

# `inv schedule.show`: the jobs an environment needs, when each runs (UTC), what each scheduler needs.
# Each job's defaults (jitter and timeout in minutes). backup runs `backup`; verify `backup.verify --latest
# --deep`; assets `backup.assets`, only where the environment has `storage` (an app bucket); checks runs
# `drill.due`, `keys.status` and `backup.check`, one unit (CronJob, crontab line) each.
SCHEDULE_JOBS = {
    "backup": {"enabled": True, "day": "daily", "time": "02:00", "jitter_minutes": 30, "timeout_minutes": 240},
    # only where PITR is on (`pitr` set): a base backup through the engine, run as root or as pitr.os_user
    "pitr_base": {"enabled": True, "day": "daily", "time": "01:00", "jitter_minutes": 30, "timeout_minutes": 240},
    "verify": {"enabled": True, "day": "sun", "time": "04:00", "jitter_minutes": 30, "timeout_minutes": 360},
    "assets": {"enabled": True, "day": "daily", "time": "03:00", "jitter_minutes": 30, "timeout_minutes": 240},
    "checks": {"enabled": True, "day": "mon", "time": "07:00", "jitter_minutes": 15, "timeout_minutes": 30},
}
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SCHEDULE_JOB = _object({
    "enabled": {"type": "boolean"},
    "day": {"enum": ["daily", *WEEKDAYS]},
    # "HH:MM" in UTC; unquoted, YAML 1.1 reads 02:00 as 120 (minutes since midnight), which means the same
    "time": {"oneOf": [{"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
                       {"type": "integer", "minimum": 0, "maximum": 1439}]},
    "jitter_minutes": {"type": "integer", "minimum": 0, "maximum": 720},  # spread: random (systemd) or by name
    "timeout_minutes": {"type": "integer", "minimum": 1},
})
SCHEDULE = _object({
    "opsbook": _STRING,  # the console tool's absolute path; default: the opsbook beside the Python running this
    "inventory": _STRING,  # the inventory the jobs read; default: this file's absolute path
    "environment_file": _STRING,  # KEY=value secrets (systemd EnvironmentFile=, cron); default /etc/opsbook/ENV.env
    "systemd": _object({"user": _STRING}),  # default user: opsbook
    # default namespace opsbook, secret opsbook-ENV (envFrom), config_map opsbook-inventory; image required
    "kubernetes": _object({"image": _STRING, "namespace": _K8S_NAME, "secret": _K8S_NAME,
                           "config_map": _K8S_NAME}),
    "cron": _object({"mailto": {"type": "string"}}),  # default: none (cron mails the crontab's owner)
    "jobs": _object({name: SCHEDULE_JOB for name in SCHEDULE_JOBS}),
})

# where ${aws-sm:…} references and the aws-sm store reach Secrets Manager (unset: boto3's own chain), and how
# long a ${cmd:…} reference's command may run
SECRET_MANAGERS = _object({
    "command_timeout_seconds": {"type": "number", "exclusiveMinimum": 0},
    "aws": _object({"region": _STRING, "endpoint": _STRING, "access_key_id": _STRING, "secret_access_key": _STRING}),
})

# where what opsbook generates or rotates is kept (ops/secret_store.py); max_age_days per secret for secrets.status
SECRETS = _object({
    "store": {"enum": ["file", "aws-sm", "kubernetes"]},
    "aws_secret": _STRING,  # aws-sm: the secret's name; default opsbook/PROJECT/ENV
    # kubernetes: the API server, a bearer token, its CA; the Secret (default opsbook-ENV, as schedule's) and namespace
    "kubernetes": _object({"api": _STRING, "token": _STRING, "ca_file": _STRING, "namespace": _K8S_NAME,
                           "secret": _K8S_NAME}),
    "max_age_days": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 1}},
})

ENVIRONMENT = _object({
    "sandbox": {"type": "boolean"},
    "protected": {"type": "boolean"},
    "decommissioned": {"type": "boolean"},
    "description": {"type": "string"},
    "database": DATABASE,
    "storage": STORAGE,
    "backups": BACKUPS,
    "keys": KEYS,
    "ssh": SSH,
    "hosts": {"type": "array", "items": HOST},
    "app": APP,
    "targets": TARGETS,
    "pitr": PITR,
    "notify": {"type": "array", "items": NOTIFY},
    "monitor": MONITOR,
    "drill": _object({"sample_images": _POSITIVE, "target": _STRING,
                      # SQL giving (storage key, size) of stored images, run read-only on the restored database
                      "images_query": _STRING, "images_prefix": {"type": "string"}}),
    "incidents": _object({"templates_dir": _STRING, "log_lines": _POSITIVE}),
    "schedule": SCHEDULE,
    "status_page": STATUS_PAGE,
    # the lease a mutating run holds in the backup bucket (ops/lease.py): seconds it holds unless renewed
    "locks": _object({"lease_seconds": {"type": "number", "minimum": 1}}),
    "secret_managers": SECRET_MANAGERS,
    "secrets": SECRETS,
})

# defaults: the same sections as an environment, none required
DEFAULTS = {**ENVIRONMENT, "properties": dict(ENVIRONMENT["properties"])}
DEFAULTS["properties"]["database"] = {key: value for key, value in DATABASE.items() if key not in {"if", "else"}}
DEFAULTS["properties"]["storage"] = {**STORAGE, "required": []}
DEFAULTS["properties"]["pitr"] = {**PITR, "required": []}

INVENTORY = _object({
    "project": _STRING,
    "default_env": _STRING,
    "state_dir": _STRING,
    "defaults": DEFAULTS,
    "envs": {"type": "object", "minProperties": 1, "additionalProperties": ENVIRONMENT,
             "propertyNames": {"pattern": "^[a-z][a-z0-9_-]*$"}},
}, required=["project", "envs"])

# Keys whose literal values are secrets even when written inline (not only ${…} refs).
SECRET_KEYS = frozenset({
    "url", "direct_url", "admin_url", "secret_access_key", "api_token", "password", "access_key_id", "token",
    "api_key",
})


def schema_errors(data: Any) -> Iterator[Any]:
    """Every way `data` breaks INVENTORY, as jsonschema's ValidationError objects."""
    from jsonschema import Draft202012Validator

    yield from Draft202012Validator(INVENTORY).iter_errors(data)
