"""PBX configuration snapshots: Asterisk/FreePBX files, every secret redacted on the box."""
