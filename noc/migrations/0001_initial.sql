-- The NOC's store: devices, what they sent (de-duplicated by envelope id), what was
-- derived from it, commands, alerts, and the accounts of the dashboard.

CREATE TABLE orgs (
    id          serial PRIMARY KEY,
    slug        text NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id             serial PRIMARY KEY,
    username       text NOT NULL UNIQUE,
    password_hash  text NOT NULL,
    role           text NOT NULL CHECK (role IN ('staff', 'customer')),
    org_id         integer REFERENCES orgs ON DELETE CASCADE,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- A customer belongs to exactly one organization; staff to none.
    CHECK ((role = 'staff') = (org_id IS NULL))
);

CREATE TABLE sessions (
    token_hash  bytea PRIMARY KEY,          -- SHA-256 of the cookie value; the value is never stored
    user_id     integer NOT NULL REFERENCES users ON DELETE CASCADE,
    csrf        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
CREATE INDEX sessions_expires ON sessions (expires_at);

CREATE TABLE login_failures (
    key  text NOT NULL,                     -- 'user:NAME' or 'ip:ADDRESS'
    at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_key_at ON login_failures (key, at);

CREATE TABLE devices (
    device_id        text PRIMARY KEY,
    org_id           integer REFERENCES orgs ON DELETE SET NULL,
    status           text NOT NULL DEFAULT 'unknown'
                     CHECK (status IN ('online', 'offline', 'severed', 'unknown')),
    status_at        timestamptz,
    first_seen       timestamptz NOT NULL DEFAULT now(),
    last_seen        timestamptz,           -- any message: heartbeat, envelope, reply
    cert_not_after   timestamptz,
    agent_version    text,
    last_seq         bigint,                -- highest envelope sequence number received
    envelopes        bigint NOT NULL DEFAULT 0,
    missing          bigint NOT NULL DEFAULT 0,  -- sequence numbers in open gaps
    health_at        timestamptz,
    cpu_pct          real,
    load1            real,
    mem_pct          real,
    disk_pct         real,                  -- the fullest disk
    outbox_queued    bigint,
    outbox_dropped   bigint,
    asterisk_up      boolean
);
CREATE INDEX devices_org ON devices (org_id);

-- One row per envelope ever received: the de-duplication key is (device, id).
CREATE TABLE envelopes (
    device_id    text NOT NULL,
    id           text NOT NULL,
    seq          bigint NOT NULL,
    class        text NOT NULL,
    ts           timestamptz NOT NULL,
    size         integer NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, id)
);
CREATE INDEX envelopes_received ON envelopes (received_at);
CREATE INDEX envelopes_device_seq ON envelopes (device_id, seq);

-- Ranges of sequence numbers not (yet) received. Arrivals out of order shrink them.
CREATE TABLE seq_gaps (
    device_id    text NOT NULL,
    first_seq    bigint NOT NULL,
    last_seq     bigint NOT NULL,
    opened_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, first_seq),
    CHECK (first_seq <= last_seq)
);

CREATE TABLE status_events (
    device_id  text NOT NULL,
    status     text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX status_events_device_at ON status_events (device_id, at);

CREATE TABLE health (
    device_id       text NOT NULL,
    ts              timestamptz NOT NULL,
    envelope_id     text NOT NULL,
    cpu_pct         real,
    load1           real,
    mem_pct         real,
    swap_pct        real,
    disk_pct        real,
    uptime          bigint,
    outbox_queued   bigint,
    outbox_dropped  bigint,
    asterisk_up     boolean,
    body            jsonb NOT NULL,
    PRIMARY KEY (device_id, ts, envelope_id)
);

-- One row per bucket: a later revision replaces the earlier one, never adds to it.
CREATE TABLE callstats (
    device_id        text NOT NULL,
    bucket_start     timestamptz NOT NULL,
    bucket_seconds   integer NOT NULL,
    revision         integer NOT NULL,
    envelope_id      text NOT NULL,
    folded           boolean NOT NULL,
    calls            integer,
    answered         integer,
    duration_sum     bigint,
    billsec_sum      bigint,
    asr              real,
    acd              real,
    peak_concurrent  integer,
    by_direction     jsonb NOT NULL DEFAULT '{}',
    by_disposition   jsonb NOT NULL DEFAULT '{}',
    by_trunk         jsonb NOT NULL DEFAULT '{}',
    by_hour          jsonb NOT NULL DEFAULT '{}',
    received_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, bucket_start)
);

-- Parts of configuration snapshots as they arrive (any order, any worker).
CREATE TABLE snapshot_parts (
    device_id    text NOT NULL,
    snapshot_id  text NOT NULL,
    part         integer NOT NULL,
    parts        integer,                   -- schema 2: only the last part says how many
    body         jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, snapshot_id, part)
);

CREATE TABLE snapshots (
    device_id     text NOT NULL,
    snapshot_id   text NOT NULL,
    parts         integer,                  -- NULL until the part that says it has arrived
    mode          text,
    base          text,
    taken_at      timestamptz,
    first_part_at timestamptz NOT NULL DEFAULT now(),
    complete_at   timestamptz,              -- NULL until every part is here
    summary       jsonb,
    files_changed integer,
    files_removed integer,
    PRIMARY KEY (device_id, snapshot_id)
);

-- The redacted text of each configuration file as of the last complete snapshot.
CREATE TABLE config_files (
    device_id    text NOT NULL,
    path         text NOT NULL,
    digest       text,
    content      text,
    snapshot_id  text NOT NULL,
    PRIMARY KEY (device_id, path)
);

-- What each snapshot changed, as unified diffs of redacted text.
CREATE TABLE config_diffs (
    device_id    text NOT NULL,
    snapshot_id  text NOT NULL,
    path         text NOT NULL,
    change       text NOT NULL CHECK (change IN ('added', 'changed', 'removed', 'entry')),
    diff         text NOT NULL,
    PRIMARY KEY (device_id, snapshot_id, path)
);

CREATE TABLE commands (
    id         text PRIMARY KEY,
    device_id  text NOT NULL,
    cmd        text NOT NULL,
    args       jsonb NOT NULL,
    sent_by    text NOT NULL,
    sent_at    timestamptz NOT NULL DEFAULT now(),
    reply_at   timestamptz,
    ok         boolean,
    result     jsonb,
    error      text
);
CREATE INDEX commands_device_sent ON commands (device_id, sent_at);

-- Replies as they arrive (including replies to commands another tool sent).
CREATE TABLE replies (
    device_id    text NOT NULL,
    id           text NOT NULL,
    ok           boolean,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, id)
);

CREATE TABLE alerts (
    id           bigserial PRIMARY KEY,
    device_id    text NOT NULL,
    rule         text NOT NULL,
    severity     text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    detail       text NOT NULL,
    opened_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    clear_since  timestamptz,               -- the condition has been clear since (hysteresis)
    notified     text NOT NULL DEFAULT ''   -- 'open', 'open,resolve': what the webhook was told
);
-- At most one open alert per device and rule: that is what "opens once" means.
CREATE UNIQUE INDEX alerts_open ON alerts (device_id, rule) WHERE resolved_at IS NULL;

-- Messages that could not be read (not JSON, wrong shape): kept, acknowledged, shown.
CREATE TABLE rejects (
    id           bigserial PRIMARY KEY,
    topic        text NOT NULL,
    reason       text NOT NULL,
    payload      bytea NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
