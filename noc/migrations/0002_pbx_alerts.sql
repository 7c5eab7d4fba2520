-- PBX alerts from the health records (issue 13): trunks down for two records running,
-- and Asterisk restarted (its start time changed between two records).
ALTER TABLE devices
    ADD COLUMN pbx_seq                bigint,       -- the newest health record read for these
    ADD COLUMN trunks_down            text[] NOT NULL DEFAULT '{}',  -- in the newest record
    ADD COLUMN trunks_down_streak     integer NOT NULL DEFAULT 0,  -- records running with one down
    ADD COLUMN asterisk_started_at    bigint,       -- epoch seconds, as the box reports it
    ADD COLUMN asterisk_restarted_at  timestamptz;  -- the new start time, when it changed
