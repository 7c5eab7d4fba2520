-- Device identity (issue 14): one-time enrollment tokens and the certificates issued through them.

-- A token is 128 random bits shown once by `noc device add`; only its SHA-256 is kept. It is
-- bound to one device id, expires, and is spent by the first enrollment that presents it.
CREATE TABLE enrollment_tokens (
    token_hash   bytea PRIMARY KEY CHECK (octet_length(token_hash) = 32),
    device_id    text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    created_by   text,
    used_at      timestamptz,
    used_from    text                         -- the enrolling client's address
);
CREATE INDEX enrollment_tokens_device ON enrollment_tokens (device_id);

-- Every certificate the enrollment service issued (serial as text: up to 159 bits).
CREATE TABLE device_certificates (
    serial       text PRIMARY KEY,
    device_id    text NOT NULL,
    not_before   timestamptz NOT NULL,
    not_after    timestamptz NOT NULL,
    issued_at    timestamptz NOT NULL DEFAULT now(),
    how          text NOT NULL CHECK (how IN ('enroll', 'renew')),
    revoked_at   timestamptz
);
CREATE INDEX device_certificates_device ON device_certificates (device_id, issued_at DESC);
